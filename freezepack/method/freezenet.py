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

import fnmatch
import hashlib
import json
import types
import warnings
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import FreezepackError, MethodError, UsageError
from ..format.init import InitSpec, generate, make_init
from ..format.record import FROZEN_TORCH_DTYPES, FreezeRecord, FrozenTensor
from .saliency import (
    freezing_rates,
    global_mask,
    grasp_scores,
    one_per_layer_fix,
    prunable_weights,
    random_scores,
    tensor_groups,
)
from .snipmask import snip_mask

METHODS = ("snip", "grasp", "random")


class FrozenParametrization(nn.Module):
    """``values`` (k,) -> dense weight: frozen generator values with the k trainable entries scattered in.

    It remembers where its frozen values come from: ``seed``, ``init`` and the generator ``stream`` (the tensor's
    name *when it was frozen*). The stream travels with the tensor, so renaming, wrapping (``DataParallel``,
    ``torch.compile``) or saving a parent module never changes which values a file regenerates. The three are also
    kept in the ``spec`` buffer (JSON bytes), so ``state_dict()`` round trips carry them.
    """

    # its buffers (registered in __init__), declared for type checkers
    frozen: torch.Tensor
    mask: torch.Tensor
    index: torch.Tensor
    frozen_scale: torch.Tensor
    decay_state: torch.Tensor
    spec: torch.Tensor

    def __init__(self, frozen: torch.Tensor, mask: torch.Tensor, init: InitSpec, seed: int, stream: str):
        super().__init__()
        if frozen.shape != mask.shape:
            raise MethodError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(frozen.shape)}", tensor=stream)
        if frozen.dtype not in FROZEN_TORCH_DTYPES:
            raise MethodError(f"a frozen tensor must be float32, float16 or bfloat16, not {frozen.dtype}",
                              tensor=stream)
        self.init, self.seed, self.stream = init, int(seed), str(stream)
        mask = mask.to(device=frozen.device, dtype=torch.bool)
        self.register_buffer("frozen", frozen.detach().contiguous())
        self.register_buffer("mask", mask)
        self.register_buffer("index", _positions(mask), persistent=False)
        self.register_buffer("frozen_scale", torch.ones((), dtype=torch.float32, device=frozen.device))
        # FreezeNet-WD state of the scale's SGD recursion (scale, momentum buffer), kept in float64.
        self.register_buffer("decay_state", torch.tensor([1.0, 0.0], dtype=torch.float64, device=frozen.device))
        self.register_buffer("spec", self._spec_bytes().to(frozen.device))

        self._unit_scale = True  # skip the multiply (one pass over the weight) until FreezeNet-WD scales

    @property
    def name(self) -> str:  # the stream key; older code called it the name
        return self.stream

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if self._unit_scale:
            return self.frozen.view(-1).index_put((self.index,), values).view(self.frozen.shape)
        # frozen x scale in the frozen dtype: one correctly rounded multiply, as a reader does (FORMAT.md §5.3)
        w = self.frozen * self.frozen_scale.to(self.frozen.dtype)  # a fresh tensor: the in-place scatter is safe
        return w.view(-1).index_put_((self.index,), values).view(self.frozen.shape)

    @torch.no_grad()
    def dense_digest(self, values: torch.Tensor, chunk: int = 1 << 22) -> str:
        """SHA-256 of ``forward(values)``'s bytes, computed ``chunk`` elements at a time (the same elementwise
        operations as :meth:`forward`), so a writer proves a big tensor without a dense copy of it."""
        flat, vals = self.frozen.reshape(-1), values.detach().reshape(-1)
        scale = self.frozen_scale.to(self.frozen.dtype)
        pos = self.index.cpu().numpy()
        h = hashlib.sha256()
        buf = torch.empty(min(chunk, flat.numel()), dtype=flat.dtype, device=flat.device)  # one buffer, reused:
        for s in range(0, flat.numel(), chunk):  # no allocation per chunk for the heap to keep afterwards
            e = min(s + chunk, flat.numel())
            w = buf[:e - s]
            if self._unit_scale:
                w.copy_(flat[s:e])
            else:
                torch.mul(flat[s:e], scale, out=w)
            lo, hi = (int(v) for v in np.searchsorted(pos, [s, e]))
            if hi > lo:
                w.index_put_((self.index[lo:hi] - s,), vals[lo:hi])
            h.update(w.cpu().contiguous().view(torch.uint8).numpy().data)
        return h.hexdigest()

    def set_frozen_scale(self, scale: float) -> None:
        self.frozen_scale.fill_(scale)
        self._unit_scale = scale == 1.0

    def _spec_bytes(self) -> torch.Tensor:
        text = json.dumps({"stream": self.stream, "seed": str(self.seed), "init": self.init.to_json()},
                          sort_keys=True, separators=(",", ":"))
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The origin (stream, seed, init) travels as a uint8 buffer of JSON, so a state_dict stays tensors only
        # (safetensors- and weights_only-loadable). It may differ in length from ours: take its size first.
        spec = state_dict.get(prefix + "spec")
        if isinstance(spec, torch.Tensor) and spec.dtype == torch.uint8 and spec.dim() == 1:
            self.spec = torch.empty_like(spec, device=self.spec.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        try:
            d = json.loads(bytes(self.spec.cpu().numpy()).decode("utf-8"))
            self.stream, self.seed, self.init = str(d["stream"]), int(d["seed"]), InitSpec.from_json(d["init"])
        except (ValueError, KeyError, TypeError, FreezepackError) as e:
            raise MethodError(f"not a freezepack frozen-tensor state ({prefix}spec): {e}") from None
        self._unit_scale = float(self.frozen_scale) == 1.0
        self.index = _positions(self.mask)  # a loaded mask brings its own positions

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Dense weight -> its trainable entries (used when the parametrization is installed or assigned)."""
        return torch.index_select(weight.detach().reshape(-1), 0, self.index)  # a fresh tensor


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Ascending int64 positions of the True entries of a mask, flattened (numpy's is several times faster on CPU)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()).astype(np.int64, copy=False))
    return mask.reshape(-1).nonzero().squeeze(1)


def _split(name: str) -> tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


def _module(model: nn.Module, name: str) -> tuple[Any, str]:
    """(the submodule holding tensor ``name``, the attribute): Any, as its ``parametrizations`` are not typed."""
    mod, attr = _split(name)
    try:
        return model.get_submodule(mod), attr
    except AttributeError:
        raise MethodError(f"model has no module {mod!r}", tensor=name) from None


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside ``DataParallel`` / ``DistributedDataParallel`` / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = cast(nn.Module, model.module)
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


def frozen_parametrizations(model: nn.Module) -> dict[str, FrozenParametrization]:
    """``{clean tensor name: parametrization}`` of every frozen tensor in the model (tied names share one)."""
    out = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                if len(plist) == 1 and isinstance(plist[0], FrozenParametrization):
                    out[f"{mname}.{attr}" if mname else attr] = plist[0]
    return out


def trainable_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: bool mask}`` (True = trainable) of every frozen tensor, each tied tensor once."""
    out, seen = {}, set()
    for n, p in frozen_parametrizations(model).items():
        if id(p) not in seen:
            seen.add(id(p))
            out[n] = p.mask
    return out


def _resolve_init(init, name: str, shape, init_params: dict | None) -> InitSpec:
    """``init``: an initializer name for every tensor, or ``{glob: name}`` (first match wins; ``*`` = default)."""
    if isinstance(init, dict):
        for pat, ini in init.items():
            if fnmatch.fnmatchcase(name, pat):
                return make_init(ini, shape, **(init_params or {}))
        raise UsageError(f"no initializer pattern matches {name!r} (add a '*' entry)", tensor=name)
    return make_init(init, shape, **(init_params or {}))


def model_init(model: nn.Module) -> tuple[str, dict]:
    """The model's own initializer where the spec has it: ``("normal", {"mean": 0, "std": s})`` for a model whose
    ``config`` names its std (transformers' ``initializer_range``, or ``init_std``). Special cases a model's own
    init code adds per layer (GPT-2 scales its residual projections by 1/sqrt(2 n_layer), zero padding rows) are
    not part of it: one distribution per model."""
    config = getattr(unwrap(model), "config", None)
    for key in ("initializer_range", "init_std"):
        std = getattr(config, key, None)
        if isinstance(std, (int, float)) and not isinstance(std, bool) and std > 0:
            return "normal", {"mean": 0.0, "std": float(std)}
    raise UsageError(f"init='model': {type(unwrap(model)).__name__} has no config.initializer_range (or init_std) "
                     "to take the std from; pass init='normal', init_params={'std': ...} instead")


def init_weights(model: nn.Module, seed: int, init="xavier_normal", init_params: dict | None = None,
                 names=None, *, select=None, zero_biases: bool = True) -> nn.Module:
    """Set the selected weights from freezepack's generator (stream = their name) and, with ``zero_biases``,
    their layers' biases to zero (no torch RNG involved: the paper's experiments). Tied weights are set once."""
    weights = prunable_weights(model, select)
    for name in names if names is not None else list(weights):
        if name not in weights:
            raise UsageError("not a freezable weight of the model (see select=)", tensor=name)
        w = weights[name]
        spec = _resolve_init(init, name, w.shape, init_params)
        module, attr = _module(model, name)
        with torch.no_grad():
            if w.dtype == torch.float32 and w.is_contiguous():
                generate(spec, w.shape, seed, name, out=w.detach())  # straight into the weight's storage
            else:
                w.copy_(generate(spec, w.shape, seed, name, device=w.device))  # rounds to w's dtype (RNE)
            bias = getattr(module, "bias", None) if attr == "weight" and zero_biases else None
            if isinstance(bias, torch.Tensor) and bias is not w:
                bias.zero_()
    return model


def freeze(model: nn.Module, masks: dict[str, torch.Tensor], seed: int, init="xavier_normal",
           init_params: dict | None = None, *, frozen_init: str | None = None,
           frozen_init_params: dict | None = None, select=None, progress=None,
           _weights_hold_init: bool = False) -> nn.Module:
    """Freeze ``model`` in place: every tensor in ``masks`` (True = trainable) becomes a FrozenParametrization.

    Its weights are swapped to the generator's ``init`` values for (seed, name); the trainable entries start
    from those. The frozen entries are the ``frozen_init`` values when given (``"zeros"`` = SNIP pruning),
    else the same ``init`` values. A tied tensor is frozen once and stays tied. Returns the model.
    ``progress(done, total)`` is called after each tensor. (``_weights_hold_init``: make_freezenet's promise that
    the weights already hold exactly these ``init`` values, so they are frozen as they are, not regenerated.)
    """
    groups = tensor_groups(model, select if select is not None else (lambda n, t: True))
    for i, (name, mask) in enumerate(masks.items()):
        if progress is not None and i:
            progress(i, len(masks))
        if name not in groups:
            hint = " (already frozen?)" if name in frozen_parametrizations(model) else ""
            raise MethodError(f"not a freezable tensor of the model{hint}", tensor=name)
        w = model.get_parameter(name)
        if tuple(mask.shape) != tuple(w.shape):
            raise MethodError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}", tensor=name)
        if w.dtype not in FROZEN_TORCH_DTYPES:
            raise MethodError(f"cannot freeze a {w.dtype} tensor (float32, float16, bfloat16 only)", tensor=name)
        spec = _resolve_init(init, name, w.shape, init_params)
        # (held: the weight's own storage becomes the frozen buffer; registering the parametrization below points
        # the Parameter at the values vector, so the two never alias)
        start = w.detach() if _weights_hold_init else generate(spec, w.shape, seed, name, device=w.device)
        if frozen_init is None:
            fspec, frozen = spec, start
        else:
            fspec = make_init(frozen_init, w.shape, **(frozen_init_params or {}))
            frozen = generate(fspec, w.shape, seed, name, device=w.device)
        if not _weights_hold_init:
            with torch.no_grad():
                w.copy_(start)
        p = FrozenParametrization(frozen.to(w.dtype), mask, fspec, seed, name)
        module, attr = _module(model, name)
        # torch turns the registered Parameter *in place* into the values vector (set_), which would corrupt every
        # other module holding it: give each tied alias a private copy first, then share the values below.
        for alias in groups[name][1:]:
            amod, aattr = _module(model, alias)
            setattr(amod, aattr, nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad))
        parametrize.register_parametrization(module, attr, p, unsafe=True)
        values = module.parametrizations[attr].original
        for alias in groups[name][1:]:  # tied: the same parametrization and the same values Parameter
            amod, aattr = _module(model, alias)
            parametrize.register_parametrization(amod, aattr, p, unsafe=True)
            amod.parametrizations[aattr].original = values
    if progress is not None and masks:
        progress(len(masks), len(masks))
    guard_save_pretrained(model)
    return model


