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

import threading
from functools import partial

import numpy as np
import torch

from ..parallel import run_ordered, thread_count

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
        self.shape, self.make = torch.Size(shape), make  # make(start, count, threads)

    def numel(self) -> int:
        return self.shape.numel()


def _spans(scores: list):
    """(tensor index, offset, count) of every chunk of every score tensor, in order."""
    for i, s in enumerate(scores):
        for start in range(0, s.numel(), CHUNK):
            yield i, start, min(CHUNK, s.numel() - start)


def _piece(s, start: int, count: int, threads: int | None = None) -> torch.Tensor:
    """The flat CPU scores ``[start, start + count)`` of one score tensor (or :class:`Generated` scores)."""
    if isinstance(s, Generated):
        return s.make(start, count, threads)
    return s.detach().reshape(-1)[start:start + count].cpu()


def _chunks(scores: list, wide: bool):
    """(tensor index, offset, keys) over every score, in order."""
    for i, start, count in _spans(scores):
        yield i, start, _keys(_piece(scores[i], start, count), wide)


def _f32_chunks(scores: list):
    """(tensor index, offset, contiguous float32 CPU chunk) over every score, in order (for the compiled kernels)."""
    for i, start, count in _spans(scores):
        yield i, start, _piece(scores[i], start, count).to(torch.float32).contiguous()


def _each_chunk(scores: list, work, threads: int | None) -> list:
    """``work(i, start, x)`` for every float32 chunk ``x`` of the scores, on ``threads`` threads (default torch's
    CPU threads), results in chunk order. Each chunk is made (generated, for :class:`Generated` scores) and
    consumed on one thread, one generator thread per task; the compiled kernels release the GIL, so the passes
    use every core, and what each task writes (its own histogram, its own slice of a mask) does not depend on
    which thread ran it."""
    threads = thread_count(threads)

    def task(i: int, start: int, count: int):
        x = _piece(scores[i], start, count, 1 if threads > 1 else None).to(torch.float32).contiguous()
        return work(i, start, x)

    return run_ordered([(0, partial(task, *span)) for span in _spans(scores)], threads)  # equal costs: in order


def _kernels(scores: list[torch.Tensor]):
    """The compiled score kernels (freezepack/format/_ans.c) when they apply (32-bit keys), else None."""
    if _wide(scores):
        return None
    from ..format import ans

    return ans.compiled()


def threshold(scores: list[torch.Tensor], k: int, *, lib=None, threads: int | None = None) -> tuple[int, int, bool]:
    """(T, r, wide): the key of the k-th largest score (1 <= k <= total) and how many of the scores equal to it
    are kept (the first r by position). ``lib``: the compiled kernels (False: the numpy twin)."""
    wide = _wide(scores)
    lib = None if lib is False or wide else lib or _kernels(scores)
    bits, dt = (64, np.uint64) if wide else (32, np.uint32)
    prefix, need = 0, k
    for level in range(bits // _DIGIT):
        hist = _histogram(scores, wide, lib, bits - _DIGIT * (level + 1), prefix, level, threads)
        b, need = _bucket(hist, need)
        prefix = (prefix << _DIGIT) | b
    return prefix, need, wide


def _histogram(scores: list, wide: bool, lib, shift: int, prefix: int, level: int,
               threads: int | None = None) -> np.ndarray:
    """Counts of the 16 key bits at ``shift`` over the scores whose higher bits equal ``prefix``."""
    dt = np.uint64 if wide else np.uint32
    hist = np.zeros(1 << _DIGIT, np.int64)
    if lib is not None:
        own = threading.local()
        per_thread: list[np.ndarray] = []

        def count(_i, _start, x):  # one histogram per thread, summed: integer counts, the same sum in any order
            if not hasattr(own, "hist"):
                own.hist = np.zeros(1 << _DIGIT, np.int64)
                per_thread.append(own.hist)  # (list.append is atomic)
            lib.fp_score_hist(x.data_ptr(), x.numel(), shift, prefix, own.hist.ctypes.data)

        _each_chunk(scores, count, threads)
        return sum(per_thread, hist)
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


def _two_pass(scores: list, k: int, lib, masks: list[torch.Tensor], threads: int | None = None) -> bool:
    """32-bit keys: one histogram pass finds the threshold's top-16-bit bucket b, one more writes every mask
    (above b: kept) while listing the scores in b, which are then ranked by key, ties by position. False (nothing
    written) when b holds too many scores to list."""
    hist = _histogram(scores, False, lib, _DIGIT, 0, 0, threads)
    b, need = _bucket(hist, k)
    cap = int(hist[b])
    if cap > COLLECT_MAX:
        return False
    bases = np.cumsum([0] + [s.numel() for s in scores])

    def split(i, start, x):  # this chunk's mask slice; its scores in bucket b as (global position, key)
        m = masks[i].view(-1)[start:start + x.numel()]
        if lib is not None:
            room = min(cap, x.numel())
            pos, keys = np.empty(room, np.int64), np.empty(room, np.uint32)
            c = int(lib.fp_score_split(x.data_ptr(), x.numel(), b, m.data_ptr(), pos.ctypes.data,
                                       keys.ctypes.data, room))
            if c > room:
                raise RuntimeError("scores changed between passes")
            return pos[:c] + (bases[i] + start), keys[:c].copy()
        u = _keys(x, False)
        top = u >> np.uint32(_DIGIT)
        np.greater(top, np.uint32(b), out=m.numpy())
        sel = np.flatnonzero(top == np.uint32(b))
        return sel + (bases[i] + start), u[sel]

    listed = _each_chunk(scores, split, threads if lib is not None else 1)  # (numpy's twin: one thread)
    pos = np.concatenate([p for p, _ in listed]) if listed else np.empty(0, np.int64)
    keys = np.concatenate([q for _, q in listed]) if listed else np.empty(0, np.uint32)
    if pos.size != cap:
        raise RuntimeError("scores changed between passes")
    chosen = pos[np.argsort(-keys.astype(np.int64), kind="stable")[:need]]  # listed in position order: ties by it
    owner = np.searchsorted(bases, chosen, side="right") - 1
    for i in np.unique(owner):
        masks[i].view(-1).numpy()[chosen[owner == i] - bases[i]] = True
    return True


def top_k_masks(scores: list[torch.Tensor], k: int, *, lib=None, threads: int | None = None) -> list[torch.Tensor]:
    """Boolean CPU masks, one per score tensor (same shapes): True for the k highest scores over all tensors,
    ties by position; exactly what a stable descending sort of the concatenated scores keeps. ``lib``: the
    compiled kernels (default: when built; False: the numpy twin). ``threads``: CPU threads of the passes (default
    torch's); the masks are the same for any number."""
    total = sum(s.numel() for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"k={k} outside [0, {total}]")
    if k == 0:
        return [torch.zeros(s.shape, dtype=torch.bool) for s in scores]
    masks = [torch.empty(s.shape, dtype=torch.bool) for s in scores]  # every entry is written below
    lib = None if lib is False or _wide(scores) else lib or _kernels(scores)
    if not _wide(scores) and _two_pass(scores, k, lib, masks, threads):
        return masks
    t, left, wide = threshold(scores, k, lib=lib if lib is not None else False, threads=threads)
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
