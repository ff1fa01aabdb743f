"""SNIP's mask in one forward/backward without holding the scores: ``global_mask(snip_scores(...))`` exactly.

:func:`saliency.snip_scores` keeps a float32 score for every weight (a dense copy of the model) until the global
threshold is known. Here each weight's score ``|g * w|`` is made in its gradient's storage the moment autograd has
accumulated that gradient (``register_post_accumulate_grad_hook``), reduced at once to what the exact top-k needs,
and the gradient dropped, so at most one gradient lives at a time besides the activations.

What the exact top-k needs: every score that can still reach the top k. A histogram of all scores seen so far
(their top 16 float bits) bounds the final k-th largest from below (more scores only raise it), so only scores
at or above that bound, less a margin, are kept: (position, raw score) pairs, about k of them. At the end the
normalisation of :func:`snip_scores` (divide by the sum, the sums taken per tensor exactly as it takes them) is
applied to the kept scores alone, and the kept scores are ranked by :func:`topk.top_k_masks` (ties by position).
The result is proven equal to the full computation: it is whenever every dropped score normalises to less than
the k-th kept one (division by the sum can merge neighbouring floats; the margin leaves room for that), which is
checked. Anything outside this (NaN scores, massive ties at the threshold, a low q whose kept set would not be
small, non-float32 weights, DistributedDataParallel, whose backward all-reduces) takes the full computation.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import torch
from torch import nn

from ..errors import MethodError
from ..format import ans
from ..format.memory import release_freed_heap
from .saliency import (
    LossFn,
    _loss,
    _weights_for_scoring,
    global_mask,
    one_per_layer_fix,
    scoring_mode,
    snip_scores,
    weights_to_train,
)
from .topk import CHUNK, top_k_masks

_MARGIN_ULPS = 1 << 8  # kept below the bound: division by the sum merges at most a few neighbouring floats


class _FullPath(Exception):
    """Raised inside the backward hook: stop, and compute the mask the full way."""


def snip_mask(model: nn.Module, batch, q: float, seed: int = 0, *, one_per_layer: bool = True,
              loss_fn: LossFn | None = None, select=None) -> dict[str, torch.Tensor]:
    """``global_mask(snip_scores(model, batch, ...), q, seed, one_per_layer)``, bit for bit, in one forward/backward
    that never holds a score per weight (see the module docstring)."""
    weights = _weights_for_scoring(model, select)
    n = sum(w.numel() for w in weights.values())
    k = weights_to_train(n, q)
    if _light_applies(model, weights, n, k):
        try:
            masks = _light(model, batch, weights, n, k, loss_fn)
        except _FullPath:
            masks = None
        if masks is not None:
            if one_per_layer:
                one_per_layer_fix(masks, seed)
            return masks
    return global_mask(snip_scores(model, batch, loss_fn=loss_fn, select=select), q, seed,
                       one_per_layer=one_per_layer)


def _light_applies(model: nn.Module, weights: dict, n: int, k: int) -> bool:
    if not 0 < k <= n // 8:  # the kept (position, score) pairs stay well under the dense size
        return False
    if any(w.dtype != torch.float32 or w.is_sparse for w in weights.values()):
        return False
    m = model
    while True:  # DDP's backward all-reduces gradients: its scores are not the full path's
        if isinstance(m, nn.parallel.DistributedDataParallel):
            return False
        inner = getattr(m, "module", None) if isinstance(m, nn.DataParallel) else getattr(m, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return True
        m = inner


def _sole_owner(t: torch.Tensor) -> bool:
    """No other tensor shares ``t``'s storage (so scoring it in place cannot change another pending gradient)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return False
    return count(t.untyped_storage()._cdata) <= 2  # t itself and the storage object just made to ask


def _on_host(t: torch.Tensor) -> bool:
    """CPU scores go through numpy and the compiled histogram; others stay in torch on their device."""
    return t.device.type == "cpu"


