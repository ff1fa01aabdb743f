"""Format-v2 entropy coders (spec/FORMAT.md §12): integer-only models on constriction's stack ANS coder.

The coders live here, all exact and platform-independent because every probability is an integer computed
with integer arithmetic (the float64 weights handed to constriction are integers below 2**24 whose quantization
is exactly ``weight + 1``, as for the v1 gap table):

``ans-ctx``  a freezing mask coded *conditioned on the frozen weights themselves*. SNIP keeps the entries with
             large |w_init * g|, and a reader regenerates w_init exactly, so the entries are split into ``bins``
             equal-size classes by the rank of |w_init| (compared as f32 bit patterns: integers, no float math),
             and each class gets its own Bernoulli model with a stored count. Optional row/column "has any
             trainable entry" flags remove dead inputs/outputs (a ReLU unit that never fires has g = 0).
``planes``   lossless values as byte planes: the most significant byte of each element (sign + 7 exponent bits
             for F32/BF16) is coded with a stored histogram, lower planes too when that pays (zeros, integers),
             the rest raw. Trained weights use few octaves, so the top byte costs ~2.5 bits instead of 8:
             ~0.83x raw float32; an all-zero tensor costs a few header bytes.
codebook     the symbol stream of values with at most 256 distinct values (quantized by ``--values kmeans:K``,
             ``int8``, or naturally few-valued): one ANS symbol per value under the counts model; the table or
             uniform grid itself is part of the header (freezepack.format.v2).
Decoding goes through the compiled ANS decoder (freezepack.format.ans), encoding through constriction.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import FormatError
from . import ans
from .ans import quantize_counts  # noqa: F401  (the coders' quantization lives with the ANS models)

PRECISION = 24
ONE = 1 << PRECISION
MAX_BINS = 64
FLAG_COLS, FLAG_ROWS = 1, 2


# ---------------------------------------------------------------------------------------------------------------
# integer models
# ---------------------------------------------------------------------------------------------------------------

def binary_cdf1(size: int, ones: int) -> int:
    """Quantile split of a two-symbol model for ``ones`` of ``size`` (0 < ones < size): symbol 0 owns
    [0, cdf1). cdf1 = clamp(floor(((size - ones) * 2**24 + floor(size / 2)) / size), 1, 2**24 - 1)."""
    return min(max(((size - ones) * ONE + size // 2) // size, 1), ONE - 1)


def categorical(probs) -> object:
    """constriction model (for the encoders) with exactly the integer probabilities ``probs`` (sum 2**24, each
    >= 1); decoders use ``ans.model(probs)`` itself."""
    return ans.model(probs).constriction()


def binary(size: int, ones: int):
    return ans.binary(binary_cdf1(size, ones)).constriction()


def _coder(words=None):
    import constriction

    if words is None:
        return constriction.stream.stack.AnsCoder()
    return constriction.stream.stack.AnsCoder(np.asarray(words, dtype=np.uint32))


def _words(coder) -> np.ndarray:
    return np.asarray(coder.get_compressed(), dtype=np.uint32).astype("<u4")


# ---------------------------------------------------------------------------------------------------------------
# ans-ctx: masks conditioned on |w_init|
# ---------------------------------------------------------------------------------------------------------------

def context_keys(frozen_f32) -> np.ndarray:
    """|w| of the generator's f32 output as its bit pattern (bits & 0x7fffffff): ordered as |w| is, exact."""
    a = np.ascontiguousarray(np.asarray(frozen_f32, dtype=np.float32)).reshape(-1)
    return a.view(np.uint32) & np.uint32(0x7FFFFFFF)


def context_rank(keys: np.ndarray) -> np.ndarray:
    """int64 rank[i] = position of i when sorted by (key, i)."""
    out = np.empty(keys.size, dtype=np.int64)
    out[ans.key_order(keys)] = np.arange(keys.size, dtype=np.int64)
    return out


def context_bins(keys: np.ndarray, bins: int) -> np.ndarray:
    """uint8 bin[i] = rank[i] * bins // n (1 <= bins <= 64), rank by (key, i): equal-size classes, in O(n)."""
    return ans.ctx_bins(keys, bins)


def grid(shape) -> tuple[int, int] | None:
    """(rows, cols) for row/column flags: the tensor as (shape[0], n / shape[0]); None when meaningless."""
    if len(shape) < 2:
        return None
    n = int(np.prod(shape, dtype=object))
    r = int(shape[0])
    if r < 2 or n // r < 2:
        return None
    return r, n // r


def _active(flat_shape, colflag, rowflag, n):
    r, c = flat_shape
    act = np.ones(n, dtype=np.bool_)
    if colflag is not None:
        act &= np.tile(colflag, r)
    if rowflag is not None:
        act &= np.repeat(rowflag, c)
    return act


