"""Format version 2 (spec/FORMAT.md §12): the same FreezeNet in bytes proportional to its information.

A v2 file is still a valid safetensors file, but it stores exactly one ``U8`` tensor named ``freezepack`` and the
metadata ``{"freezepack": "2"}``; the safetensors JSON is therefore a function of the tensor's length alone, and
the tensor (the *body*) holds a binary header and every payload back to back:

    body  = SHA-256(rest) [32 bytes] || rest
    rest  = header || payload of entry 0 || payload of entry 1 || ...

One SHA-256 covers every stored byte (header, masks, values, whole tensors); each frozen tensor keeps a 128-bit
digest of its reconstructed dense bytes (the proof of bit-exact regeneration). Masks may use the v1 coders or
``ans-ctx``; values and whole tensors ``raw``, ``planes``, ``cast`` (F32 values that are exactly F16/BF16) or
``codebook`` (at most 256 distinct values: a table or a uniform grid, plus ANS-coded indices); see
freezepack.format.entropy. The writer keeps the smallest coding of each; every coding is lossless.

The reader produces the same :class:`~freezepack.format.container.Header` / ``Entry`` objects as v1, so everything
above the container is version-blind; :class:`freezepack.format.container.FpkReader` dispatches here.
"""
from __future__ import annotations

import hashlib
import math
import struct

import numpy as np

from ..errors import FormatError, FreezepackError, IntegrityError, SpecError
from . import entropy, maskcode
from .container import (
    ALIGNMENT,
    DEFAULT_LIMITS,
    DTYPE_SIZES,
    FROZEN_DTYPES,
    MASK_SUFFIX,
    VALUES_SUFFIX,
    Entry,
    Header,
    Limits,
    Stored,
    _round_float,
    canonical_json,
    parse_json,
)
from .init import DISTRIBUTIONS, INITIALIZERS, InitSpec
from .rng import SPEC_VERSION

VERSION = 2
TENSOR_KEY = "freezepack"
GENERATORS = (SPEC_VERSION,)
DTYPES = ("F64", "I64", "U64", "F32", "I32", "U32", "F16", "BF16", "I16", "U16", "I8", "U8", "BOOL")
MASK_CODERS = ("const", "positions", "ans-gaps", "ans-bernoulli", "ans-ctx")
VALUE_CODERS = ("raw", "planes", "cast", "codebook")
KINDS = ("whole", "frozen", "alias")
TAG_STREAM, TAG_SCALE, TAG_PARAMS = 4, 8, 16
DIGEST_BYTES = 16          # per frozen tensor: SHA-256 of the dense bytes, truncated (see spec §12.6)
# The initializer arguments a writer would have to spell out, when they are torch's defaults (make_init's).
DEFAULT_PARAMS = {"xavier_normal": {"gain": 1.0}, "xavier_uniform": {"gain": 1.0},
                  "kaiming_normal": {"a": 0.0, "mode": "fan_in", "nonlinearity": "leaky_relu"},
                  "kaiming_uniform": {"a": 0.0, "mode": "fan_in", "nonlinearity": "leaky_relu"},
                  "normal": {"mean": 0.0, "std": 1.0}, "uniform": {"a": 0.0, "b": 1.0}, "pm_sigma": {"gain": 1.0},
                  "zeros": {}, "constant": {"val": 0.0}}
_META_PREFIX = b'{"__metadata__":{"freezepack":"2"},'


def outer_header(body_len: int) -> bytes:
    """The 8-byte prefix and safetensors JSON of a v2 file whose body has ``body_len`` bytes (all determined)."""
    text = canonical_json({"__metadata__": {"freezepack": str(VERSION)},
                           TENSOR_KEY: {"dtype": "U8", "shape": [body_len], "data_offsets": [0, body_len]}})
    raw = text.encode("ascii")
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


def is_v2(raw_header: bytes) -> bool:
    return raw_header.startswith(_META_PREFIX)