def save_pretrained_dense(model: nn.Module, save_directory, *args, **kwargs):
    """transformers' ``save_pretrained`` for a FreezeNet: the dense model (frozen tensors made whole, plain names,
    a tied tensor one object under its names so transformers stores it once), which transformers'
    ``from_pretrained`` loads bit-exactly as a plain model. For the small file: ``freezepack.hf.save_pretrained``.
    """
    target = unwrap(model)
    if frozen_parametrizations(target) and kwargs.get("state_dict") is None:
        state = dense_state_dict(target)
        for alias, first in _tied_names(target).items():
            if alias in state and first in state:
                state[alias] = state[first]
        kwargs["state_dict"] = state
        warnings.warn(f"{type(target).__name__} is a FreezeNet: save_pretrained writes the dense model; "
                      "freezepack.hf.save_pretrained(model, dir) writes it as seed + mask + trained values "
                      "(load with freezepack.hf.from_pretrained)", UserWarning, stacklevel=3)
    cls: Any = type(target)  # a transformers PreTrainedModel (not imported here)
    return cls.save_pretrained(target, save_directory, *args, **kwargs)


def guard_save_pretrained(model: nn.Module) -> None:
    """A frozen transformers model's own ``save_pretrained`` would write parametrization keys that its
    ``from_pretrained`` silently re-initialises: give each such (sub)model one that writes the dense model.
    Found by duck typing (a ``save_pretrained`` method and a ``config``), so transformers is not imported."""
    for m in model.modules():
        if callable(getattr(type(m), "save_pretrained", None)) and hasattr(m, "config") \
                and "save_pretrained" not in vars(m) and frozen_parametrizations(m):
            cast(Any, m).save_pretrained = types.MethodType(save_pretrained_dense, m)


