"""The top ``k`` of many score tensors at once, by radix selection: O(n) passes, no sort, no concatenated copy.

The result equals a stable descending sort of all scores (tensors in the given order, each flattened in C order)
followed by "keep the first k": scores compare as their values do, ties are broken by position (earlier first).
Values are compared exactly as ``torch.sort`` compared them after the historic preprocessing
``nan_to_num(float64(x), nan=-inf)``: NaN below -inf, -inf below every finite value, +inf above them, +0.0 = -0.0.

How: each score becomes an unsigned integer key whose order is that comparison (float bits with the sign folded;
float32/float16/bfloat16 scores are exactly float32 and use 32-bit keys, any float64 score makes all keys 64-bit).
With 32-bit keys, one histogram pass over the top 16 bits finds the bucket holding the k-th largest; a second
pass writes every mask (keys above that bucket: kept) and lists the bucket's few scores, which are ranked exactly
(by key, ties by position). Otherwise (64-bit keys, or a bucket too large to list) the k-th largest key is found
16 bits at a time, one histogram pass per 16 bits, and a last pass marks every key above it and the first few (by
position) equal to it. Work happens in chunks, so the only full-size memory is the masks themselves.
"""
from __future__ import annotations

import numpy as np
import torch

CHUNK = 1 << 22  # elements per pass step: bounded temporaries (~50 MB) whatever the model size
_DIGIT = 16


def _wide(scores: list[torch.Tensor]) -> bool:
    """64-bit keys unless every score is exactly a float32 (the old code compared everything as float64)."""
    return any(s.dtype not in (torch.float32, torch.float16, torch.bfloat16) for s in scores)


def _keys(x: torch.Tensor, wide: bool) -> np.ndarray:
    """Order-preserving unsigned keys (uint32 or uint64) of a flat CPU chunk of scores."""
    if wide:
        v = torch.nan_to_num(x.to(torch.float64), nan=-np.inf).numpy()  # the historic preprocessing, exactly
        v = v + 0.0  # -0.0 + 0.0 = +0.0: the two zeros compare equal
        bits = v.view(np.uint64)
        return bits ^ ((v.view(np.int64) >> 63).view(np.uint64) | np.uint64(1 << 63))
    v = x.to(torch.float32).numpy()  # exact for float32, float16, bfloat16
    nan = np.isnan(v)
    v = v + np.float32(0.0)
    bits = v.view(np.uint32)
    u = bits ^ ((v.view(np.int32) >> 31).view(np.uint32) | np.uint32(1 << 31))
    if nan.any():
        u[nan] = 0  # below -inf (whose key is 0x007fffff): nan_to_num made NaN -inf and -inf the lowest float
    return u


class Generated:
    """Scores that are never stored: ``make(start, count)`` gives the flat scores ``[start, start + count)``
    (e.g. the generator's uniforms of a random mask, made again in each pass instead of held)."""

    dtype = torch.float32

    def __init__(self, shape, make):
        self.shape, self.make = torch.Size(shape), make

    def numel(self) -> int:
        return self.shape.numel()


def _pieces(s):
    """(offset, flat CPU piece) of one score tensor (or :class:`Generated` scores), CHUNK elements at a time."""
    if isinstance(s, Generated):
        for start in range(0, s.numel(), CHUNK):
            yield start, s.make(start, min(CHUNK, s.numel() - start))
        return
    flat = s.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield start, flat[start:start + CHUNK].cpu()


def _chunks(scores: list, wide: bool):
    """(tensor index, offset, keys) over every score, in order."""
    for i, s in enumerate(scores):
        for start, part in _pieces(s):
            yield i, start, _keys(part, wide)


def _f32_chunks(scores: list):
    """(tensor index, offset, contiguous float32 CPU chunk) over every score, in order (for the compiled kernels)."""
    for i, s in enumerate(scores):
        for start, part in _pieces(s):
            yield i, start, part.to(torch.float32).contiguous()


def _kernels(scores: list[torch.Tensor]):
    """The compiled score kernels (freezepack/format/_ans.c) when they apply (32-bit keys), else None."""
    if _wide(scores):
        return None
    from ..format import ans

    return ans.compiled()