class _Kept:
    """The running state: per tensor its sum and the (positions, raw scores) at or above the bound."""

    def __init__(self, n: int, k: int):
        self.k, self.cap = k, n // 4 + (1 << 16)  # at most half the dense size in kept pairs
        self.hist = np.zeros(1 << 16, np.int64)  # by topk's key >> 16 (a non-negative score: 0x8000 and up)
        self.lib = ans.compiled()
        self.bound = 0.0  # every score >= bound is kept; every dropped one was below the bound of its time
        self.sums: dict[str, float] = {}
        self.pos: dict[str, torch.Tensor] = {}
        self.val: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, name: str, s: torch.Tensor) -> None:
        """Take one tensor's scores (float32, non-negative): its sum, its histogram, its scores >= the bound."""
        total = float(s.sum())  # exactly as snip_scores sums it: the same tensor, the same reduction
        if math.isnan(total):
            raise _FullPath  # NaN scores rank lowest in the full path; rare enough to take it
        self.sums[name] = total
        flat = s.detach().reshape(-1)  # C order, as the full path flattens
        cpu = _on_host(flat)
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start:start + CHUNK]
            if cpu and self.lib is not None:
                self.lib.fp_score_hist(part.data_ptr(), part.numel(), 16, 0, self.hist.ctypes.data)
            else:
                counts = torch.bincount(part.view(torch.int32) >> 16, minlength=1 << 15)
                self.hist[1 << 15:] += counts.cpu().numpy()
        self._raise_bound()
        pos, val = [], []
        dtype = np.int32 if flat.numel() < 2**31 else np.int64  # 8 bytes a kept score, mostly
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start:start + CHUNK]
            if cpu:
                x = part.numpy()
                i = np.flatnonzero(x >= np.float32(self.bound))
                val.append(torch.from_numpy(x[i]))
            else:  # (the scores stay on their device, to be normalised there)
                it = torch.nonzero(part >= self.bound).squeeze(1)
                val.append(part[it])
                i = it.cpu().numpy()
            pos.append(torch.from_numpy((i + start).astype(dtype)))
        self.pos[name], self.val[name] = torch.cat(pos), torch.cat(val)
        self.count += self.pos[name].numel()
        if self.count > 2 * self._possible() + (1 << 16):
            self._prune()
        if self.count > self.cap:
            raise _FullPath  # e.g. massive ties at the threshold: the kept set would not be small

    def _raise_bound(self) -> None:
        above = np.cumsum(self.hist[::-1])[::-1]  # scores in this bucket or higher
        full = np.flatnonzero(above >= self.k)
        if full.size:  # the k-th largest seen so far lies in bucket b: the final one is no smaller
            bits = max(((int(full[-1]) - (1 << 15)) << 16) - _MARGIN_ULPS, 0)
            self.bound = max(self.bound, float(np.array(bits, np.int32).view(np.float32)))

    def _possible(self) -> int:
        """How many scores seen so far can be >= the bound (by the histogram)."""
        b = (int(np.array(self.bound, np.float32).view(np.int32)) >> 16) + (1 << 15)
        return int(self.hist[b:].sum())

    def _prune(self) -> None:
        self.count = 0
        for name in self.pos:
            keep = self.val[name] >= self.bound
            self.pos[name], self.val[name] = self.pos[name][keep.cpu()], self.val[name][keep]
            self.count += self.pos[name].numel()


def _light(model, batch, weights: dict, n: int, k: int, loss_fn) -> dict[str, torch.Tensor] | None:
    kept = _Kept(n, k)
    freed, lock = [0], threading.Lock()

    def hook(name, w):
        def run(p):
            g, p.grad = p.grad, None
            if g is None:
                return
            if g.is_contiguous() and _sole_owner(g):
                s = g.mul_(w.detach()).abs_()  # the full path's arithmetic, in the gradient's own storage
            else:
                s = g.mul(w.detach()).abs_()
            del g
            with lock:  # (autograd runs each accelerator's part of the backward on its own thread)
                kept.add(name, s)
                freed[0] += s.numel()
                del s
                if freed[0] >= n // 64:  # a few dozen times a pass, whatever the number of tensors
                    freed[0] = 0
                    release_freed_heap()
        return run

    saved = {name: w.grad for name, w in weights.items()}
    handles = []
    try:
        for name, w in weights.items():
            w.grad = None
            handles.append(w.register_post_accumulate_grad_hook(hook(name, w)))
        with scoring_mode(model):
            loss = _loss(model, batch, loss_fn, "SNIP scoring")
            try:  # (an exception raised in a hook, _FullPath, comes out of backward as it is)
                loss.backward(inputs=list(weights.values()))
            except RuntimeError as e:
                raise MethodError(f"SNIP scoring: backward failed: {e}") from e
            del loss
    finally:
        for h in handles:
            h.remove()
        for name, w in weights.items():
            w.grad = saved[name]
    for name, w in weights.items():  # a weight the loss does not use: all-zero scores, as in the full path
        if name not in kept.sums:
            kept.add(name, torch.zeros_like(w, dtype=torch.float32))
    return _select(kept, weights, k)


def _select(kept: _Kept, weights: dict, k: int) -> dict[str, torch.Tensor] | None:
    """The top k of the kept scores, normalised as snip_scores normalises them; None unless provably exact."""
    names = list(weights)
    total = sum(kept.sums[n] for n in names)  # in snip_scores' order
    normalise = total > 0 and math.isfinite(total)
    # each tensor's kept scores divided on the device its scores were made on, as snip_scores divides them
    vals = torch.cat([(kept.val[n].div_(total) if normalise else kept.val[n]).cpu() for n in names])
    if vals.numel() < k:
        return None
    chosen = top_k_masks([vals], k)[0]
    if kept.bound > 0:  # every dropped score is below the bound: it must normalise below the k-th kept one
        kth = vals[chosen].min()
        for dev in {kept.val[n].device for n in names}:
            below = torch.tensor([kept.bound], dtype=torch.float32, device=dev)
            below = torch.nextafter(below, torch.zeros(1, device=dev))
            if normalise:
                below.div_(total)
            if not bool(below.cpu()[0] < kth):
                return None
    masks, start = {}, 0
    for name in names:
        size = kept.pos[name].numel()
        m = torch.zeros(weights[name].numel(), dtype=torch.bool)
        m[kept.pos[name][chosen[start:start + size]]] = True
        masks[name] = m.view(weights[name].shape)
        start += size
    return masks