def make_freezenet(model: nn.Module, batch, q: float, seed: int, method: str = "snip", init="xavier_normal",
                   init_params: dict | None = None, *, reinit: str | None = None, reinit_params: dict | None = None,
                   prune: bool = False, one_per_layer: bool = True, select=None, loss_fn=None,
                   biases: str = "keep", progress=None) -> nn.Module:
    """The paper's Algorithm 1 on a plain model, in place: init, score one batch, threshold, freeze.

    ``method`` picks the scores (``snip``, ``grasp``, ``random``); scoring runs with dropout off, so the mask is a
    function of (model, batch, seed). ``select`` picks the tensors to freeze (default: the weights of Linear,
    Conv*/ConvTranspose*, Embedding, Bilinear, MultiheadAttention's input projections and any other layer that
    multiplies by a matrix ``weight``, such as transformers' Conv1D; or names / globs / ``re:`` patterns /
    ``f(name, tensor) -> bool``). ``loss_fn(model, batch) -> scalar`` scores any model (default: cross-entropy of
    ``model(batch[0])`` against ``batch[1]``). ``init``: an initializer name, ``{glob: name}``, or ``"model"``: the
    model's own distribution where the spec has it (normal with ``config.initializer_range``; :func:`model_init`).
    ``biases``: ``"keep"`` leaves every trainable parameter as the model has it; ``"zeros"`` zeroes the frozen
    layers' biases (the paper's setup). ``reinit`` re-initialises all weights with another initializer after the
    mask is chosen (paper sect. 4.5). ``prune=True`` makes the frozen part zero: SNIP/GraSP pruning as a baseline.
    Warns (:class:`FrozenShareWarning`) when the frozen share of all parameters is far below ``q``.
    ``progress(done, total)``: called after initialising, scoring and thresholding, then per frozen tensor.
    """
    if method not in METHODS:
        raise UsageError(f"unknown mask method {method!r} (known: {', '.join(METHODS)})")
    if biases not in ("keep", "zeros"):
        raise UsageError(f"biases must be 'keep' or 'zeros', got {biases!r}")
    target = unwrap(model)
    if frozen_parametrizations(target):
        raise MethodError(f"{type(target).__name__} is already a FreezeNet; make_freezenet takes a plain model "
                          "(to continue training from a file use freezepack.load_freezenet)")
    if init == "model":
        init, init_params = model_init(target)
    if reinit == "model":
        reinit, reinit_params = model_init(target)
    init_weights(target, seed, init, init_params, select=select, zero_biases=biases == "zeros")
    total = 3 + len(prunable_weights(target, select))
    step = (lambda done: None) if progress is None else (lambda done: progress(done, total))
    step(1)
    if method == "snip":  # scored and thresholded in one backward pass, no score per weight held
        masks = snip_mask(model, batch, q, seed, one_per_layer=False, loss_fn=loss_fn, select=select)
        masks = {_strip(n, model, target): m for n, m in masks.items()}
        step(2)
        if one_per_layer:
            one_per_layer_fix(masks, seed)
    else:
        if method == "grasp":
            scores = grasp_scores(model, batch, loss_fn=loss_fn, select=select)
        else:
            scores = random_scores(target, seed, select=select, stored=False)  # regenerated per pass, never held
        scores = {_strip(n, model, target): s for n, s in scores.items()}
        step(2)
        masks = global_mask(scores, q, seed, one_per_layer=one_per_layer)
        del scores
    step(3)
    freeze(target, masks, seed, reinit or init, reinit_params if reinit else init_params,
           frozen_init="zeros" if prune else None, progress=lambda done, _: step(3 + done),
           _weights_hold_init=reinit is None)  # init_weights set exactly these values; scoring only read them
    _warn_if_share_far(target, q)
    return model


