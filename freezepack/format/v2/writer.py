"""Format v2, model -> bytes (spec/FORMAT.md §12): the same FreezeNet in bytes proportional to its information.

Masks may use the v1 coders or ``ans-ctx``; values and whole tensors ``raw``, ``planes``, ``cast`` (F32 values that
are exactly F16/BF16) or ``codebook`` (at most 256 distinct values: a table or a uniform grid, plus ANS-coded
indices); see freezepack.format.entropy. The writer keeps the smallest coding of each; every coding is lossless.
"""
from __future__ import annotations

import hashlib
import math
from functools import partial

import numpy as np

from ...errors import SpecError
from ...parallel import run_ordered, thread_count
from .. import entropy, maskcode
from ..dtypes import DTYPE_SIZES, DTYPES
from ..init import DISTRIBUTIONS, generate
from ..initializers import INITIALIZERS
from ..model import MASK_SUFFIX, VALUES_SUFFIX, AliasEntry, Entry, FrozenEntry, Header, Parts, WholeEntry
from ..strictjson import canonical_json
from .wire import (
    DEFAULT_PARAMS,
    DIGEST_BYTES,
    GENERATORS,
    KINDS,
    MASK_CODERS,
    TAG_PARAMS,
    TAG_SCALE,
    TAG_STREAM,
    VALUE_CODERS,
    Out,
    name_out,
    outer_header,
    shape_out,
    zigzag,
)


def _mask_block(coder: str, params: dict, payload: bytes) -> bytes:
    o = Out()
    o.u8(MASK_CODERS.index(coder))
    if coder == "positions":
        o.u8(params["value"])
    elif coder == "ans-gaps":
        o.u8(params["value"])
        o.u8(params["b"])
        o.var(params["phi"])
    elif coder == "ans-ctx":
        o.u8(params["bins"])
        o.u8(params["flags"])
        if params["flags"] & entropy.FLAG_COLS:
            o.var(params["col_ones"])
        if params["flags"] & entropy.FLAG_ROWS:
            o.var(params["row_ones"])
        for c in params["counts"]:
            o.var(c)
    if coder != "const":
        o.var(len(payload))
    return bytes(o.b)


