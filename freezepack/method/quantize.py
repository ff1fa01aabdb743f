"""Opt-in lossy coding of a FreezeNet's trained values (never the default).

A FreezeNet file is mostly seed: at q = 0.99 the trained float32 values are ~75 % of a lossless file. Deep
Compression's observation applies to them too: a few shared values per tensor cost little accuracy. This module
only *chooses* the values; the format stores whatever it is given losslessly and picks the coding itself
(spec/FORMAT.md §12.8: ``cast`` for values that are exactly F16/BF16, ``codebook`` for <= 256 distinct values,
with a uniform ``grid`` form for the uniform quantizers). So the file always verifies bit-exactly against what
it holds, and ``freezepack.save(path, model, values=...)`` proves it against the quantized model.

Codings (``ValueCoding.parse``):

``f32``        lossless (default): the values as trained.
``f16``        each value rounded to float16 (round-to-nearest-even); refused if one overflows.
``bf16``       each value rounded to bfloat16 (round-to-nearest-even).
``kmeans:K``   per tensor, 2**K shared values (1 <= K <= 8) by 1-D k-means with linear initialisation (Deep
               Compression's choice: it keeps the rare large weights), centroids rounded to the tensor's dtype.
``uniform:K``  per tensor, a symmetric uniform grid of 2**K - 1 levels (2 <= K <= 8), step = max|v| / (2**(K-1) - 1).
``int8``       ``uniform:8``: 255 levels, the usual symmetric int8 quantizer.

Only the trained values of frozen tensors are quantized; whole tensors (biases, norms, unfrozen layers) stay
exact. Everything is deterministic: the same values give the same file, and re-coding values a quantizer already
produced (a loaded lossy file) changes nothing. NaN and infinite values are refused by every lossy coding.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UsageError
from ..format.entropy import MAX_GRID_LEVEL, grid_values

_KMEANS_ITERS = 50


@dataclass(frozen=True)
class ValueCoding:
    kind: str            # "f32" | "f16" | "bf16" | "kmeans" | "uniform"
    bits: int = 0

    @classmethod
    def parse(cls, text: str | None | ValueCoding) -> ValueCoding:
        if isinstance(text, ValueCoding):  # a hand-made one is checked like its text (ValueCoding("uniform", 30))
            text = str(text)
        if text is None:
            return cls("f32")
        if not isinstance(text, str):
            raise UsageError(f"values coding must be a string like 'bf16' or 'kmeans:4', got {type(text).__name__}")
        t = text.strip().lower()
        if t in ("f32", "f16", "bf16"):
            return cls(t)
        if t == "int8":
            return cls("uniform", 8)
        m = re.fullmatch(r"(kmeans|uniform):(\d)", t)
        if m and (1 if m[1] == "kmeans" else 2) <= int(m[2]) <= 8:
            return cls(m[1], int(m[2]))
        raise UsageError(f"unknown values coding {text!r}: use f32 (lossless), f16, bf16, int8, kmeans:K (K = 1..8) "
                         "or uniform:K (K = 2..8)")

    @property
    def lossless(self) -> bool:
        return self.kind == "f32"

    def __str__(self) -> str:
        return f"{self.kind}:{self.bits}" if self.bits else self.kind


def quantize(values: torch.Tensor, coding: str | ValueCoding, name: str | None = None) -> tuple[torch.Tensor, dict]:
    """``(quantized values, hint)``: same dtype and shape; ``hint`` = ``{"step": s}`` for uniform grids (lets the
    writer store the grid instead of a table), else ``{}``."""
    c = ValueCoding.parse(coding)
    v = values.detach().cpu()
    if c.lossless or v.numel() == 0:
        return v, {}
    # Every lossy coding refuses non-finite values: a NaN has no nearest centroid, and with one inf already
    # present an f16 overflow (1e6 -> inf) could not be told apart from it.
    if not torch.isfinite(v).all():
        raise UsageError(f"values hold a NaN or an infinity: they cannot be quantized ({c})", tensor=name)
    if c.kind in ("f16", "bf16"):
        q = v.to(torch.float16 if c.kind == "f16" else torch.bfloat16).to(v.dtype)
        if not torch.isfinite(q).all():  # also an F16 tensor's 65504 that bf16 rounds to 65536
            limit = "|v| >= 65520" if c.kind == "f16" else "|v| > 3.3961e38" if v.dtype != torch.float16 else \
                "bf16 rounds it beyond the tensor's float16 maximum 65504"
            raise UsageError(f"a value rounds outside the {c.kind} range ({limit})", tensor=name)
        return q, {}
    x: np.ndarray = v.double().numpy().reshape(-1)
    if c.kind == "uniform":
        top = (1 << (c.bits - 1)) - 1
        amax = float(np.abs(x).max())
        if amax == 0.0:
            return v.clone(), {}
        step = float(np.float32(amax / top))
        if not step > 0 or v.dtype != torch.float32:  # F16/BF16 tensors: grid rounded to the dtype (a table)
            grid = np.clip(np.rint(x / (step or 1.0)), -top, top) * step
            return torch.from_numpy(grid).to(v.dtype).reshape(v.shape), {}
        f32 = v.numpy().reshape(-1)
        # Values already on a grid whose step is within an ulp of ours (int8 from another quantizer, whose step
        # fl32(fl32(127 * s) / 127) need not give back s): kept exactly, stored as that grid.
        for s in (step, float(np.nextafter(np.float32(step), np.float32(np.inf))),
                  float(np.nextafter(np.float32(step), np.float32(0)))):
            if not s > 0:  # (the smallest subnormal step has no lower neighbour)
                continue
            levels = np.rint(x / s)
            if np.abs(levels).max() <= top and np.array_equal(
                    grid_values(levels.astype(np.int64), s).view(np.uint32), f32.view(np.uint32)):
                return v.clone(), {"step": s}
        levels = np.clip(np.rint(x / step), -top, top).astype(np.int64)
        assert np.abs(levels).max() <= MAX_GRID_LEVEL
        return torch.from_numpy(grid_values(levels, step)).reshape(v.shape), {"step": step}
    return _kmeans(v, x, 1 << c.bits), {}


def _kmeans(v: torch.Tensor, x: np.ndarray, k: int) -> torch.Tensor:
    """Deterministic 1-D Lloyd: linear init over [min, max], nearest-centroid assignment by midpoints, centroids
    rounded to the tensor's dtype at the end (so every stored value is exactly a centroid)."""
    # Already few values (e.g. quantized before and fine-tuned): keep them exactly. Counted as bit patterns
    # (-0.0 and 0.0 are two stored values) with torch (numpy has no bfloat16).
    if torch.unique(v.view({torch.float32: torch.int32}.get(v.dtype, torch.int16))).numel() <= k:
        return v.clone()
    lo, hi = float(x.min()), float(x.max())
    cent = np.linspace(lo, hi, k)
    xs = np.sort(x)
    for _ in range(_KMEANS_ITERS):
        edges = (cent[1:] + cent[:-1]) / 2
        cuts = np.searchsorted(xs, edges, side="right")
        bounds = np.concatenate([[0], cuts, [xs.size]])
        sums = np.add.reduceat(np.concatenate([xs, [0.0]]), bounds[:-1])
        sizes = np.diff(bounds)
        new = np.where(sizes > 0, sums / np.maximum(sizes, 1), cent)  # an empty cluster keeps its centroid
        if np.array_equal(new, cent):
            break
        cent = np.sort(new)
    cent = np.unique(torch.from_numpy(cent).to(v.dtype).double().numpy())  # representable, distinct
    edges = (cent[1:] + cent[:-1]) / 2
    idx = np.searchsorted(edges, x, side="right")
    return torch.from_numpy(cent[idx]).to(v.dtype).reshape(v.shape)


