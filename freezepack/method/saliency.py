"""Which weights to train: saliency scores and one global threshold (the paper's Algorithm 1, steps 1-4).

Every scorer returns ``{name: score tensor}`` over the *prunable* weights (the ``weight`` of each Conv/Linear
layer; biases and BatchNorm parameters stay trainable and do not count in q) with one convention: **higher =
more worth training**. :func:`global_mask` then keeps exactly ``floor((1-q) * |W|)`` of them over all layers
together, plus one random weight in any layer that would otherwise have none (paper, sect. 4).
"""
from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..errors import FreezepackError, MethodError, UsageError
from ..format import rng
from ..format.init import generate, make_init
from .topk import Generated, top_k_masks

# Layers whose weight is frozen by default: every dense linear map of an ordinary model. Norms and biases stay
# trainable (they are few and the paper trains them); anything else is reachable with ``select``. Layers of other
# libraries that keep a matrix ``weight`` and use it as a linear map (transformers' ``Conv1D``: a Linear with the
# weight transposed) are found by that shape, not by their class, so no optional library is imported here.
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag, nn.Bilinear)
# nn.MultiheadAttention keeps its input projections as raw parameters (out_proj is an nn.Linear).
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

LossFn = Callable[[nn.Module, object], torch.Tensor]


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """The paper's loss: ``batch = (inputs, class labels)``, cross-entropy of the model's logits."""
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def _default_selected(module: nn.Module, attr: str) -> bool:
    if isinstance(module, PRUNABLE_TYPES):
        return attr == "weight"
    if isinstance(module, nn.MultiheadAttention):
        return attr in _MHA_WEIGHTS
    return attr == "weight" and is_matrix_layer(module)


def is_matrix_layer(module: nn.Module) -> bool:
    """A layer outside torch's own types whose ``weight`` is a matrix it multiplies by (Conv1D and look-alikes):
    a ``weight`` of >= 2 dimensions and no submodules (a container's weight would be something else)."""
    w = module._parameters.get("weight")
    return isinstance(w, torch.Tensor) and w.dim() >= 2 and not module._modules


def _selector(select) -> Callable[[str, nn.Module, str], bool]:
    """``select``: None (default layers), a name / glob / ``re:regex`` or a list of them, or ``f(name, tensor)``."""
    if select is None:
        return lambda name, module, attr: _default_selected(module, attr)
    if callable(select):
        return lambda name, module, attr: bool(select(name, getattr(module, attr)))
    pats = [select] if isinstance(select, str) else list(select)
    if not pats or not all(isinstance(x, str) and x for x in pats):
        raise UsageError(f"select must be None, a callable, or name/glob/'re:' patterns, got {select!r}")
    compiled = []
    for x in pats:
        try:
            compiled.append(re.compile(x[3:]) if x.startswith("re:") else re.compile(fnmatch.translate(x)))
        except re.error as e:
            raise UsageError(f"select pattern {x!r} is not a valid regular expression: {e}") from None
    return lambda name, module, attr: any(c.fullmatch(name) for c in compiled)


def tensor_groups(model: nn.Module, select=None) -> dict[str, list[str]]:
    """``{canonical name: [every name of that tensor]}`` for the selected, not yet frozen parameters.

    Tied parameters (one ``nn.Parameter`` in several modules, e.g. an LM's input and output embedding) form one
    group: frozen once, under the first name in module order, and stay shared.
    """
    choose = _selector(select)
    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        if parametrize.is_parametrized(module) and hasattr(module, "parametrizations"):
            skip = set(module.parametrizations.keys())
        else:
            skip = set()
        for attr, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if attr in skip or ".parametrizations." in f".{mname}.":
                continue
            name = f"{mname}.{attr}" if mname else attr
            groups.setdefault(id(param), [])
            if name not in groups[id(param)]:
                groups[id(param)].append(name)
            tensors[id(param)] = param
    out = {}
    for key, names in groups.items():
        first = names[0]
        module = model.get_submodule(first.rpartition(".")[0])
        if choose(first, module, first.rpartition(".")[2]) and tensors[key].is_floating_point():
            out[first] = names
    return out