def _planes_block(raw: bytes, elem: int) -> tuple[bytes, bytes] | None:
    if not len(raw):
        return None
    tables, payload = entropy.encode_planes(raw, elem)
    o = Out()
    o.u8(VALUE_CODERS.index("planes"))
    o.u8(sum(1 << (elem - 1 - i) for i, t in enumerate(tables) if t is not None))  # bit j: plane j coded
    for t in tables:
        if t is not None:
            o.u8(len(t[0]) - 1)
            o.b += bytes(t[0])
            for c in t[1]:
                o.var(c)
    o.var(len(payload) - len(raw) // elem * sum(t is None for t in tables))
    return bytes(o.b), payload


def _cast_block(raw: bytes, dtype: str) -> tuple[bytes, bytes] | None:
    """F32 values that are all exactly BF16 (or finite F16) numbers: their 2-byte form, itself raw or planes."""
    if dtype != "F32" or not len(raw):
        return None
    a = np.frombuffer(raw, dtype="<u4")
    if not np.any(a & 0xFFFF):  # the low half of every f32 is zero: the top half is the exact bf16
        target, half = "BF16", (a >> 16).astype("<u2").tobytes()
    else:
        f = a.view("<f4")
        with np.errstate(over="ignore", invalid="ignore"):  # values beyond F16 become inf, and are refused below
            h = f.astype("<f2")
        if not np.all(np.isfinite(h)) or not np.array_equal(h.astype("<f4").view("<u4"), a):
            return None
        target, half = "F16", h.tobytes()
    head, payload = _smallest([(bytes([VALUE_CODERS.index("raw")]), half), _planes_block(half, 2)])
    return bytes([VALUE_CODERS.index("cast"), DTYPES.index(target)]) + head, payload


def _codebook_block(raw: bytes, dtype: str, step: float | None) -> tuple[bytes, bytes] | None:
    """Values with at most 256 distinct bit patterns: a table (or, with the quantizer's ``step``, a uniform grid)
    plus one ANS-coded index per value."""
    elem = DTYPE_SIZES[dtype]
    n = len(raw) // elem
    if n < 2 or elem == 1:
        return None
    ints = np.frombuffer(raw, dtype=f"<u{elem}")
    if np.unique(ints[:4096]).size > entropy.MAX_CODEBOOK:  # cheap early exit for ordinary float tensors
        return None
    table, sym = np.unique(ints, return_inverse=True)  # ascending as unsigned integers: the canonical order
    if table.size > entropy.MAX_CODEBOOK:
        return None
    counts = np.bincount(sym.reshape(-1), minlength=table.size)
    o = Out()
    o.u8(VALUE_CODERS.index("codebook"))
    grid = None
    if step is None and dtype == "F32" and table.size > 1:
        step = _grid_step(table.view("<f4"))
    if step is not None and dtype == "F32" and math.isfinite(step) and step > 0:
        f = table.view("<f4").astype(np.float64)
        levels = np.rint(f / step).astype(np.int64)
        order = np.argsort(levels, kind="stable")
        if (np.abs(levels) <= entropy.MAX_GRID_LEVEL).all() and np.unique(levels).size == levels.size and \
                np.array_equal(entropy.grid_values(levels, step).view("<u4"), table):
            grid = levels[order]
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.size)
            sym, counts = inverse[sym.reshape(-1)], counts[order]
    if grid is not None and step is not None:
        o.u8(1)
        o.u8(len(grid) - 1)
        o.f32(step)
        o.var(zigzag(int(grid[0])))
        for d in np.diff(grid):
            o.var(int(d) - 1)
    else:
        o.u8(0)
        o.u8(table.size - 1)
        o.b += table.astype(f"<u{elem}").tobytes()
    payload = b""
    if table.size > 1:
        for c in counts:
            o.var(int(c))
        payload = entropy.encode_symbols(sym.reshape(-1), counts)
        o.var(len(payload))
    return bytes(o.b), payload


def _grid_step(values: np.ndarray) -> float | None:
    """The step of a symmetric uniform grid the values lie on (uniform:K / int8 quantizers, ours or another's: the
    largest |value| is level +-(2**(K-1) - 1)), or None. Lets a model re-saved without its quantizer's hint keep
    the grid form. Only candidates are tried; the caller checks the grid bit for bit."""
    with np.errstate(all="ignore"):
        amax = float(np.abs(values.astype(np.float64)).max())
        if not math.isfinite(amax) or amax == 0.0:
            return None
        for top in (1, 3, 7, 15, 31, 63, 127):
            s0 = np.float32(amax / top)
            for s in (s0, np.nextafter(s0, np.float32(np.inf)), np.nextafter(s0, np.float32(0))):
                if not s > 0:
                    continue
                levels = np.rint(values.astype(np.float64) / float(s))
                if np.abs(levels).max() <= top and np.array_equal(entropy.grid_values(levels.astype(np.int64), s),
                                                                  values):
                    return float(s)
    return None


def _smallest(blocks):
    best = None
    for b in blocks:
        if b is not None and (best is None or len(b[0]) + len(b[1]) < len(best[0]) + len(best[1])):
            best = b
    return best


def _value_block(raw: bytes, dtype: str, step: float | None = None) -> tuple[bytes, bytes, str]:
    """(header bytes, payload, coder name) of the smallest lossless coding of a tensor's bytes: ``raw``,
    ``planes``, ``cast`` (F32 values that are exactly BF16/F16) or ``codebook`` (<= 256 distinct values)."""
    elem = DTYPE_SIZES[dtype]
    raw = bytes(raw)
    best = _smallest([(bytes([VALUE_CODERS.index("raw")]), raw), _planes_block(raw, elem), _cast_block(raw, dtype),
                      _codebook_block(raw, dtype, step)])
    return best[0], best[1], VALUE_CODERS[best[0][0]]