class FrozenShareWarning(UserWarning):
    """make_freezenet froze much less of the model than q asked (its large tensors are outside the frozen set)."""


def _warn_if_share_far(model: nn.Module, q: float) -> None:
    """q counts the selected weights; what a user sees (file size, optimizer memory) is the share of all
    parameters. Biases and norms make the two differ a little; a whole large tensor left out makes them differ a
    lot, and then the user should hear which tensors those are."""
    total = parameter_count(model)
    trainable = trainable_count(model)
    if total == 0 or trainable <= 2 * (1 - q) * total + 0.01 * total:
        return
    left = sorted(((p.numel(), n) for n, p in model.named_parameters()
                   if ".parametrizations." not in "." + n and p.requires_grad), reverse=True)[:3]
    names = ", ".join(f"{n} ({k})" for k, n in left)
    warnings.warn(f"q={q} froze {1 - trainable / total:.1%} of {type(model).__name__}'s {total} parameters: "
                  f"{trainable} stay trainable, the largest of them whole tensors outside the frozen set ({names}); "
                  "pass select= to freeze them too", FrozenShareWarning, stacklevel=3)


def _strip(name: str, model: nn.Module, target: nn.Module) -> str:
    """A name seen through wrappers (``module.``, ``_orig_mod.``) as the unwrapped model's name."""
    m: Any = model
    while m is not target:
        prefix = "module." if hasattr(m, "module") and isinstance(m.module, nn.Module) else "_orig_mod."
        name = name[len(prefix):] if name.startswith(prefix) else name
        m = m.module if prefix == "module." else m._orig_mod
    return name