# ---------------------------------------------------------------------------------------------------------------
# primitive encodings
# ---------------------------------------------------------------------------------------------------------------

class _Out:
    def __init__(self):
        self.b = bytearray()

    def u8(self, v: int):
        self.b.append(v)

    def var(self, v: int):  # unsigned LEB128, minimal
        v = int(v)
        while True:
            byte = v & 0x7F
            v >>= 7
            if v:
                self.b.append(byte | 0x80)
            else:
                self.b.append(byte)
                return

    def f32(self, v: float):
        self.b += struct.pack("<f", v)

    def str(self, s: str):
        raw = s.encode("utf-8")
        self.var(len(raw))
        self.b += raw


class _In:
    """A bounds-checked cursor: every read past the end or malformed number is a FormatError."""

    def __init__(self, data: bytes, path):
        self.d, self.i, self.path = data, 0, path
        self.tensor = None

    def err(self, msg):
        return FormatError(msg, path=self.path, tensor=self.tensor)

    def u8(self) -> int:
        if self.i >= len(self.d):
            raise self.err("v2 header ends early (truncated or corrupted)")
        self.i += 1
        return self.d[self.i - 1]

    def var(self, hi: int = 1 << 64) -> int:
        v = shift = 0
        start = self.i
        while True:
            b = self.u8()
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if shift >= 70:
                raise self.err("v2 varint longer than 10 bytes")
        if self.i - start > 1 and b == 0:
            raise self.err("v2 varint is not minimal")
        if v >= hi:
            raise self.err(f"v2 number {v} out of range (< {hi})")
        return v

    def take(self, n: int) -> bytes:
        if n > len(self.d) - self.i:
            raise self.err("v2 header ends early (truncated or corrupted)")
        self.i += n
        return self.d[self.i - n:self.i]

    def f32(self, what) -> float:
        v = struct.unpack("<f", self.take(4))[0]
        if not math.isfinite(v):
            raise self.err(f"{what} is not finite")
        return v

    def str(self, what, max_len: int = 1 << 20) -> str:
        n = self.var()
        if n > max_len:
            raise self.err(f"{what} is longer than {max_len} bytes")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise self.err(f"{what} is not UTF-8") from None


def _shape_out(o: _Out, shape):
    o.var(len(shape))
    for d in shape:
        o.var(d)


def _shape_in(c: _In, limits: Limits) -> tuple[int, ...]:
    nd = c.var()
    if nd > limits.max_ndim:
        raise c.err(f"shape has {nd} dimensions, over the limit of {limits.max_ndim}")
    shape = tuple(c.var() for _ in range(nd))
    if any(d > limits.max_tensor_elements for d in shape):
        raise c.err(f"shape {list(shape)} has a dimension over the limit of {limits.max_tensor_elements} elements")
    if math.prod(shape) > limits.max_tensor_elements:
        raise c.err(f"shape {list(shape)} has more than {limits.max_tensor_elements} elements (limit)")
    return shape


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------

def _mask_block(coder: str, params: dict, payload: bytes) -> bytes:
    o = _Out()
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
    o = _Out()
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
    o = _Out()
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
    if grid is not None:
        o.u8(1)
        o.u8(len(grid) - 1)
        o.f32(step)
        o.var(_zigzag(int(grid[0])))
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