# The reference writer tries ``ans-ctx`` only on tensors up to this size: its context ranks all n values of |w_init|
# (O(n log n)) and decodes all n entries, while ``ans-gaps`` decodes only the minority. Measured on VGG16-D (15.3M
# parameters, q = 0.99, one CPU run): ctx on every tensor loads in 2.76 s (v1: 0.15 s) for a 0.68x file; capped at
# 2^19, 0.36 s for a 0.69x file. Every LeNet-5-Caffe tensor stays below it. A writer's choice: readers decode both.
CTX_MAX_ELEMENTS = 1 << 19


def _best_mask(e: FrozenEntry, mask: np.ndarray, seed: int, only: str | None = None) -> tuple[bytes, bytes, str, dict]:
    """The smallest (header bytes + payload) coding of a flat bool mask among every v2 mask coder (``only``: among
    that coder's codings; the conformance vectors use it to show every coder)."""
    n, k = mask.size, int(np.count_nonzero(mask))
    v1, tried = maskcode.encode_candidates(mask)  # each coding computed once (the gap codes, Bernoulli's)
    cands = []
    if only == "positions" and v1.coder != "const":
        value = 1 if k <= n - k else 0
        v1 = maskcode.CodedMask("positions", k, {"value": value}, np.flatnonzero(mask if value else ~mask))
    gaps_bern = [c for c in tried if c.coder in ("ans-gaps", "ans-bernoulli")]
    if v1.coder != "const" and n <= 1 << 32 and not any(c.coder == "ans-bernoulli" for c in tried) and (
            only is not None or n <= CTX_MAX_ELEMENTS):  # skipped above; here it may still matter: compute it
        gaps_bern.append(maskcode._encode_ans(mask, n, k))
    for cm in [v1] + ([] if v1.coder == "const" or n > 1 << 32 else gaps_bern):
        cands.append((cm.coder, dict(cm.params), cm.payload.astype("<u4").tobytes()))  # (cdf1 is not written)
    if v1.coder != "const" and e.init.dist != "constant" and (n <= CTX_MAX_ELEMENTS or only == "ans-ctx"):
        keys = entropy.context_keys(generate(e.init, e.shape, seed, e.stream_key, device="cpu").numpy())
        for params, words in entropy.encode_ctx(mask, keys, e.shape):
            cands.append(("ans-ctx", params, words.tobytes()))
    best: tuple[bytes, bytes, str, dict] | None = None
    gaps: tuple[bytes, bytes, str, dict] | None = None
    for coder, params, payload in cands:
        if only is not None and coder != only:
            continue
        head = _mask_block(coder, params, payload)
        if best is None or len(head) + len(payload) < len(best[0]) + len(best[1]):
            best = (head, payload, coder, params)
        if coder == "ans-gaps" and (gaps is None or len(head) + len(payload) < len(gaps[0]) + len(gaps[1])):
            gaps = (head, payload, coder, params)
    # As v1's writer (§6): 'ans-gaps' decodes only the minority, 'ans-bernoulli' every entry (a random mask of
    # VGG16-D: 15 M symbols, ~50 ms); within 1 % of the size, the faster one wins.
    assert best is not None, "no mask coding"  # (the v1 coding is always a candidate)
    if best[2] == "ans-bernoulli" and gaps is not None and \
            len(gaps[0]) + len(gaps[1]) <= 1.01 * (len(best[0]) + len(best[1])):
        best = gaps
    return best


def _code_parts(h: Header, blobs: Parts, threads: int | None) -> list:
    """Per entry, the coded blocks the body needs: ``(value block,)`` of a whole tensor, ``(mask block, values
    block or None)`` of a frozen one, None of an alias. Tensors are coded at once on ``threads`` threads (default
    torch's CPU threads; the compiled coders, numpy and hashing release the GIL); results in entry order, the
    first error in entry order, so the bytes never depend on the thread count."""
    def code(e: Entry):
        if isinstance(e, AliasEntry):
            return None
        if isinstance(e, WholeEntry):
            return (_value_block(blobs[e.data_key][2], e.dtype),)
        words = np.frombuffer(blobs[e.mask_key][2], dtype="<u4") if e.mask_key else np.zeros(0, np.uint32)
        mask = maskcode.decode(e.coder, e.numel, e.trainable, dict(e.coder_params), words)
        values = None
        if e.trainable:
            blob = blobs[e.name + VALUES_SUFFIX]  # (dtype, shape, bytes[, {"step": ...}]): a lossy quantizer's hint
            values = _value_block(blob[2], e.dtype, blob[3].get("step") if len(blob) > 3 else None)
        return _best_mask(e, mask, h.seed), values

    return run_ordered([(0 if isinstance(e, AliasEntry) else e.numel, partial(code, e)) for e in h.entries],
                       thread_count(threads))


