"""The paper's architectures: exact parameter counts, output shapes, stable names."""
from __future__ import annotations

import pytest
import torch

from freezepack import UsageError
from freezepack.experiments.models import count_parameters, make_model


@pytest.mark.parametrize("name,count", [("lenet300", 266_610), ("lenet5", 431_080), ("vgg16", 15_255_626)])
def test_parameter_counts(name, count):
    assert count_parameters(make_model(name)) == count


@pytest.mark.parametrize("name,shape", [("lenet300", (1, 28, 28)), ("lenet5", (1, 28, 28)), ("vgg16", (3, 32, 32))])
def test_forward_gives_class_logits(name, shape):
    model = make_model(name).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, *shape))
    assert out.shape == (2, 10)


def test_lenet5_layout_matches_the_paper():
    shapes = {k: tuple(v.shape) for k, v in make_model("lenet5").state_dict().items()}
    assert shapes == {"conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,), "conv2.weight": (50, 20, 5, 5),
                      "conv2.bias": (50,), "fc3.weight": (500, 800), "fc3.bias": (500,),
                      "fc4.weight": (10, 500), "fc4.bias": (10,)}


def test_vgg16_has_13_convs_3_linears_and_batchnorm():
    model = make_model("vgg16")
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("Conv2d") == 13 and kinds.count("Linear") == 3
    assert kinds.count("BatchNorm2d") == 13 and kinds.count("BatchNorm1d") == 2
    assert count_parameters(make_model("vgg16", num_classes=100)) == 15_255_626 + 90 * 512 + 90


def test_unknown_model_is_a_clear_error():
    with pytest.raises(UsageError, match="unknown model 'resnet'"):
        make_model("resnet")
