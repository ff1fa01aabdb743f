"""The freeze record: what a FreezeNet *is*, independent of any module or file layout.

The method (freezepack.method.freezenet) produces it from a trained model; the api/container store it; a loader turns it
back into dense tensors. Mask convention everywhere: ``True`` = trainable (value stored), ``False`` = frozen
(regenerated from seed + initializer, times ``frozen_scale``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .init import InitSpec, generate
from .rng import SPEC_VERSION


@dataclass
class FrozenTensor:
    """One partly frozen tensor. ``values`` = dense[mask] in row-major (C) order, float32, 1-D."""

    init: InitSpec
    mask: torch.Tensor          # bool, the tensor's shape
    values: torch.Tensor        # float32, shape (mask.sum(),)
    frozen_scale: float = 1.0   # FreezeNet-WD: frozen = generator output * frozen_scale (a float32 number)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape)

    def dense(self, seed: int, name: str, device=None) -> torch.Tensor:
        """Regenerate the frozen part on ``device`` and scatter the trained values in."""
        out = generate(self.init, self.shape, seed, name, device=device)
        if self.frozen_scale != 1.0:
            out.mul_(self.frozen_scale)
        mask = self.mask.to(out.device)
        out[mask] = self.values.to(device=out.device, dtype=torch.float32)
        return out


@dataclass
class FreezeRecord:
    """A whole model: per-tensor frozen entries plus tensors stored whole (biases, BatchNorm, anything else).

    Tensor names are the model's ``state_dict`` keys; each frozen tensor's generator stream is derived from its
    name (spec/RNG.md), so names must be stable between save and load.
    """

    seed: int
    frozen: dict[str, FrozenTensor] = field(default_factory=dict)
    whole: dict[str, torch.Tensor] = field(default_factory=dict)
    spec_version: str = SPEC_VERSION

    def state_dict(self, device=None) -> dict[str, torch.Tensor]:
        sd = {k: v.to(device) for k, v in self.whole.items()}
        for name, ft in self.frozen.items():
            sd[name] = ft.dense(self.seed, name, device=device)
        return sd