def encode_body(h: Header, blobs: Parts, threads: int | None = None) -> bytes:
    """The body (digest || header || payloads) of a v2 file for the same inputs as ``v1.writer.encode_file``.

    ``blobs`` holds the parts as v1 stores them (whole data, v1-coded masks, values); the v2 writer re-codes each mask
    with every coder it knows (including ``ans-ctx``, which needs the regenerated frozen values) and keeps the
    smallest, and codes values and whole tensors with the smaller of ``raw`` and ``planes``.
    """
    o = Out()
    if h.generator not in GENERATORS:
        raise SpecError(f"generator {h.generator!r} has no v2 code")
    o.u8(GENERATORS.index(h.generator))
    o.var(h.seed)
    o.str(h.producer)
    meta = sorted(h.metadata.items(), key=lambda kv: kv[0].encode("utf-8"))
    o.var(len(meta))
    for k, v in meta:
        o.str(k)
        o.str(v)
    o.var(len(h.entries))
    coded = _code_parts(h, blobs, threads)
    payloads = []
    index: dict[str, int] = {}
    prev = b""
    for i, e in enumerate(h.entries):
        index.setdefault(e.name, i)
        prev = name_out(o, prev, e.name)
        if isinstance(e, AliasEntry):
            o.u8(KINDS.index("alias"))
            if e.of not in index or isinstance(h.entries[index[e.of]], AliasEntry):
                raise SpecError(f"alias of {e.of!r}: not an earlier non-alias tensor", tensor=e.name)
            o.var(index[e.of])  # 0-based, counting every entry (aliases too)
            continue
        if isinstance(e, WholeEntry):
            o.u8(KINDS.index("whole"))
            o.u8(DTYPES.index(e.dtype))
            shape_out(o, e.shape)
            head, payload, _ = coded[i][0]
            o.b += head
            payloads.append((e.data_key, payload))
            continue
        params_default = canonical_json(e.init.params) == canonical_json(DEFAULT_PARAMS.get(e.init.name, None))
        stream = e.stream is not None and e.stream != e.name
        o.u8(KINDS.index("frozen") | (TAG_STREAM if stream else 0) | (TAG_SCALE if e.frozen_scale != 1.0 else 0)
             | (0 if params_default else TAG_PARAMS))
        o.u8(DTYPES.index(e.dtype))
        shape_out(o, e.shape)
        if e.stream is not None and stream:
            o.str(e.stream)
        o.u8(INITIALIZERS.index(e.init.name) << 2 | DISTRIBUTIONS.index(e.init.dist))
        o.f32(e.init.a)
        o.f32(e.init.b)
        if not params_default:
            o.str(canonical_json(e.init.params))
        if e.frozen_scale != 1.0:
            o.f32(e.frozen_scale)
        o.var(e.trainable)
        (head, payload, _, _), values = coded[i]
        o.b += head
        if payload:
            payloads.append((e.name + MASK_SUFFIX, payload))
        if e.trainable:
            head, payload, _ = values
            o.b += head
            payloads.append((e.name + VALUES_SUFFIX, payload))
        o.b += bytes.fromhex(e.sha256)[:DIGEST_BYTES]
    rest = bytes(o.b) + b"".join(p for _, p in payloads)
    return hashlib.sha256(rest).digest() + rest


def encode_file(h: Header, blobs: Parts, threads: int | None = None) -> list[bytes]:
    """Byte chunks of a v2 file (the same inputs as ``v1.writer.encode_file``; ``threads``: see encode_body)."""
    body = encode_body(h, blobs, threads)
    return [outer_header(len(body)), body]