@torch.no_grad()
def apply_frozen_decay(model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.0) -> None:
    """FreezeNet-WD: one SGD step of weight decay on every frozen part, as a per-tensor scale.

    Call after each ``optimizer.step()`` with the same lr/momentum (torch SGD, no dampening, no Nesterov).
    For a frozen entry w = s*g the decay gradient is wd*s*g, so the momentum buffer is b*g and
    b <- momentum*b + wd*s, s <- s - lr*b: exact for every entry at once.
    """
    for p in {id(p): p for p in frozen_parametrizations(model).values()}.values():  # tied tensors once
        if p.frozen.dtype != torch.float32:
            raise MethodError(f"FreezeNet-WD needs float32 frozen tensors, this one is {p.frozen.dtype}",
                              tensor=p.stream)
        s, b = (float(v) for v in p.decay_state.tolist())
        b = momentum * b + weight_decay * s
        s = s - lr * b
        p.decay_state.copy_(torch.tensor([s, b], dtype=torch.float64))
        p.set_frozen_scale(float(np.float32(s)))


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict under the plain model's names (``conv1.weight``), frozen tensors made dense: exactly
    the weights the forward pass uses."""
    return {name: get() for name, get in dense_tensors(model).items()}


def dense_tensors(model: nn.Module) -> dict:
    """``{name: () -> tensor}`` in :func:`dense_state_dict` order: each frozen tensor made dense only when asked
    for, so a caller that walks a big model tensor by tensor never holds a second dense copy of it."""
    out: dict[str, Callable[..., torch.Tensor]] = {}
    for key, t in model.state_dict().items():
        head, sep, rest = key.partition("parametrizations.")
        if sep and (head == "" or head.endswith(".")):
            attr, _, tail = rest.partition(".")
            if tail == "original":
                module = model.get_submodule(head[:-1]) if head else model
                out[head + attr] = lambda module=module, attr=attr: getattr(module, attr).detach()
            continue  # the parametrization's own buffers are not part of the plain model
        out[key] = lambda t=t: t
    return out


def _tied_names(model: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for every tensor that appears under several state_dict names (tied weights)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in frozen_parametrizations(model).items():
        key = id(p)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    for name, t in model.state_dict(keep_vars=True).items():
        if ".parametrizations." in "." + name:
            continue
        key = id(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def freeze_record(model: nn.Module, seed: int | None = None, *, copy: bool = True) -> FreezeRecord:
    """The model as a :class:`FreezeRecord` (on CPU): frozen tensors by mask + values + their own generator
    stream, tied tensors once (``aliases``), everything else whole. Wrappers (DataParallel, DDP, torch.compile)
    are looked through. A plain module gives a record with every tensor in ``whole`` (``seed`` defaults to 0).
    ``copy=False`` shares the model's CPU masks and values instead of copying them (a writer that only reads them).
    """
    keep = (lambda t: t.clone()) if copy else (lambda t: t)
    model = unwrap(model)
    params = frozen_parametrizations(model)
    seeds = {p.seed for p in params.values()}
    if len(seeds) > 1:
        raise MethodError(f"frozen tensors use different seeds {sorted(seeds)}; a file holds one seed")
    if seeds:
        (model_seed,) = seeds
        if seed is not None and int(seed) != model_seed:
            raise UsageError(f"seed={seed} differs from the seed {model_seed} the model was frozen with")
        seed = model_seed
    aliases = _tied_names(model)
    frozen = {}
    for name, p in params.items():
        if name in aliases:
            continue
        module, attr = _module(model, name)
        values = module.parametrizations[attr].original.detach()
        if values.dtype != p.frozen.dtype:
            raise MethodError(f"trainable values are {values.dtype} but the frozen part is {p.frozen.dtype}; "
                              "convert the whole model with .to(dtype)", tensor=name)
        frozen[name] = FrozenTensor(init=p.init, mask=keep(p.mask.detach().cpu()),
                                    values=keep(values.to("cpu")), frozen_scale=float(p.frozen_scale),
                                    stream=None if p.stream == name else p.stream)
    whole = {k: get().detach().cpu().clone() for k, get in dense_tensors(model).items()
             if k not in frozen and k not in aliases}
    return FreezeRecord(seed=int(seed or 0), frozen=frozen, whole=whole, aliases=aliases)


def rates(model: nn.Module) -> tuple[float, float]:
    """(q, q_beta) of a frozen model; (0.0, 0.0) for a plain one."""
    masks = trainable_masks(model)
    if not masks:
        return 0.0, 0.0
    return freezing_rates(masks, parameter_count(model))


def parameter_count(model: nn.Module) -> int:
    """Parameters of the plain model (frozen tensors count whole, tied ones once): the denominator of q_beta."""
    frozen = {id(p): p for p in frozen_parametrizations(model).values()}
    n = sum(p.frozen.numel() for p in frozen.values())
    return n + sum(p.numel() for name, p in model.named_parameters() if ".parametrizations." not in "." + name)


def trainable_count(model: nn.Module) -> int:
    """Numbers the optimizer updates: trainable weight entries plus biases, BatchNorm, unfrozen tensors."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