def prunable_weights(model: nn.Module, select=None) -> dict[str, torch.Tensor]:
    """``{state_dict name: weight}`` of every selected tensor not already frozen, in module order, ties once."""
    return {name: model.get_parameter(name) for name in tensor_groups(model, select)}


def _weights_for_scoring(model: nn.Module, select=None) -> dict[str, torch.Tensor]:
    weights = prunable_weights(model, select)
    if not weights:
        raise MethodError(f"{type(model).__name__} has no tensor to freeze (select={select!r})")
    if any(not w.requires_grad for w in weights.values()):
        raise MethodError("score the plain model before freezing it: a selected weight does not require grad")
    return weights


def _loss(model: nn.Module, batch, loss_fn: LossFn | None, what: str) -> torch.Tensor:
    """Run the user's loss; any failure inside becomes a MethodError that names the step."""
    try:
        loss = (loss_fn or default_loss)(model, batch)
    except FreezepackError:
        raise
    except Exception as e:  # user code: a model, a batch and a loss we know nothing about
        hint = "" if loss_fn else " (the default loss needs batch = (inputs, labels) and class logits: pass loss_fn)"
        raise MethodError(f"{what}: computing the loss failed: {type(e).__name__}: {e}{hint}") from e
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise MethodError(f"{what}: loss_fn must return a floating-point scalar tensor, got {_describe(loss)}")
    if not torch.isfinite(loss.detach()).all():
        raise MethodError(f"{what}: the loss is not finite ({float(loss.detach())})")
    return loss.reshape(())


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


