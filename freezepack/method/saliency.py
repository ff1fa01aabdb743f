"""Which weights to train: saliency scores and one global threshold (the paper's Algorithm 1, steps 1-4).

Every scorer returns ``{name: score tensor}`` over the *prunable* weights (the ``weight`` of each Conv/Linear
layer; biases and BatchNorm parameters stay trainable and do not count in q) with one convention: **higher =
more worth training**. :func:`global_mask` then keeps exactly ``floor((1-q) * |W|)`` of them over all layers
together, plus one random weight in any layer that would otherwise have none (paper, sect. 4).
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..errors import UsageError
from ..format import rng

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{state_dict name: weight}`` of every Conv/Linear weight not already frozen, in module order."""
    out = {}
    for mname, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and not parametrize.is_parametrized(module, "weight"):
            out[f"{mname}.weight" if mname else "weight"] = module.weight
    return out


def _weights_for_scoring(model: nn.Module) -> dict[str, torch.Tensor]:
    weights = prunable_weights(model)
    if not weights:
        raise UsageError(f"{type(model).__name__} has no Conv/Linear weight to score")
    if any(not w.requires_grad for w in weights.values()):
        raise UsageError("score the plain model before freezing it: a weight does not require grad")
    return weights


def snip_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """SNIP saliency (paper eq. 1): |dL/dW * W| of the current weights on one batch, normalised to sum 1."""
    weights = _weights_for_scoring(model)
    loss = F.cross_entropy(model(inputs), targets)
    grads = torch.autograd.grad(loss, list(weights.values()))
    scores = {n: (g * w).detach().abs() for (n, w), g in zip(weights.items(), grads)}
    total = sum(float(s.sum()) for s in scores.values())
    if total > 0 and math.isfinite(total):
        scores = {n: s / total for n, s in scores.items()}
    return scores


def grasp_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 temperature: float = 200.0) -> dict[str, torch.Tensor]:
    """GraSP (Wang et al. 2020): ``theta * Hg``, the negation of their score S(-theta) = -theta * Hg.

    GraSP removes the weights with the highest S, i.e. keeps the highest ``theta * Hg``, which matches our
    "higher = train it" convention. H is the Hessian of the loss (logits divided by ``temperature``, as in the
    official code), g its gradient, Hg one Hessian-vector product by double backward.
    """
    weights = _weights_for_scoring(model)
    params = list(weights.values())
    loss = F.cross_entropy(model(inputs) / temperature, targets)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    z = sum((g * g.detach()).sum() for g in grads)
    hg = torch.autograd.grad(z, params)
    return {n: (w * h).detach() for (n, w), h in zip(weights.items(), hg)}


def random_scores(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Uniform scores from freezepack's generator (stream per tensor name): a random mask, reproducible by seed."""
    out = {}
    for name, w in prunable_weights(model).items():
        words = rng.words_torch(seed, rng.stream_id("freezepack.random-mask:" + name), 0, w.numel())
        out[name] = rng.uniform_torch(words).view(w.shape)
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
    names = list(scores)
    flat = [scores[n].detach().reshape(-1).to("cpu", torch.float64) for n in names]
    sizes = [f.numel() for f in flat]
    allscores = torch.nan_to_num(torch.cat(flat), nan=-math.inf)
    k = weights_to_train(allscores.numel(), q)
    keep = torch.zeros(allscores.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(allscores, descending=True, stable=True).indices
        keep[order[:k]] = True
    masks = {}
    for name, part, shape in zip(names, keep.split(sizes), (scores[n].shape for n in names)):
        m = part.clone()
        if one_per_layer and m.numel() and not m.any():
            m[_one_per_layer_index(seed, name, m.numel())] = True
        masks[name] = m.view(shape)
    return masks


def freezing_rates(masks: dict[str, torch.Tensor], total_params: int) -> tuple[float, float]:
    """(q, q_beta): frozen share of the masked weights, and of all parameters (biases, BN count as trained)."""
    num_w = sum(m.numel() for m in masks.values())
    trained_w = sum(int(m.sum()) for m in masks.values())
    if num_w == 0 or total_params < num_w:
        raise UsageError(f"total_params={total_params} must be at least the {num_w} masked weights")
    others = total_params - num_w
    return 1 - trained_w / num_w, 1 - (trained_w + others) / total_params