def quantize_model(model: torch.nn.Module, coding: str | ValueCoding) -> dict[str, torch.Tensor]:
    """Quantize every frozen tensor's trained values of ``model`` in place (for fine-tuning or evaluating the
    quantized model); returns ``{tensor name: cluster index per value}`` for :func:`tie_to_clusters`."""
    from .freezenet import _module, frozen_parametrizations, unwrap

    c = ValueCoding.parse(coding)
    m = unwrap(model)
    clusters, seen = {}, set()
    with torch.no_grad():
        for name in frozen_parametrizations(m):
            mod, attr = _module(m, name)
            values = mod.parametrizations[attr].original
            if id(values) in seen:  # a tied weight: quantized once
                continue
            seen.add(id(values))
            q, _ = quantize(values, c, name)
            values.copy_(q.to(values.device).reshape(values.shape))
            clusters[name] = torch.unique(q.reshape(-1), return_inverse=True)[1].to(values.device)
    return clusters


def tie_to_clusters(model: torch.nn.Module, clusters: dict[str, torch.Tensor]) -> None:
    """After an optimizer step: set each value to the mean of its cluster (Deep Compression's shared-weight
    fine-tuning: with plain SGD this is the step on the shared value with the cluster's averaged gradient)."""
    from .freezenet import _module, unwrap

    m = unwrap(model)
    with torch.no_grad():
        for name, idx in clusters.items():
            mod, attr = _module(m, name)
            values = mod.parametrizations[attr].original
            flat = values.reshape(-1)
            k = int(idx.max()) + 1 if idx.numel() else 0
            sums = torch.zeros(k, dtype=torch.float64, device=flat.device).index_add_(0, idx, flat.double())
            sizes = torch.bincount(idx, minlength=k).clamp_min(1)
            flat.copy_((sums / sizes).to(flat.dtype)[idx])


def finetune_clusters(model: torch.nn.Module, clusters: dict[str, torch.Tensor], batches, *, lr: float = 0.01,
                      loss_fn=None) -> torch.nn.Module:
    """Deep Compression's fine-tuning of shared values: one plain-SGD step per batch on the trainable parameters,
    then :func:`tie_to_clusters` (each value = its cluster's mean). ``clusters`` comes from :func:`quantize_model`;
    ``loss_fn(model, batch)`` defaults to cross-entropy of ``model(batch[0])`` against ``batch[1]``. Biases and
    norms train freely (they are stored exactly). Returns the model in eval mode; save it with the same coding and
    the file holds exactly these values."""
    import torch.nn.functional as F

    from ..errors import MethodError

    loss_fn = loss_fn or (lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for batch in batches:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise MethodError(f"fine-tuning the shared values diverged (loss {float(loss)}): lower the learning rate")
        loss.backward()
        opt.step()
        tie_to_clusters(model, clusters)
    return model.eval()