@contextmanager
def scoring_mode(model: nn.Module):
    """Score deterministically: dropout (and everything else a module does only in training: stochastic depth,
    attention dropout inside transformers' layers) is off, by putting every module but batch norm in eval mode;
    batch norm keeps its mode (batch statistics are part of the loss the paper scores). Each module's own mode is
    restored afterwards, so a model built in train mode stays in train mode."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in modes:
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.training = False
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _grad(what: str, outputs, inputs, **kw):
    try:
        return torch.autograd.grad(outputs, inputs, allow_unused=True, **kw)
    except RuntimeError as e:
        raise MethodError(f"{what}: backward failed: {e}") from e


def snip_scores(model: nn.Module, inputs, targets=None, *, loss_fn: LossFn | None = None,
                select=None) -> dict[str, torch.Tensor]:
    """SNIP saliency (paper eq. 1): |dL/dW * W| of the current weights on one batch, normalised to sum 1.

    Deterministic: dropout is off while scoring (:func:`scoring_mode`), so (model, batch, seed) gives one mask.

    ``inputs`` is the batch (with ``targets`` the paper's ``(inputs, labels)``); ``loss_fn(model, batch)`` makes
    any model scoreable (language models, dict batches, tuple outputs).
    """
    batch = inputs if targets is None else (inputs, targets)
    weights = _weights_for_scoring(model, select)
    with scoring_mode(model):
        loss = _loss(model, batch, loss_fn, "SNIP scoring")
        grads = list(_grad("SNIP scoring", loss, list(weights.values())))
        del loss
    scores = {}
    for i, (n, w) in enumerate(weights.items()):  # each gradient becomes its score in place: no second copy
        g, grads[i] = grads[i], None
        scores[n] = g.mul_(w.detach()).abs_() if g is not None else torch.zeros_like(w)
    return normalise(scores)


def normalise(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In place, SNIP's normalisation: every score divided by the sum of all (float32 sum per tensor, added up in
    order as Python floats); left as it is when that sum is zero or not finite. (:mod:`.snipmask` repeats it.)"""
    total = sum(float(s.sum()) for s in scores.values())
    if total > 0 and math.isfinite(total):
        for s in scores.values():
            s.div_(total)
    return scores


def grasp_scores(model: nn.Module, inputs, targets=None, temperature: float = 200.0, *,
                 loss_fn: LossFn | None = None, select=None) -> dict[str, torch.Tensor]:
    """GraSP (Wang et al. 2020): ``theta * Hg``, the negation of their score S(-theta) = -theta * Hg.

    GraSP removes the weights with the highest S, i.e. keeps the highest ``theta * Hg``, which matches our
    "higher = train it" convention. H is the Hessian of the loss (logits divided by ``temperature``, as in the
    official code), g its gradient, Hg one Hessian-vector product by double backward.
    """
    batch = inputs if targets is None else (inputs, targets)
    weights = _weights_for_scoring(model, select)
    params = list(weights.values())
    if loss_fn is None:  # the official code divides the logits by the temperature
        def loss_fn(m, b):
            return F.cross_entropy(m(b[0]) / temperature, b[1])
    with scoring_mode(model):
        loss = _loss(model, batch, loss_fn, "GraSP scoring")
        grads = _grad("GraSP scoring", loss, params, create_graph=True)
        z = sum((g * g.detach()).sum() for g in grads if g is not None)
        if not isinstance(z, torch.Tensor) or not z.requires_grad:
            return {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
        hg = _grad("GraSP scoring", z, params)
    return {n: (w * h).detach() if h is not None else torch.zeros_like(w)
            for (n, w), h in zip(weights.items(), hg)}


def random_scores(model: nn.Module, seed: int, *, select=None, stored: bool = True) -> dict:
    """Uniform scores from freezepack's generator (stream per tensor name): a random mask, reproducible by seed.
    ``stored=False``: :class:`topk.Generated` scores for :func:`global_mask`, regenerated piece by piece in each of
    its passes instead of held (no dense copy of the model's size)."""
    u = make_init("uniform")  # 0 + 1*u: exactly the generator's uniform u, through the compiled kernel when built
    out: dict[str, Any] = {}
    for name, w in prunable_weights(model, select).items():
        stream = "freezepack.random-mask:" + name
        if stored:
            out[name] = generate(u, w.shape, seed, stream, device="cpu")
        else:
            out[name] = Generated(w.shape, lambda start, count, threads=None, stream=stream: generate(
                u, (count,), seed, stream, start=start, threads=threads))
    return out


def weights_to_train(num_weights: int, q: float) -> int:
    """floor((1 - q) * |W|) computed on q's decimal value, so q=0.99 of 430,500 is exactly 4,305."""
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
        raise UsageError(f"freezing rate q must be a number in [0, 1], got {q!r}")
    return math.floor((1 - Fraction(repr(float(q)))) * num_weights)


def _one_per_layer_index(seed: int, name: str, numel: int) -> int:
    word = int(rng.words_np(seed, rng.stream_id("freezepack.one-per-layer:" + name), 0, 1)[0])
    return word % numel


def global_mask(scores: dict[str, torch.Tensor], q: float, seed: int = 0,
                one_per_layer: bool = True) -> dict[str, torch.Tensor]:
    """Boolean masks (True = trainable) keeping the top ``floor((1-q)|W|)`` scores over all tensors at once.

    Ties are broken by position (a stable sort over the tensors in ``scores`` order), so the mask is a pure
    function of the scores. With ``one_per_layer``, a tensor left with no trainable entry gets one, chosen by
    freezepack's generator from ``seed`` and the tensor name.
    """
    if not scores:
        raise UsageError("no scores to threshold")
    names = list(scores)  # tensors, or topk.Generated scores
    k = weights_to_train(sum(scores[n].numel() for n in names), q)
    # radix selection (freezepack.method.topk): the same k entries a stable descending sort keeps, in O(n)
    masks = dict(zip(names, top_k_masks([scores[n] for n in names], k)))
    if one_per_layer:
        one_per_layer_fix(masks, seed)
    return masks


def one_per_layer_fix(masks: dict[str, torch.Tensor], seed: int) -> None:
    """In place: a CPU mask with no trainable entry gets one, chosen by the generator from ``seed`` and its name."""
    for name, m in masks.items():
        flat = m.view(-1)
        if flat.numel() and not flat.numpy().any():  # (numpy's any stops at the first True)
            flat[_one_per_layer_index(seed, name, flat.numel())] = True


def freezing_rates(masks: dict[str, torch.Tensor], total_params: int) -> tuple[float, float]:
    """(q, q_beta): frozen share of the masked weights, and of all parameters (biases, BN count as trained)."""
    num_w = sum(m.numel() for m in masks.values())
    trained_w = sum(int(m.sum()) for m in masks.values())
    if num_w == 0 or total_params < num_w:
        raise UsageError(f"total_params={total_params} must be at least the {num_w} masked weights")
    others = total_params - num_w
    return 1 - trained_w / num_w, 1 - (trained_w + others) / total_params