def _zigzag(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1


def _unzigzag(v: int) -> int:
    return v // 2 if v % 2 == 0 else -(v + 1) // 2


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


def _best_mask(e: Entry, mask: np.ndarray, seed: int, only: str | None = None) -> tuple[bytes, bytes, str, dict]:
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
        from .init import generate  # torch; writing only

        keys = entropy.context_keys(generate(e.init, e.shape, seed, e.stream_key, device="cpu").numpy())
        for params, words in entropy.encode_ctx(mask, keys, e.shape):
            cands.append(("ans-ctx", params, words.tobytes()))
    best = gaps = None
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
    if best[2] == "ans-bernoulli" and gaps is not None and \
            len(gaps[0]) + len(gaps[1]) <= 1.01 * (len(best[0]) + len(best[1])):
        best = gaps
    return best


def encode_body(h: Header, blobs: dict) -> bytes:
    """The body (digest || header || payloads) of a v2 file for the same inputs as ``container.encode_file``.

    ``blobs`` holds the v1 stored tensors (whole data, v1-coded masks, values); the v2 writer re-codes each mask
    with every coder it knows (including ``ans-ctx``, which needs the regenerated frozen values) and keeps the
    smallest, and codes values and whole tensors with the smaller of ``raw`` and ``planes``.
    """
    o = _Out()
    o.u8(GENERATORS.index(h.generator) if h.generator in GENERATORS else _bad_generator(h.generator))
    o.var(h.seed)
    o.str(h.producer)
    meta = sorted(h.metadata.items(), key=lambda kv: kv[0].encode("utf-8"))
    o.var(len(meta))
    for k, v in meta:
        o.str(k)
        o.str(v)
    o.var(len(h.entries))
    payloads = []
    index = {}
    h.stored = {}
    prev = b""
    for i, e in enumerate(h.entries):
        index.setdefault(e.name, i)
        prev = _name_out(o, prev, e.name)
        if e.kind == "alias":
            o.u8(KINDS.index("alias"))
            if e.of not in index or h.entries[index[e.of]].kind == "alias":
                raise SpecError(f"alias of {e.of!r}: not an earlier non-alias tensor", tensor=e.name)
            o.var(index[e.of])
            continue
        if e.kind == "whole":
            o.u8(KINDS.index("whole"))
            o.u8(DTYPES.index(e.dtype))
            _shape_out(o, e.shape)
            raw = blobs[e.data][2]
            head, payload, _ = _value_block(raw, e.dtype)
            o.b += head
            payloads.append((e.data, payload))
            continue
        params_default = canonical_json(e.init.params) == canonical_json(DEFAULT_PARAMS.get(e.init.name, None))
        stream = e.stream is not None and e.stream != e.name
        o.u8(KINDS.index("frozen") | (TAG_STREAM if stream else 0) | (TAG_SCALE if e.frozen_scale != 1.0 else 0)
             | (0 if params_default else TAG_PARAMS))
        o.u8(DTYPES.index(e.dtype))
        _shape_out(o, e.shape)
        if stream:
            o.str(e.stream)
        o.u8(INITIALIZERS.index(e.init.name) << 2 | DISTRIBUTIONS.index(e.init.dist))
        o.f32(e.init.a)
        o.f32(e.init.b)
        if not params_default:
            o.str(canonical_json(e.init.params))
        if e.frozen_scale != 1.0:
            o.f32(e.frozen_scale)
        o.var(e.trainable)
        words = np.frombuffer(blobs[e.mask][2], dtype="<u4") if e.mask else np.zeros(0, np.uint32)
        mask = maskcode.decode(e.coder, e.numel, e.trainable, e.coder_params, words)
        head, payload, _, _ = _best_mask(e, mask, h.seed)
        o.b += head
        if payload:
            payloads.append((e.name + MASK_SUFFIX, payload))
        if e.trainable:
            blob = blobs[e.values]  # (dtype, shape, bytes[, {"step": ...}]): the lossy quantizer's grid hint
            head, payload, _ = _value_block(blob[2], e.dtype, blob[3].get("step") if len(blob) > 3 else None)
            o.b += head
            payloads.append((e.name + VALUES_SUFFIX, payload))
        o.b += bytes.fromhex(e.sha256)[:DIGEST_BYTES]
    rest = bytes(o.b)
    pos = 32 + len(rest)
    for key, p in payloads:
        h.stored[key] = Stored(key, "U8", (len(p),), pos, pos + len(p), "")
        pos += len(p)
    rest += b"".join(p for _, p in payloads)
    h.version = VERSION
    return hashlib.sha256(rest).digest() + rest


def _common(a: bytes, b: bytes) -> int:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return i


def _name_out(o: _Out, prev: bytes, name: str) -> bytes:
    """Front coding: bytes shared with the previous name, then the rest (BN layers share long prefixes)."""
    raw = name.encode("utf-8")
    shared = _common(prev, raw)
    o.var(shared)
    o.var(len(raw) - shared)
    o.b += raw[shared:]
    return raw


def _name_in(c: _In, prev: bytes) -> tuple[str, bytes]:
    shared = c.var(len(prev) + 1)
    rest = bytes(c.take(c.var(1 << 16)))
    if rest[:1] and shared < len(prev) and rest[0] == prev[shared]:
        raise c.err("tensor name does not share its longest prefix with the previous one (not canonical)")
    raw = prev[:shared] + rest
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        raise c.err("tensor name is not UTF-8") from None


def _bad_generator(g):
    raise SpecError(f"generator {g!r} has no v2 code")


def encode_file(h: Header, blobs: dict) -> list:
    """Byte chunks of a v2 file (drop-in for ``container.encode_file``)."""
    body = encode_body(h, blobs)
    return [outer_header(len(body)), body]


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------

class Body:
    """A parsed v2 body: the Header plus, per stored key, (coder, params, payload slice)."""

    def __init__(self, body: bytes, path=None, limits: Limits = DEFAULT_LIMITS):
        self.path = path
        if len(body) < 32 or hashlib.sha256(memoryview(body)[32:]).digest() != body[:32]:
            raise IntegrityError("file is corrupted (v2 body SHA-256 mismatch)", path=path)
        self.body = body
        self.body_len = len(body)
        self.parts: dict[str, tuple] = {}
        self.model_bytes = {"mask": 0, "values": 0}  # header bytes that are coder parameters (for accounting)
        self.header = self._parse(_In(memoryview(body)[32:], path), limits)

    @classmethod
    def layout(cls, head: bytes, body_len: int, path=None, limits: Limits = DEFAULT_LIMITS) -> tuple[int, list]:
        """``(header_end, [(key, start, end), ...])``: where the header ends and each payload lies in a body of
        ``body_len`` bytes, parsed from its first bytes ``head`` only (every structural check, every length
        against ``body_len``; a header longer than ``head`` is a FormatError). The digest is NOT checked: this
        is for cutting a file whose bytes something else checks (freezepack.fleet.delta, against a signed
        full-file hash), and must not read a whole large body to find its payload boundaries."""
        self = cls.__new__(cls)
        self.path, self.body, self.body_len = path, None, body_len
        self.parts, self.model_bytes = {}, {"mask": 0, "values": 0}
        if len(head) < 32 or body_len < len(head):
            raise FormatError("v2 body is shorter than its digest", path=path)
        c = _In(memoryview(head)[32:], path)
        self._parse(c, limits)
        return 32 + c.i, [(key, start, end) for key, (_, _, start, end) in self.parts.items()]

    def _parse(self, c: _In, limits: Limits) -> Header:
        g = c.u8()
        if g >= len(GENERATORS):
            raise SpecError(f"unknown generator code {g} (this reader knows {', '.join(GENERATORS)})", path=self.path)
        seed = c.var()
        producer = c.str("producer")
        h = Header(seed=seed, entries=[], producer=producer, generator=GENERATORS[g], version=VERSION)
        nmeta = c.var(limits.max_metadata_bytes + 1)
        prev, meta_bytes = None, 0
        for _ in range(nmeta):
            k, v = c.str("metadata key"), c.str("metadata value")
            kb = k.encode("utf-8")
            if prev is not None and kb <= prev:
                raise c.err("metadata keys are not strictly increasing")
            prev = kb
            meta_bytes += len(kb) + len(v.encode("utf-8"))
            if meta_bytes > limits.max_metadata_bytes:
                raise c.err(f"metadata is larger than {limits.max_metadata_bytes} bytes")
            h.metadata[k] = v
        count = c.var(limits.max_tensors + 1)
        names: dict[str, int] = {}
        total = 0
        lengths = []  # (key, coder, params, length, n, elem)
        prev = b""
        for i in range(count):
            c.tensor = None
            name, prev = _name_in(c, prev)
            c.tensor = name
            if not name or name == "__metadata__" or name in names:
                raise c.err("invalid or repeated tensor name")
            names[name] = i
            tag = c.u8()
            kind = tag & 3
            if kind >= len(KINDS) or tag & ~(3 | TAG_STREAM | TAG_SCALE | TAG_PARAMS) or \
                    (kind != 1 and tag & ~3):
                raise c.err(f"unknown entry tag {tag}")
            if KINDS[kind] == "alias":
                j = c.var(i)
                target = h.entries[j]
                if target.kind == "alias":
                    raise c.err(f"alias of {target.name!r}, itself an alias")
                h.entries.append(Entry(name, "alias", target.shape, target.dtype, target.sha256, of=target.name))
                continue
            d = c.u8()
            if d >= len(DTYPES):
                raise c.err(f"unknown dtype code {d}")
            dtype = DTYPES[d]
            shape = _shape_in(c, limits)
            n = math.prod(shape)
            total += n
            if total > limits.max_total_elements:
                raise c.err(f"tensors hold more than {limits.max_total_elements} elements in all (limit)")
            if KINDS[kind] == "whole":
                e = Entry(name, "whole", shape, dtype, "", data=name)
                lengths.append((name,) + self._value_block(c, n, dtype))
                h.entries.append(e)
                continue
            if dtype not in FROZEN_DTYPES:
                raise c.err(f"dtype {dtype} is not allowed for a frozen tensor")
            e = Entry(name, "frozen", shape, dtype, "")
            if tag & TAG_STREAM:
                e.stream = c.str("stream")
                if not e.stream or e.stream == name:
                    raise c.err("stream must be given only when it differs from the name")
            ib = c.u8()
            if ib >> 2 >= len(INITIALIZERS) or (ib & 3) >= len(DISTRIBUTIONS):
                raise SpecError(f"unknown initializer code {ib}", path=self.path, tensor=name)
            a, b = c.f32("init a"), c.f32("init b")
            iname = INITIALIZERS[ib >> 2]
            if tag & TAG_PARAMS:
                params = parse_json(c.str("init params"), "init params", self.path)
                if not isinstance(params, dict) or canonical_json(params) == canonical_json(DEFAULT_PARAMS[iname]):
                    raise c.err("init params must be an object other than the defaults")
            else:
                params = dict(DEFAULT_PARAMS[iname])
            try:
                e.init = InitSpec(iname, DISTRIBUTIONS[ib & 3], a, b, params)
            except FreezepackError as err:
                raise SpecError(err.reason, path=self.path, tensor=name) from None
            if tag & TAG_SCALE:
                e.frozen_scale = c.f32("frozen_scale")
                if e.frozen_scale == 1.0:
                    raise c.err("frozen_scale 1.0 must not be spelled out")
                if dtype != "F32" and e.frozen_scale != _round_float(e.frozen_scale, dtype):
                    raise c.err(f"frozen_scale {e.frozen_scale!r} is not exactly a {dtype} number")
            e.trainable = c.var(n + 1)
            at = c.i
            mc = c.u8()
            if mc >= len(MASK_CODERS):
                raise FormatError(f"unknown mask coder code {mc}: written by a newer freezepack?", path=self.path,
                                  tensor=name)
            e.coder = MASK_CODERS[mc]
            e.coder_params = self._mask_params(c, e)
            if e.coder != "const":
                mlen = c.var(self.body_len + 1)
                if mlen % 4:
                    raise c.err("mask payload is not whole 32-bit words")
                words = mlen // 4
                if e.coder == "ans-ctx":
                    entropy.check_ctx(n, e.trainable, shape, e.coder_params, words, self.path, name)
                else:
                    maskcode.check_params(e.coder, n, e.trainable, e.coder_params, words, where=self.path,
                                          tensor=name)
                e.mask = name + MASK_SUFFIX
                lengths.append((e.mask, "mask", None, mlen))
            else:
                maskcode.check_params("const", n, e.trainable, {}, 0, where=self.path, tensor=name)
            self.model_bytes["mask"] += c.i - at
            if e.trainable:
                e.values = name + VALUES_SUFFIX
                lengths.append((e.values,) + self._value_block(c, e.trainable, dtype))
            e.sha256 = bytes(c.take(DIGEST_BYTES)).hex()
            h.entries.append(e)
        c.tensor = None
        pos = 32 + c.i
        for key, coder, params, length in lengths:
            if length > self.body_len - pos:
                raise FormatError("v2 payloads run past the end of the file (truncated or lying lengths)",
                                  path=self.path)
            h.stored[key] = Stored(key, "U8", (length,), pos, pos + length, "")
            self.parts[key] = (coder, params, pos, pos + length)
            pos += length
        if pos != self.body_len:
            raise FormatError(f"v2 body has {self.body_len - pos} bytes after the last payload", path=self.path)
        return h

    def _mask_params(self, c: _In, e: Entry) -> dict:
        if e.coder == "positions":
            return {"value": c.u8()}
        if e.coder == "ans-gaps":
            return {"value": c.u8(), "b": c.u8(), "phi": c.var(1 << 32)}
        if e.coder == "ans-bernoulli":
            if not 0 < e.trainable < e.numel:
                raise c.err("'ans-bernoulli' mask with nothing to code")
            return {"cdf1": maskcode.ans_threshold(e.numel, e.trainable)}
        if e.coder == "ans-ctx":
            nb, flags = c.u8(), c.u8()
            p = {"bins": nb, "flags": flags}
            if flags & entropy.FLAG_COLS:
                p["col_ones"] = c.var(e.numel + 1)
            if flags & entropy.FLAG_ROWS:
                p["row_ones"] = c.var(e.numel + 1)
            if nb > entropy.MAX_BINS:
                raise c.err(f"'ans-ctx' with {nb} bins (at most {entropy.MAX_BINS})")
            p["counts"] = [c.var(e.numel + 1) for _ in range(nb)]
            return p
        return {}

    def _value_block(self, c: _In, n: int, dtype: str):
        at = c.i
        try:
            return self._value_block_(c, n, dtype)
        finally:
            self.model_bytes["values"] += c.i - at

    def _value_block_(self, c: _In, n: int, dtype: str, nested: bool = False):
        """(coder, params, payload length) of one value block (spec §12.8)."""
        elem = DTYPE_SIZES[dtype]
        vc = c.u8()
        if vc >= len(VALUE_CODERS) or (nested and VALUE_CODERS[vc] not in ("raw", "planes")):
            raise FormatError(f"unknown value coder code {vc}" + (" inside 'cast'" if nested else
                              ": written by a newer freezepack?"), path=self.path, tensor=c.tensor)
        coder = VALUE_CODERS[vc]
        if coder == "raw":
            return "raw", None, n * elem
        if n == 0:
            raise c.err(f"{coder!r} coding of an empty tensor")
        if coder == "cast":
            t = c.u8()
            if dtype != "F32" or t >= len(DTYPES) or DTYPES[t] not in ("F16", "BF16"):
                raise c.err(f"'cast' of a {dtype} tensor to dtype code {t} (only F32 to F16/BF16)")
            inner, params, length = self._value_block_(c, n, DTYPES[t], nested=True)
            return "cast", (DTYPES[t], inner, params, n), length
        if coder == "codebook":
            return self._codebook(c, n, dtype)
        tables = []
        coded = c.u8()
        if coded >> elem or not coded >> (elem - 1):
            raise c.err(f"'planes' coded-plane mask {coded} is invalid for {elem}-byte elements")
        for i in range(elem):
            if not coded >> (elem - 1 - i) & 1:
                tables.append(None)
                continue
            m = c.u8() + 1
            used = list(c.take(m))
            if any(x >= y for x, y in zip(used, used[1:])):
                raise c.err("'planes' symbols are not strictly increasing")
            counts = [c.var(n + 1) for _ in range(m)]
            if sum(counts) != n or min(counts) < 1:
                raise c.err("'planes' histogram does not add up to the element count")
            tables.append((used, counts))
        if tables[0] is None:
            raise c.err("'planes' must code the top plane")
        stream = c.var(4 * (2 + (n * elem * entropy.PRECISION + 31) // 32) + 1)
        return "planes", (tables, elem, n), stream + n * sum(t is None for t in tables)

    def _codebook(self, c: _In, n: int, dtype: str):
        elem = DTYPE_SIZES[dtype]
        if n < 2 or elem == 1:
            raise c.err(f"'codebook' coding of {n} {dtype} elements (needs >= 2 elements of >= 2 bytes)")
        form, m = c.u8(), c.u8() + 1
        if form == 0:
            table = np.frombuffer(bytes(c.take(m * elem)), dtype=f"<u{elem}")
            if np.any(table[1:] <= table[:-1]):
                raise c.err("'codebook' table is not strictly increasing")
        elif form == 1:
            if dtype != "F32":
                raise c.err(f"'codebook' grid on a {dtype} tensor (F32 only)")
            step = c.f32("'codebook' grid step")
            if not step > 0:
                raise c.err("'codebook' grid step must be > 0")
            levels = [_unzigzag(c.var(2 * entropy.MAX_GRID_LEVEL + 1))]
            for _ in range(m - 1):
                levels.append(levels[-1] + 1 + c.var(2 * entropy.MAX_GRID_LEVEL + 1))
            if max(abs(levels[0]), abs(levels[-1])) > entropy.MAX_GRID_LEVEL:
                raise c.err("'codebook' grid level beyond +-2^24")
            vals = entropy.grid_values(levels, step)
            if not np.all(np.isfinite(vals)) or np.any(vals[1:] <= vals[:-1]):
                raise c.err("'codebook' grid values are not finite and strictly increasing")
            table = vals.view("<u4")
        else:
            raise c.err(f"unknown 'codebook' form {form}")
        counts, stream = [n], 0
        if m > 1:
            counts = [c.var(n + 1) for _ in range(m)]
            if sum(counts) != n or min(counts) < 1:
                raise c.err("'codebook' histogram does not add up to the element count")
            stream = c.var(4 * (2 + (n * entropy.PRECISION + 31) // 32) + 1)
            if stream % 4:
                raise c.err("'codebook' stream is not whole 32-bit words")
        return "codebook", (table, counts, n, elem), stream

    def breakdown(self) -> dict:
        """Bytes by role: structure (safetensors JSON, digest, names, shapes, ...), coder models, payloads."""
        pay = {"mask": 0, "values": 0, "whole": 0}
        for key, s in self.header.stored.items():
            pay["mask" if key.endswith(MASK_SUFFIX) else "values" if key.endswith(VALUES_SUFFIX) else "whole"] += \
                s.nbytes
        first = min((s.start for s in self.header.stored.values()), default=len(self.body))
        outer = len(outer_header(len(self.body)))
        return {"file": outer + len(self.body),
                "structure": outer + first - self.model_bytes["mask"] - self.model_bytes["values"],
                "mask_model": self.model_bytes["mask"], "value_model": self.model_bytes["values"],
                "mask_payload": pay["mask"], "values_payload": pay["values"], "whole_payload": pay["whole"]}

    def raw(self, key: str) -> memoryview:
        _, _, start, end = self.parts[key]
        return memoryview(self.body)[start:end]

    def read_bytes(self, key: str, tensor=None) -> bytearray:
        """Decoded little-endian tensor bytes of a values/whole part, or the coded payload of a mask part."""
        coder, params, start, end = self.parts[key]
        return self._decode(coder, params, self.raw(key), tensor)

    def _decode(self, coder, params, payload, tensor) -> bytearray:
        if coder == "planes":
            tables, elem, n = params
            return entropy.decode_planes(n, elem, tables, payload, where=self.path, tensor=tensor)
        if coder == "cast":  # widening F16/BF16 -> F32 is exact
            target, inner, inner_params, n = params
            half = self._decode(inner, inner_params, payload, tensor)
            if len(half) != 2 * n:
                raise FormatError("'cast' values payload has the wrong length", path=self.path, tensor=tensor)
            h = np.frombuffer(half, dtype="<u2")
            out = bytearray(4 * n)  # widened in place: the dense bytes once, not three temporaries of them
            wide = np.frombuffer(out, dtype="<u4")
            if target == "BF16":
                wide[:] = h
                wide <<= 16
            else:
                wide.view("<f4")[:] = h.view("<f2")
            return out
        if coder == "codebook":  # the dense bytes are written once (a tiny file may expand to the reader's limit)
            table, counts, n, elem = params
            out = bytearray(n * elem)
            dense = np.frombuffer(out, dtype=f"<u{elem}")
            table = table.astype(dense.dtype, copy=False)
            if len(counts) == 1:
                dense[:] = table[0]
                return out
            words = np.frombuffer(payload, dtype="<u4")
            sym = entropy.decode_symbols(words, counts, n, "'codebook' values", self.path, tensor)
            for i in range(0, n, 1 << 16):  # in chunks: take() widens the uint8 symbols to 8-byte indices
                np.take(table, sym[i:i + (1 << 16)], out=dense[i:i + (1 << 16)], mode="clip")  # all < m
            return out
        return bytearray(payload)

    def coding(self, key: str) -> str:
        """How a stored part is coded, for humans: ``raw``, ``planes``, ``cast:BF16``, ``codebook:16``, ..."""
        coder, params = self.parts[key][:2]
        if coder == "cast":
            return f"cast:{params[0]}" + ("+planes" if params[1] == "planes" else "")
        if coder == "codebook":
            return f"codebook:{len(params[0])}"
        return coder or "raw"

def mask_indices(e: Entry, payload_words: np.ndarray, keys=None, where=None) -> np.ndarray:
    """Ascending positions of ``e``'s trainable entries; ``keys()`` gives the ``ans-ctx`` context (|w_init| bits)."""
    if e.coder == "ans-ctx":
        if keys is None:
            raise FormatError("'ans-ctx' mask needs the regenerated frozen values", path=where, tensor=e.name)
        return entropy.decode_ctx(e.numel, e.trainable, e.shape, e.coder_params, payload_words,
                                  keys() if callable(keys) else keys, where, e.name)
    return maskcode.decode_indices(e.coder, e.numel, e.trainable, e.coder_params, payload_words, where=where,
                                   tensor=e.name)


def parse_file(raw_header: bytes, f, file_size: int, path=None, limits: Limits = DEFAULT_LIMITS) -> Body:
    """Check the safetensors part of a v2 file exactly, read the body and parse it."""
    body_len = file_size - 8 - len(raw_header)
    if body_len < 32 or outer_header(body_len) != struct.pack("<Q", len(raw_header)) + raw_header:
        raise FormatError("v2 safetensors header is not the one its length implies (corrupted or edited)",
                          path=path)
    body = f.read(body_len)
    if len(body) != body_len:
        raise FormatError("file shrank while being read", path=path)
    return Body(body, path, limits)
