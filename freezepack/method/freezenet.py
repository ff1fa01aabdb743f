"""FreezeNet as a plug-in for any ``nn.Module``: freeze most weights at freezepack's generator values, train a few.

Each frozen weight becomes a parametrization ``W = frozen * frozen_scale + scatter(mask, values)`` where
``values`` (the trainable entries, row-major) is the layer's *only* ``nn.Parameter``: gradients, momentum and
weight decay exist only for those, so frozen entries stay bit-identical through any optimizer and optimizer
memory scales with 1-q. ``frozen`` is the generator output for (seed, initializer, tensor name), which is why a
file needs only the seed, the initializer, the mask and the values (see :mod:`freezepack.record`).

FreezeNet-WD (weight decay on the frozen weights too, paper sect. 4.2) is applied exactly: under SGD every frozen
entry of a tensor follows the same scalar recursion, so frozen = generator output x one float32 scale per tensor
(:func:`apply_frozen_decay`), and the seed still regenerates them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import SpecError
from ..format.init import InitSpec, generate, make_init
from ..format.record import FreezeRecord, FrozenTensor
from .saliency import freezing_rates, global_mask, grasp_scores, prunable_weights, random_scores, snip_scores

METHODS = ("snip", "grasp", "random")


class FrozenParametrization(nn.Module):
    """``values`` (k,) -> dense weight: frozen generator values with the k trainable entries scattered in."""

    def __init__(self, frozen: torch.Tensor, mask: torch.Tensor, init: InitSpec, seed: int, name: str):
        super().__init__()
        if frozen.shape != mask.shape:
            raise SpecError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(frozen.shape)}", tensor=name)
        self.init, self.seed, self.name = init, int(seed), name
        mask = mask.to(device=frozen.device, dtype=torch.bool)
        self.register_buffer("frozen", frozen.detach().to(torch.float32).contiguous())
        self.register_buffer("mask", mask)
        self.register_buffer("index", mask.reshape(-1).nonzero().squeeze(1), persistent=False)
        self.register_buffer("frozen_scale", torch.ones((), dtype=torch.float32, device=frozen.device))
        # FreezeNet-WD state of the scale's SGD recursion (scale, momentum buffer), kept in float64.
        self.register_buffer("decay_state", torch.tensor([1.0, 0.0], dtype=torch.float64, device=frozen.device))

        self._unit_scale = True  # skip the multiply (one pass over the weight) until FreezeNet-WD scales

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if self._unit_scale:
            return self.frozen.view(-1).index_put((self.index,), values).view(self.frozen.shape)
        w = self.frozen * self.frozen_scale  # a fresh tensor, so the in-place scatter is safe
        return w.view(-1).index_put_((self.index,), values).view(self.frozen.shape)

    def set_frozen_scale(self, scale: float) -> None:
        self.frozen_scale.fill_(scale)
        self._unit_scale = scale == 1.0

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._unit_scale = float(self.frozen_scale) == 1.0

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Dense weight -> its trainable entries (used when the parametrization is installed or assigned)."""
        return weight.detach().reshape(-1)[self.index].clone()


def _split(name: str) -> tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


def _module(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod, attr = _split(name)
    try:
        return model.get_submodule(mod), attr
    except AttributeError:
        raise SpecError(f"model has no module {mod!r}", tensor=name) from None


def frozen_parametrizations(model: nn.Module) -> dict[str, FrozenParametrization]:
    """``{clean tensor name: parametrization}`` of every frozen tensor in the model."""
    out = {}
    for mname, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                if len(plist) == 1 and isinstance(plist[0], FrozenParametrization):
                    out[f"{mname}.{attr}" if mname else attr] = plist[0]
    return out


def trainable_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: bool mask}`` (True = trainable) of every frozen tensor."""
    return {n: p.mask for n, p in frozen_parametrizations(model).items()}


def init_weights(model: nn.Module, seed: int, init: str = "xavier_normal", init_params: dict | None = None,
                 names=None) -> nn.Module:
    """Set Conv/Linear weights from freezepack's generator and their biases to zero (no torch RNG involved)."""
    weights = prunable_weights(model)
    for name in names if names is not None else list(weights):
        if name not in weights:
            raise SpecError("not a Conv/Linear weight of the model", tensor=name)
        w = weights[name]
        spec = make_init(init, w.shape, **(init_params or {}))
        module, _ = _module(model, name)
        with torch.no_grad():
            w.copy_(generate(spec, w.shape, seed, name, device=w.device))
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model


def freeze(model: nn.Module, masks: dict[str, torch.Tensor], seed: int, init: str = "xavier_normal",
           init_params: dict | None = None, *, frozen_init: str | None = None,
           frozen_init_params: dict | None = None) -> nn.Module:
    """Freeze ``model`` in place: every tensor in ``masks`` (True = trainable) becomes a FrozenParametrization.

    Its weights are swapped to the generator's ``init`` values for (seed, name); the trainable entries start
    from those. The frozen entries are the ``frozen_init`` values when given (``"zeros"`` = SNIP pruning),
    else the same ``init`` values. Returns the model.
    """
    weights = prunable_weights(model)
    for name, mask in masks.items():
        if name not in weights:
            raise SpecError("not a Conv/Linear weight of the model (or already frozen)", tensor=name)
        w = weights[name]
        if tuple(mask.shape) != tuple(w.shape):
            raise SpecError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}", tensor=name)
        spec = make_init(init, w.shape, **(init_params or {}))
        start = generate(spec, w.shape, seed, name, device=w.device)
        if frozen_init is None:
            fspec, frozen = spec, start
        else:
            fspec = make_init(frozen_init, w.shape, **(frozen_init_params or {}))
            frozen = generate(fspec, w.shape, seed, name, device=w.device)
        module, attr = _module(model, name)
        with torch.no_grad():
            w.copy_(start)
        parametrize.register_parametrization(
            module, attr, FrozenParametrization(frozen, mask, fspec, seed, name), unsafe=True)
    return model


