"""The narrow dense baseline (freezepack.experiments.narrow, `freezepack train --method narrow`): the widest
same-depth model under a trainable budget, multiply-add counts, user models' width arguments, dense lossy files."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import freezepack
from freezepack.cli import cli
from freezepack.errors import UsageError
from freezepack.experiments.data import load_mnist
from freezepack.experiments.models import WIDTHS, make_model
from freezepack.experiments.narrow import base_widths, count_macs, count_trainable, plan, scale, width_steps
from freezepack.experiments.train import evaluate
from freezepack.method.freezenet import init_weights, make_freezenet

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class MLP(nn.Module):
        """Width set by `hidden` (and optionally `second`)."""
        def __init__(self, hidden: int = 64, second: int = 32):
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(784, hidden), nn.Linear(hidden, second), nn.Linear(second, 10)

        def forward(self, x):
            return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))

    class WNet(nn.Module):
        """The `width` keyword convention."""
        def __init__(self, width=16):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 5, stride=2)
            self.bn = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width * 12 * 12, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))

    class NoDefault(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.fc, self.out = nn.Linear(784, hidden), nn.Linear(hidden, 10)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x.flatten(1))))

    class Fixed(nn.Module):
        def __init__(self, dropout: float = 0.1):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "narrow_user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "narrow_user_models"


def _is_widest(p, budget: int) -> None:
    """The plan fits the budget, and the next model of the width chain (one width step wider) does not."""
    steps = width_steps(p.base)
    at = [i for i, f in enumerate(steps) if scale(p.base, f) == p.widths]
    assert at, "the plan is one factor applied to every width"
    assert count_trainable(p.model, p.widths) == p.trainable <= budget
    i = at[-1]
    wider = scale(p.base, steps[i + 1])
    flat = lambda w: [x for v in w.values() for x in (v if isinstance(v, tuple) else (v,))]  # noqa: E731
    assert wider != p.widths and all(a >= b for a, b in zip(flat(wider), flat(p.widths)))
    assert count_trainable(p.model, wider) == p.next_trainable > budget


def test_lenet5_at_the_q099_freezenet_budget_hand_counted():
    p = plan("lenet5", 4_885)  # the LeNet-5-Caffe FreezeNet's trainable numbers at q = 0.99 (docs/RESULTS.md)
    assert p.widths == {"conv1": 2, "conv2": 5, "fc3": 50}
    # conv1 2*25+2, conv2 5*2*25+5, fc3 5*16*50+50, fc4 50*10+10
    assert p.trainable == 52 + 255 + 4_050 + 510 == 4_867
    # one step wider: fc3 51 (factor 101/1000 comes before conv2 6 at 11/100 and conv1 3 at 5/40)
    assert p.next_trainable == 52 + 255 + (80 * 51 + 51) + (51 * 10 + 10) == 4_958
    _is_widest(p, 4_885)


@pytest.mark.parametrize("model,budget", [("lenet5", 43_630), ("lenet5", 1_010), ("lenet300", 3_072),
                                          ("lenet300", 26_999), ("vgg16", 168_152)])
def test_width_search_returns_the_widest_model_under_the_budget(model, budget):
    _is_widest(plan(model, budget), budget)


def test_budget_at_or_above_full_width_gives_the_full_model_and_too_small_a_budget_is_refused():
    full = count_trainable("lenet300", {})
    p = plan("lenet300", full)
    assert p.widths == WIDTHS["lenet300"] and p.trainable == full and p.next_trainable is None
    with pytest.raises(UsageError, match="every width 1"):
        plan("lenet300", 100)  # 784*1+1 alone is more


def test_scaling_is_exact_rounding_half_up_and_never_below_one():
    from fractions import Fraction

    assert scale({"a": 20, "b": (50, 3)}, Fraction(1, 40)) == {"a": 1, "b": (1, 1)}
    assert scale({"a": 20}, Fraction(5, 40)) == {"a": 3}       # 2.5 rounds up
    assert scale({"a": 20}, Fraction(5, 40) - Fraction(1, 10**9)) == {"a": 2}


def test_macs_of_lenet5_and_lenet300_hand_computed():
    # conv1 20x24x24 outputs x 25, conv2 50x8x8 x (20*25), fc3 800x500, fc4 500x10
    assert count_macs(make_model("lenet5")) == 20 * 576 * 25 + 50 * 64 * 500 + 800 * 500 + 500 * 10 == 2_293_000
    assert count_macs(make_model("lenet300")) == 784 * 300 + 300 * 100 + 100 * 10
    assert count_macs(make_model("lenet5", conv1=2, conv2=5, fc3=50)) == 2 * 576 * 25 + 5 * 64 * 50 + 80 * 50 + 500


def test_macs_count_groups_and_transposed_convs_and_a_freezenet_costs_its_architecture():
    net = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ConvTranspose2d(8, 2, 2, stride=2), nn.Flatten(),
                        nn.Linear(2 * 12 * 12, 3))
    # conv: 8x6x6 outputs x (4/2)*9; transposed: 8x6x6 inputs x 2*4; linear 288x3
    assert count_macs(net, (4, 8, 8)) == 8 * 36 * 18 + 8 * 36 * 8 + 288 * 3
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    fz = make_freezenet(make_model("lenet5"), (x, y), 0.99, seed=1)
    assert count_macs(fz) == 2_293_000


def test_user_width_arguments(user_module):
    p = plan(f"{user_module}:MLP", 20_000, ["hidden", "second"])
    assert p.base == {"hidden": 64, "second": 32}
    _is_widest(p, 20_000)
    p = plan(f"{user_module}:MLP", 20_000, ["hidden"])  # `second` stays at its default
    assert p.widths == {"hidden": 24}  # 817 h + 362 numbers: 24 -> 19,970, 25 -> 20,787
    _is_widest(p, 20_000)
    p = plan(f"{user_module}:WNet", 5_000)  # the `width` convention
    assert p.base == {"width": 16} and p.widths == {"width": 3}  # 1,468 w + 10 numbers
    _is_widest(p, 5_000)
    p = plan(f"{user_module}:NoDefault", 5_000, ["hidden=100"])
    assert p.base == {"hidden": 100} and p.widths == {"hidden": 6}  # 795 h + 10 numbers


@pytest.mark.parametrize("cls,args,msg", [
    ("Fixed", (), "Fixed has no width argument"),
    ("Fixed", ("hidden",), "Fixed has no argument 'hidden'"),
    ("NoDefault", ("hidden",), "hidden=N"),
    ("MLP", ("hidden=x",), "FULL_WIDTH must be an integer"),
])
def test_user_models_without_a_usable_width_argument_are_refused_by_name(user_module, cls, args, msg):
    with pytest.raises(UsageError, match=msg):
        base_widths(f"{user_module}:{cls}", args)


def test_cli_refuses_bad_narrow_input_in_one_line(user_module):
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--method", "narrow", "--model", f"{user_module}:Fixed", "--epochs", "1"])
    assert res.exit_code == 1 and "Fixed has no width argument" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["train", "--width-arg", "hidden", "--epochs", "1"])
    assert res.exit_code == 2 and "--method narrow" in res.output
    res = runner.invoke(cli, ["train", "--method", "narrow", "--values", "kmeans:2", "--finetune", "1",
                              "--out", "x.fpk"])
    assert res.exit_code == 2 and "--finetune" in res.output


def test_dense_model_lossy_values_code_its_weights_and_keep_biases_exact(tmp_path):
    model = init_weights(make_model("lenet300"), 3)
    with torch.no_grad():
        for m in (model.fc1, model.fc2, model.fc3):
            m.bias.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lossless, lossy = tmp_path / "a.fpk", tmp_path / "b.fpk"
    freezepack.save(lossless, model)
    freezepack.save(lossy, model, values="kmeans:4")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is not changed
    sd = freezepack.load(lossy)
    for k, v in sd.items():
        if k.endswith(".weight"):
            assert v.unique().numel() <= 16 and not torch.equal(v, before[k])
        else:
            assert torch.equal(v, before[k])
    assert freezepack.inspect(lossy)["metadata"]["freezepack.values"] == "kmeans:4"
    assert lossy.stat().st_size < lossless.stat().st_size / 5


@pytest.mark.slow
def test_train_method_narrow_end_to_end(tmp_path):
    """The file loads into the narrow model and evaluates to the reported accuracy; the budget is the FreezeNet's
    trainable count at the same q and seed, as `--method freezenet` reports it."""
    runner, out = CliRunner(), tmp_path / "narrow.fpk"
    args = ["train", "--model", "lenet300", "--q", "0.99", "--epochs", "1", "--seed", "2", "--json", "--quiet"]
    fz = json.loads(runner.invoke(cli, args).output)
    res = runner.invoke(cli, args + ["--method", "narrow", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["method"] == "narrow" and r["max_trainable"] == fz["trainable"]
    assert r["trainable"] == r["parameters"] <= fz["trainable"] < r["next_trainable"]
    assert r["widths"] == {"fc1": 3, "fc2": 1} and r["macs"] == 784 * 3 + 3 + 10 and fz["macs"] == 266_200
    net = make_model("lenet300", **r["widths"])
    freezepack.load_into(net, out)
    _, test = load_mnist()
    assert evaluate(net, test) == r["test_acc"]
    assert json.loads(freezepack.inspect(out)["metadata"]["widths"]) == r["widths"]

    lossy = tmp_path / "narrow-k2.fpk"
    res = runner.invoke(cli, args + ["--method", "narrow", "--out", str(lossy), "--values", "kmeans:2"])
    r2 = json.loads(res.output)
    stored = make_model("lenet300", **r2["widths"])
    freezepack.load_into(stored, lossy)
    assert evaluate(stored, test) == r2["stored_test_acc"] and r2["test_acc"] == r["test_acc"]
    assert stored.fc1.weight.unique().numel() <= 4 and lossy.stat().st_size < out.stat().st_size


@pytest.mark.slow
def test_train_method_narrow_with_a_user_model(user_module, tmp_path):
    out = tmp_path / "mlp.fpk"
    res = CliRunner().invoke(cli, ["train", "--method", "narrow", "--model", f"{user_module}:MLP", "--width-arg",
                                   "hidden", "--max-trainable", "8000", "--epochs", "1", "--out", str(out),
                                   "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["widths"] == {"hidden": 9} and r["trainable"] == 817 * 9 + 362 < 8000 < r["next_trainable"]
    import narrow_user_models

    net = narrow_user_models.MLP(hidden=9)
    freezepack.load_into(net, out)
    _, test = load_mnist()
    assert evaluate(net, test) == r["test_acc"]