def threshold(scores: list[torch.Tensor], k: int, *, lib=None) -> tuple[int, int, bool]:
    """(T, r, wide): the key of the k-th largest score (1 <= k <= total) and how many of the scores equal to it
    are kept (the first r by position). ``lib``: the compiled kernels (False: the numpy twin)."""
    wide = _wide(scores)
    lib = None if lib is False or wide else lib or _kernels(scores)
    bits, dt = (64, np.uint64) if wide else (32, np.uint32)
    prefix, need = 0, k
    for level in range(bits // _DIGIT):
        hist = _histogram(scores, wide, lib, bits - _DIGIT * (level + 1), prefix, level)
        b, need = _bucket(hist, need)
        prefix = (prefix << _DIGIT) | b
    return prefix, need, wide


def _histogram(scores: list, wide: bool, lib, shift: int, prefix: int, level: int) -> np.ndarray:
    """Counts of the 16 key bits at ``shift`` over the scores whose higher bits equal ``prefix``."""
    dt = np.uint64 if wide else np.uint32
    hist = np.zeros(1 << _DIGIT, np.int64)
    if lib is not None:
        for _, _, x in _f32_chunks(scores):
            lib.fp_score_hist(x.data_ptr(), x.numel(), shift, prefix, hist.ctypes.data)
        return hist
    for _, _, u in _chunks(scores, wide):
        if level:
            u = u[(u >> dt(shift + _DIGIT)) == dt(prefix)]
        digits = (u >> dt(shift)) & dt(0xFFFF)
        hist += np.bincount(digits.astype(np.intp), minlength=1 << _DIGIT)
    return hist


def _bucket(hist: np.ndarray, need: int) -> tuple[int, int]:
    """(b, r): the bucket holding the need-th largest, and its rank within that bucket."""
    above = np.cumsum(hist[::-1])[::-1] - hist  # elements in higher buckets
    b = int(np.nonzero((above < need) & (above + hist >= need))[0][-1])
    return b, need - int(above[b])


# The two-pass path lists the scores of the threshold's top-16-bit bucket (12 bytes each); a bucket larger than
# this (massive ties, e.g. all-zero scores) takes the three-pass path instead.
COLLECT_MAX = 1 << 22


def _two_pass(scores: list, k: int, lib, masks: list[torch.Tensor]) -> bool:
    """32-bit keys: one histogram pass finds the threshold's top-16-bit bucket b, one more writes every mask
    (above b: kept) while listing the scores in b, which are then ranked by key, ties by position. False (nothing
    written) when b holds too many scores to list."""
    hist = _histogram(scores, False, lib, _DIGIT, 0, 0)
    b, need = _bucket(hist, k)
    cap = int(hist[b])
    if cap > COLLECT_MAX:
        return False
    pos, keys, got = np.empty(cap, np.int64), np.empty(cap, np.uint32), 0
    bases = np.cumsum([0] + [s.numel() for s in scores])
    for i, start, x in _f32_chunks(scores):
        m = masks[i].view(-1)[start:start + x.numel()]
        if lib is not None:
            c = int(lib.fp_score_split(x.data_ptr(), x.numel(), b, m.data_ptr(), pos[got:].ctypes.data,
                                       keys[got:].ctypes.data, cap - got))
            if got + c > cap:
                raise RuntimeError("scores changed between passes")
            pos[got:got + c] += bases[i] + start
        else:
            u = _keys(x, False)
            top = u >> np.uint32(_DIGIT)
            np.greater(top, np.uint32(b), out=m.numpy())
            sel = np.flatnonzero(top == np.uint32(b))
            c = sel.size
            if got + c > cap:
                raise RuntimeError("scores changed between passes")
            pos[got:got + c] = sel + (bases[i] + start)
            keys[got:got + c] = u[sel]
        got += c
    if got != cap:
        raise RuntimeError("scores changed between passes")
    chosen = pos[np.argsort(-keys.astype(np.int64), kind="stable")[:need]]  # listed in position order: ties by it
    owner = np.searchsorted(bases, chosen, side="right") - 1
    for i in np.unique(owner):
        masks[i].view(-1).numpy()[chosen[owner == i] - bases[i]] = True
    return True


def top_k_masks(scores: list[torch.Tensor], k: int, *, lib=None) -> list[torch.Tensor]:
    """Boolean CPU masks, one per score tensor (same shapes): True for the k highest scores over all tensors,
    ties by position; exactly what a stable descending sort of the concatenated scores keeps. ``lib``: the
    compiled kernels (default: when built; False: the numpy twin)."""
    total = sum(s.numel() for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"k={k} outside [0, {total}]")
    if k == 0:
        return [torch.zeros(s.shape, dtype=torch.bool) for s in scores]
    masks = [torch.empty(s.shape, dtype=torch.bool) for s in scores]  # every entry is written below
    lib = None if lib is False or _wide(scores) else lib or _kernels(scores)
    if not _wide(scores) and _two_pass(scores, k, lib, masks):
        return masks
    t, left, wide = threshold(scores, k, lib=lib if lib is not None else False)
    if lib is not None:
        for i, start, x in _f32_chunks(scores):
            m = masks[i].view(-1)[start:start + x.numel()]
            left = lib.fp_score_mask(x.data_ptr(), x.numel(), t, left, m.data_ptr())
        return masks
    key_t = np.uint64(t) if wide else np.uint32(t)
    for i, start, u in _chunks(scores, wide):
        m = masks[i].view(-1).numpy()[start:start + u.size]
        np.greater(u, key_t, out=m)
        if left:
            eq = np.flatnonzero(u == key_t)[:left]
            m[eq] = True
            left -= eq.size
    return masks