def encode_ctx(mask: np.ndarray, keys: np.ndarray, shape) -> list[tuple[dict, np.ndarray]]:
    """Candidate ``ans-ctx`` codings of a flat bool mask (0 < k < n): [(params, words)], one per choice."""
    n = mask.size
    g = grid(shape) or (0, 0)  # (0, 0): no rows and columns, so no row/column flags
    flag_sets = [0] + ([FLAG_COLS, FLAG_ROWS, FLAG_COLS | FLAG_ROWS] if g != (0, 0) else [])
    out = []
    rank = context_rank(keys)  # bins = rank * nb // n for every nb: one sort
    for flags in flag_sets:
        colflag = rowflag = None
        if flags & FLAG_COLS:
            colflag = mask.reshape(g).any(axis=0)
        if flags & FLAG_ROWS:
            rowflag = mask.reshape(g).any(axis=1)
        act = _active(g, colflag, rowflag, n) if flags else np.ones(n, dtype=np.bool_)
        sel = np.flatnonzero(act)
        for nb in (1, 2, 4, 8, 16, 32):
            if nb > n:
                continue
            b = (rank[sel] * nb // n).astype(np.uint8)
            order, sizes = ans.group(b, nb)  # = a stable argsort of b, by counting (compiled): O(n), no sort
            sym = mask[sel][order]
            counts = np.bincount(b, weights=mask[sel], minlength=nb).astype(np.int64)
            coder = _coder()
            starts = np.concatenate([[0], np.cumsum(sizes)])
            for j in reversed(range(nb)):  # a stack: the last group is pushed first
                s, c = int(sizes[j]), int(counts[j])
                if 0 < c < s:
                    coder.encode_reverse(sym[starts[j]:starts[j + 1]].astype(np.int32), binary(s, c))
            params: dict[str, Any] = {"bins": nb, "flags": flags, "counts": [int(c) for c in counts]}
            if flags & FLAG_ROWS and rowflag is not None:
                params["row_ones"] = int(rowflag.sum())
                if 0 < params["row_ones"] < g[0]:
                    coder.encode_reverse(rowflag.astype(np.int32), binary(g[0], params["row_ones"]))
            if flags & FLAG_COLS and colflag is not None:
                params["col_ones"] = int(colflag.sum())
                if 0 < params["col_ones"] < g[1]:
                    coder.encode_reverse(colflag.astype(np.int32), binary(g[1], params["col_ones"]))
            out.append((params, _words(coder)))
    return out


def check_ctx(n: int, ones: int, shape, params: dict, words: int, where=None, tensor=None) -> None:
    """Header-only checks of an ``ans-ctx`` mask (before any decoding work)."""
    nb, flags, counts = params["bins"], params["flags"], params["counts"]
    if not 1 <= nb <= MAX_BINS or nb > n or len(counts) != nb or flags & ~3:
        raise FormatError(f"'ans-ctx' parameters out of range: bins={nb}, flags={flags}", path=where, tensor=tensor)
    if flags and grid(shape) is None:
        raise FormatError("'ans-ctx' row/column flags on a tensor without rows and columns", path=where,
                          tensor=tensor)
    if not 0 < ones < n or sum(counts) != ones or min(counts) < 0:
        raise FormatError(f"'ans-ctx' bin counts sum to {sum(counts)}, the header says {ones} of {n}", path=where,
                          tensor=tensor)
    g = grid(shape) or (0, 0)
    for key, flag, dim in (("col_ones", FLAG_COLS, 1), ("row_ones", FLAG_ROWS, 0)):
        if flags & flag and not 1 <= params[key] <= g[dim]:
            raise FormatError(f"'ans-ctx' {key} out of range", path=where, tensor=tensor)
    extra = (g[0] + g[1]) if flags else 0
    if words > 2 + ((n + extra) * PRECISION + 31) // 32:
        raise FormatError(f"'ans-ctx' payload of {words} words is impossible for {n} entries", path=where,
                          tensor=tensor)


def decode_ctx(n: int, ones: int, shape, params: dict, words: np.ndarray, keys: np.ndarray, where=None,
               tensor=None) -> np.ndarray:
    """Ascending int64 positions of the trainable entries of an ``ans-ctx`` mask."""
    check_ctx(n, ones, shape, params, int(words.size), where, tensor)
    if words.size and words[-1] == 0:
        raise FormatError("'ans-ctx' stream ends in a zero word", path=where, tensor=tensor)
    if keys.size != n:
        raise FormatError("'ans-ctx' context has the wrong size", path=where, tensor=tensor)
    nb, flags, counts = params["bins"], params["flags"], params["counts"]
    g = grid(shape) or (0, 0)  # (check_ctx: flags only on a tensor with rows and columns)
    dec = ans.Decoder(words)

    def flags_of(key, size):
        c = params[key]
        if c == size:
            return np.ones(size, dtype=np.bool_)
        return dec.decode(ans.binary(binary_cdf1(size, c)), size).view(np.bool_)

    colflag = flags_of("col_ones", g[1]) if flags & FLAG_COLS else None
    rowflag = flags_of("row_ones", g[0]) if flags & FLAG_ROWS else None
    for key, f in (("col_ones", colflag), ("row_ones", rowflag)):  # exactly the declared number set (§12.7.2)
        if f is not None and int(np.count_nonzero(f)) != params[key]:
            raise FormatError(f"'ans-ctx' {key}={params[key]} but {int(np.count_nonzero(f))} flags decode",
                              path=where, tensor=tensor)
    # the active entries grouped by bin, ascending i within a bin: the order their symbols come in
    order, sizes = ans.group(context_bins(keys, nb), nb, _active(g, colflag, rowflag, n) if flags else None)
    m = np.zeros(n, dtype=np.uint8)
    pos = 0
    for j in range(nb):
        s, c = int(sizes[j]), counts[j]
        if c > s:
            raise FormatError(f"'ans-ctx' bin {j} declares {c} trainable entries among {s}", path=where,
                              tensor=tensor)
        if c == s:
            m[order[pos:pos + s]] = 1
        elif c:
            dec.decode(ans.binary(binary_cdf1(s, c)), s, out=m, index=order[pos:pos + s])
            got = int(np.count_nonzero(m[order[pos:pos + s]]))
            if got != c:  # each bin decodes exactly its declared count (§12.7.2)
                raise FormatError(f"'ans-ctx' bin {j} declares {c} trainable entries but decodes {got}",
                                  path=where, tensor=tensor)
        pos += s
    if not dec.is_empty():
        raise FormatError("'ans-ctx' stream has data left after the last entry", path=where, tensor=tensor)
    m = m.view(np.bool_)
    idx = np.flatnonzero(m)
    if idx.size != ones:
        raise FormatError(f"mask decodes to {idx.size} trainable entries, the header says {ones}", path=where,
                          tensor=tensor)
    # flags say "this row/column has a trainable entry": a set flag over an empty row/column is not canonical
    if (colflag is not None and not np.array_equal(m.reshape(g).any(axis=0), colflag)) or \
            (rowflag is not None and not np.array_equal(m.reshape(g).any(axis=1), rowflag)):
        raise FormatError("'ans-ctx' row/column flags disagree with the decoded mask", path=where, tensor=tensor)
    return idx


# ---------------------------------------------------------------------------------------------------------------
# planes: values as byte planes, the top plane (and any plane that pays) entropy-coded
# ---------------------------------------------------------------------------------------------------------------

def _table_cost(counts) -> int:
    return 2 + len(counts) + sum((int(c).bit_length() + 6) // 7 or 1 for c in counts)


def _plane_pays(plane: np.ndarray, hist: np.ndarray) -> bool:
    """Writer's choice: code a low plane when its order-0 estimate (+ table) beats n raw bytes."""
    n = plane.size
    counts = hist[hist > 0]
    p = counts / n
    bits = float(-(counts * np.log2(p)).sum())
    return bits / 8 + _table_cost(counts) + 4 < n


def encode_planes(raw: bytes, elem: int) -> tuple[list, bytes]:
    """(tables, payload) for ``raw`` = n little-endian elements of ``elem`` bytes.

    Plane j = byte j of every element. ``tables[i]`` describes plane ``elem - 1 - i`` (top plane first): None =
    stored raw, else (used symbols, counts) = coded with that histogram. The top plane (sign + 7 exponent bits
    of an f32/bf16) is always coded; a lower plane is coded when that pays (constant or skewed bytes: zeros,
    integer tensors). Payload = one ANS stream (coded planes, top first) then the raw planes, lowest first.
    """
    a = np.frombuffer(raw, dtype=np.uint8).reshape(-1, elem)
    tables: list[tuple[list[int], list[int]] | None] = []
    coded = []
    for j in range(elem - 1, -1, -1):
        plane = np.ascontiguousarray(a[:, j])
        hist = np.bincount(plane, minlength=256)
        if j == elem - 1 or _plane_pays(plane, hist):
            used = np.flatnonzero(hist)
            tables.append(([int(u) for u in used], [int(c) for c in hist[used]]))
            coded.append((plane, used, hist[used]))
        else:
            tables.append(None)
    coder = _coder()
    for plane, used, counts in reversed(coded):  # a stack: the last plane decoded is pushed first
        if used.size > 1:
            lut = np.zeros(256, dtype=np.int32)
            lut[used] = np.arange(used.size, dtype=np.int32)
            coder.encode_reverse(lut[plane], categorical(quantize_counts(counts)))
    words = _words(coder).tobytes() if coded else b""
    rawp = b"".join(np.ascontiguousarray(a[:, j]).tobytes() for j in range(elem) if tables[elem - 1 - j] is None)
    return tables, words + rawp


def decode_planes(n: int, elem: int, tables: list, payload, where=None, tensor=None) -> bytearray:
    """Inverse of :func:`encode_planes`; ``payload`` must be exactly the stream words then the raw planes."""
    raw_planes = sum(t is None for t in tables)
    stream_len = len(payload) - n * raw_planes
    if len(tables) != elem or stream_len < 0 or stream_len % 4 or any(t and sum(t[1]) != n for t in tables):
        raise FormatError("'planes' values payload has the wrong length", path=where, tensor=tensor)
    if stream_len > 4 * (2 + (n * elem * PRECISION + 31) // 32):
        raise FormatError("'planes' values stream is longer than any valid one", path=where, tensor=tensor)
    mv = memoryview(payload)
    words = np.frombuffer(mv[:stream_len], dtype="<u4")
    if words.size and words[-1] == 0:
        raise FormatError("'planes' values stream ends in a zero word", path=where, tensor=tensor)
    dec = ans.Decoder(words)
    out = bytearray(n * elem)
    a = np.frombuffer(out, dtype=np.uint8).reshape(n, elem)
    for i, t in enumerate(tables):
        if t is None:
            continue
        used, counts = t
        if len(used) == 1:
            a[:, elem - 1 - i] = used[0]
        else:  # decoded straight into the plane's strided bytes, each symbol mapped to its byte
            dec.decode(ans.model(quantize_counts(counts)), n, out=a[:, elem - 1 - i], values=np.asarray(used))
            check_histogram(a[:, elem - 1 - i], used, counts, "'planes'", where, tensor)
    if not dec.is_empty():
        raise FormatError("'planes' values stream has data left after the last value", path=where, tensor=tensor)
    rawp = np.frombuffer(mv[stream_len:], dtype=np.uint8)
    k = 0
    for j in range(elem):
        if tables[elem - 1 - j] is None:
            a[:, j] = rawp[k * n:(k + 1) * n]
            k += 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# codebook: values that take at most 256 distinct values, as indices into a table (or a uniform grid)
# ---------------------------------------------------------------------------------------------------------------

MAX_CODEBOOK = 256
MAX_GRID_LEVEL = 1 << 24  # |level| <= 2**24: every level is an exact f32 integer


def grid_values(levels, step: float) -> np.ndarray:
    """Grid centroids: fl32(f32(level) * f32(step)), one IEEE binary32 multiply with round-to-nearest-even per
    value (numpy's float32 multiply; no fused operation). The reader and the lossy quantizer share this."""
    with np.errstate(over="ignore"):  # a hostile step may overflow to inf: the reader refuses it, quietly
        return np.asarray(levels, dtype=np.int64).astype(np.float32) * np.float32(step)


def encode_symbols(sym: np.ndarray, counts) -> bytes:
    """One ANS stream of ``sym`` (ints < len(counts)) under the model counts(...) (spec §12.7.1)."""
    coder = _coder()
    if len(counts) > 1:
        coder.encode_reverse(np.ascontiguousarray(sym, dtype=np.int32), categorical(quantize_counts(counts)))
    return _words(coder).tobytes()


def decode_symbols(words: np.ndarray, counts, n: int, what: str, where=None, tensor=None) -> np.ndarray:
    """``n`` symbols of one complete ANS stream under counts(...); the stream must end exactly (spec §6.3)."""
    if words.size and words[-1] == 0:
        raise FormatError(f"{what} stream ends in a zero word", path=where, tensor=tensor)
    dec = ans.Decoder(words)
    sym = dec.decode(ans.model(quantize_counts(counts)), n, dtype=np.uint8 if len(counts) <= 256 else np.int64)
    if not dec.is_empty():
        raise FormatError(f"{what} stream has data left after the last value", path=where, tensor=tensor)
    check_histogram(sym, range(len(counts)), counts, what, where, tensor)
    return sym


def check_histogram(symbols: np.ndarray, used, counts, what: str, where=None, tensor=None) -> None:
    """Decoded ``symbols`` (byte or index values) occur exactly as the stored histogram says: ``used[j]`` exactly
    ``counts[j]`` times (spec §12.8: one spelling per tensor). Counted in slices: a few KB besides the input."""
    hist = np.zeros(256 if symbols.dtype == np.uint8 else max(len(counts), 1), dtype=np.int64)
    step = 1 << 16
    for i in range(0, symbols.shape[0], step):
        hist += np.bincount(symbols[i:i + step], minlength=hist.size)[:hist.size]
    if hist[np.asarray(list(used), dtype=np.int64)].tolist() != [int(c) for c in counts]:
        raise FormatError(f"{what} stream decodes to another histogram than the one stored", path=where,
                          tensor=tensor)