def make_freezenet(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], q: float, seed: int,
                   method: str = "snip", init: str = "xavier_normal", init_params: dict | None = None, *,
                   reinit: str | None = None, reinit_params: dict | None = None, prune: bool = False,
                   one_per_layer: bool = True) -> nn.Module:
    """The paper's Algorithm 1 on a plain model, in place: init, score one batch, threshold, freeze.

    ``method`` picks the scores (``snip``, ``grasp``, ``random``). ``reinit`` re-initialises all weights with
    another initializer after the mask is chosen (paper sect. 4.5). ``prune=True`` makes the frozen part zero:
    SNIP/GraSP pruning as a baseline, stored with the ``zeros`` initializer.
    """
    if method not in METHODS:
        raise SpecError(f"unknown mask method {method!r} (known: {', '.join(METHODS)})")
    init_weights(model, seed, init, init_params)
    inputs, targets = batch
    if method == "snip":
        scores = snip_scores(model, inputs, targets)
    elif method == "grasp":
        scores = grasp_scores(model, inputs, targets)
    else:
        scores = random_scores(model, seed)
    masks = global_mask(scores, q, seed, one_per_layer=one_per_layer)
    freeze(model, masks, seed, reinit or init, reinit_params if reinit else init_params,
           frozen_init="zeros" if prune else None)
    return model


@torch.no_grad()
def apply_frozen_decay(model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.0) -> None:
    """FreezeNet-WD: one SGD step of weight decay on every frozen part, as a per-tensor scale.

    Call after each ``optimizer.step()`` with the same lr/momentum (torch SGD, no dampening, no Nesterov).
    For a frozen entry w = s*g the decay gradient is wd*s*g, so the momentum buffer is b*g and
    b <- momentum*b + wd*s, s <- s - lr*b: exact for every entry at once.
    """
    for p in frozen_parametrizations(model).values():
        s, b = (float(v) for v in p.decay_state.tolist())
        b = momentum * b + weight_decay * s
        s = s - lr * b
        p.decay_state.copy_(torch.tensor([s, b], dtype=torch.float64))
        p.set_frozen_scale(float(np.float32(s)))


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict under the plain model's names (``conv1.weight``), frozen tensors made dense."""
    out = {}
    for key, t in model.state_dict().items():
        head, sep, rest = key.partition("parametrizations.")
        if sep and (head == "" or head.endswith(".")):
            attr, _, tail = rest.partition(".")
            if tail == "original":
                module = model.get_submodule(head[:-1]) if head else model
                out[head + attr] = getattr(module, attr).detach()
            continue  # the parametrization's own buffers are not part of the plain model
        out[key] = t
    return out


def freeze_record(model: nn.Module, seed: int | None = None) -> FreezeRecord:
    """The model as a :class:`FreezeRecord` (on CPU): frozen tensors by mask + values, everything else whole.

    A plain module gives a record with every tensor in ``whole`` (``seed`` defaults to 0 then).
    """
    params = frozen_parametrizations(model)
    seeds = {p.seed for p in params.values()}
    if len(seeds) > 1:
        raise SpecError(f"frozen tensors use different seeds {sorted(seeds)}; a record holds one seed")
    if seeds:
        (model_seed,) = seeds
        if seed is not None and int(seed) != model_seed:
            raise SpecError(f"seed={seed} differs from the seed {model_seed} the model was frozen with")
        seed = model_seed
    frozen = {}
    for name, p in params.items():
        module, attr = _module(model, name)
        values = module.parametrizations[attr].original.detach()
        frozen[name] = FrozenTensor(init=p.init, mask=p.mask.detach().cpu().clone(),
                                    values=values.to("cpu", torch.float32).clone(),
                                    frozen_scale=float(p.frozen_scale))
    whole = {k: v.detach().cpu().clone() for k, v in dense_state_dict(model).items() if k not in frozen}
    return FreezeRecord(seed=int(seed or 0), frozen=frozen, whole=whole)


def rates(model: nn.Module) -> tuple[float, float]:
    """(q, q_beta) of a frozen model; (0.0, 0.0) for a plain one."""
    masks = trainable_masks(model)
    if not masks:
        return 0.0, 0.0
    return freezing_rates(masks, parameter_count(model))


def parameter_count(model: nn.Module) -> int:
    """Parameters of the plain model (frozen tensors count whole): the denominator of q_beta."""
    frozen = frozen_parametrizations(model)
    n = sum(p.frozen.numel() for p in frozen.values())
    return n + sum(p.numel() for name, p in model.named_parameters() if ".parametrizations." not in "." + name)


def trainable_count(model: nn.Module) -> int:
    """Numbers the optimizer updates: trainable weight entries plus biases, BatchNorm, unfrozen tensors."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
