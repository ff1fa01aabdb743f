"""The paper's three architectures, as ordinary ``nn.Module``s with stable ``state_dict`` names.

The names matter: a frozen tensor's generator stream is derived from its name, so renaming a layer changes its
weights. Weights are (re)initialised by freezepack (``freezenet.init_weights``), not here.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UsageError


class LeNet300100(nn.Module):
    """LeNet-300-100: fully connected 784-300-100-10 (266,610 parameters)."""

    def __init__(self, num_classes: int = 10, in_features: int = 28 * 28, fc1: int = 300, fc2: int = 100):
        super().__init__()
        self.fc1 = nn.Linear(in_features, fc1)
        self.fc2 = nn.Linear(fc1, fc2)
        self.fc3 = nn.Linear(fc2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5Caffe(nn.Module):
    """LeNet-5-Caffe: conv 20@5x5, max-pool, conv 50@5x5, max-pool, fc 500, fc 10 (431,080 parameters)."""

    def __init__(self, num_classes: int = 10, conv1: int = 20, conv2: int = 50, fc3: int = 500):
        super().__init__()
        self.conv1 = nn.Conv2d(1, conv1, 5)
        self.conv2 = nn.Conv2d(conv1, conv2, 5)
        self.fc3 = nn.Linear(conv2 * 4 * 4, fc3)
        self.fc4 = nn.Linear(fc3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(self.conv1(x), 2)
        x = torch.max_pool2d(self.conv2(x), 2)
        x = torch.relu(self.fc3(x.flatten(1)))
        return self.fc4(x)


VGG16_D_CONV = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_D_WIDTHS: tuple[int, ...] = tuple(int(v) for v in VGG16_D_CONV if v != "M")


class VGG16D(nn.Module):
    """VGG16-D for 32x32 images as in SNIP: 13 conv3x3+BN+ReLU, fc 512+BN, fc 512+BN, classifier.

    Dropout is replaced by BatchNorm (paper, sect. 4.2): 15,255,626 parameters for 10 classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 conv: tuple[int, ...] = VGG16_D_WIDTHS, fc: int = 512):
        super().__init__()
        layers: list[nn.Module] = []
        c, widths = in_channels, iter(conv)
        for v in VGG16_D_CONV:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                v = int(next(widths))
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c, fc), nn.BatchNorm1d(fc), nn.ReLU(inplace=True),
            nn.Linear(fc, fc), nn.BatchNorm1d(fc), nn.ReLU(inplace=True),
            nn.Linear(fc, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


MODELS = {"lenet300": LeNet300100, "lenet5": LeNet5Caffe, "vgg16": VGG16D}
INPUT_SHAPES = {"lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "vgg16": (3, 32, 32)}
# The constructor arguments that set each paper model's layer widths, at the paper's values: a narrow baseline
# (freezepack.experiments.narrow) scales all of them by one factor, keeping the depth.
WIDTHS: dict[str, dict[str, Any]] = {
    "lenet300": {"fc1": 300, "fc2": 100}, "lenet5": {"conv1": 20, "conv2": 50, "fc3": 500},
    "vgg16": {"conv": VGG16_D_WIDTHS, "fc": 512}}


def make_model(name: str, num_classes: int = 10, **widths) -> nn.Module:
    """A fresh model by short name (``lenet300``, ``lenet5``, ``vgg16``) or a user's ``package.module:Factory``.

    ``Factory`` is a class or function in an importable module, called with no arguments (or with ``widths`` as
    keyword arguments); it must return an ``nn.Module`` (for ``freezepack train``: one that maps MNIST batches
    ``(N, 1, 28, 28)`` to 10 logits). ``widths``: layer widths (:data:`WIDTHS` names for the paper's models).
    """
    if isinstance(name, str) and ":" in name:
        return _user_model(name, widths)
    try:
        cls = MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r} (known: {', '.join(MODELS)}, or module:Class)") from None
    unknown = set(widths) - set(WIDTHS[name])
    if unknown:
        raise UsageError(f"model {name!r} has no width argument {', '.join(sorted(unknown))} "
                         f"(its widths: {', '.join(WIDTHS[name])})")
    return cls(num_classes=num_classes, **widths)


def user_factory(spec: str):
    """The class or function named by ``package.module:Factory`` (imported, not called)."""
    import importlib

    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UsageError(f"model {spec!r}: expected package.module:Factory")
    try:
        factory = importlib.import_module(mod_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except ImportError as e:
        raise UsageError(f"model {spec!r}: cannot import {mod_name!r} ({e}); is it on PYTHONPATH?") from None
    except AttributeError:
        raise UsageError(f"model {spec!r}: module {mod_name!r} has no {attr!r}") from None
    if not callable(factory):
        raise UsageError(f"model {spec!r}: {attr!r} is not a class or function")
    return factory


def _user_model(spec: str, kwargs: dict | None = None) -> nn.Module:
    factory = user_factory(spec)
    try:
        model = factory(**(kwargs or {}))
    except Exception as e:  # user code: report it as the user's model failing to build
        raise UsageError(f"model {spec!r}: building it failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
