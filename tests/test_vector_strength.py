"""The conformance vectors are strong: a reader or generator that breaks any single rounding step, conversion or
coder rule fails at least three of them, while the correct one passes every vector.

This module is a third implementation written from spec/RNG.md and spec/FORMAT.md alone (numpy and plain
integers; freezepack is used only for the Philox words, ``rng.words_np``), with one switch per rule a reader could
plausibly get wrong — the mistakes a port to another language makes: rounding ``a + b*z`` once (a fused
multiply-add, or float64 arithmetic), truncating to BF16, saturating F16, flushing subnormals, rounding G x
frozen_scale once, reading the context after scaling, comparing keys by UTF-16 code units (JavaScript's sort),
dropping a leading U+FEFF (JavaScript's TextDecoder), counting alias targets without the aliases, and the integer
models' rounding. A vector is one checked item: one conversion word, one initializer case, one resolved constant,
or one .fpk file (all its tensors)."""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import struct

import numpy as np
import pytest

from freezepack.format.rng import words_np

SPEC = os.path.join(os.path.dirname(__file__), "..", "spec")
VEC = os.path.join(SPEC, "vectors")
FPK = os.path.join(VEC, "fpk")
ONE = 1 << 24
F32 = np.float32


def _table():
    rows = [line.split() for line in open(os.path.join(SPEC, "normal_table_v1.txt")) if not line.startswith("#")]
    a = np.array([int(r[2], 16) for r in rows], dtype=np.uint32).view(np.float32)
    d = np.array([int(r[3], 16) for r in rows], dtype=np.uint32).view(np.float32)
    return a, d


A, D = _table()


# --- RNG.md §5: conversions ---------------------------------------------------------------------------------------

def uniform(w, v):
    w = w.astype(np.uint64)
    if "uniform_24_bits" in v:  # 24 bits and a half-step offset: (2k + 1) * 2^-25 rounds
        return (2 * (w >> 8) + 1).astype(np.float64) * 2.0 ** -25
    return (2 * (w >> 9) + 1).astype(F32) * F32(2.0 ** -24)


def sign(w, v):
    bit = (w.astype(np.uint64) & 1) if "sign_low_bit" in v else (w.astype(np.uint64) >> 31)
    return np.where(bit == 1, F32(-1), F32(1))


def normal(w, v):
    w = w.astype(np.uint64)
    neg = w >> 31
    n = 2 * (w & 0x7FFFFFFF) + 1
    e = (np.frexp(n.astype(np.float64))[1] - 1).astype(np.uint64)  # bit_length - 1 (n < 2^32: exact in float64)
    r = (n - (np.uint64(1) << e)) << np.uint64(7)
    j = r >> e
    rem = r - (j << e)
    sh = np.maximum(e.astype(np.int64) - 24, 0).astype(np.uint64)  # (rem's low 7 bits are 0: nothing is dropped)
    f = ((rem >> sh).astype(np.float64) * np.ldexp(1.0, sh.astype(np.int64) - e.astype(np.int64))).astype(F32)
    idx = (e << np.uint64(7)) + j
    if "normal_fma" in v:  # A + f*D rounded once
        mag = (A[idx].astype(np.float64) + f.astype(np.float64) * D[idx].astype(np.float64)).astype(F32)
    else:
        mag = A[idx] + (f * D[idx])
    return np.where(neg == 1, -mag, mag).astype(F32)


def apply(dist, a, b, words, v):
    """RNG.md §6: w = a + (b x z) (two roundings), a x s, a."""
    a, b = F32(a), F32(b)
    if dist == "constant":
        return np.full(words.size, a, dtype=F32)
    if dist == "sign":
        return (a * sign(words, v)).astype(F32)
    x = normal(words, v) if dist == "normal" else uniform(words, v).astype(F32)
    if "generator_fma" in v:  # one rounding of the exact a + b*x (a fused multiply-add, or float64 then f32)
        return (np.float64(a) + np.float64(b) * x.astype(np.float64)).astype(F32)
    return (a + (b * x)).astype(F32)


def stream_id(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def generate(dist, a, b, shape, seed, stream, v):
    n = math.prod(shape)
    words = words_np(seed, stream_id(stream), 0, n) if dist != "constant" else np.zeros(n, np.uint32)
    return apply(dist, a, b, words, v)


# --- RNG.md §6: resolving named initializers (binary64 steps, one rounding to f32) --------------------------------

def _f32(x: float) -> float:
    return float(F32(x))


def resolve(name, params, shape, v):
    """(dist, a, b) as a writer computes them."""
    p = dict(params)
    if name in ("zeros", "constant"):
        return "constant", _f32(p.get("val", 0.0)), 0.0
    if name == "normal":
        return "normal", _f32(p.get("mean", 0.0)), _f32(p.get("std", 1.0))
    if name == "uniform":
        lo, hi = p.get("a", 0.0), p.get("b", 1.0)
        return "uniform", _f32(lo), _f32(_f32(hi) - _f32(lo)) if "uniform_span_in_f32" in v else _f32(hi - lo)
    rf = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_in, fan_out = shape[1] * rf, shape[0] * rf
    F = float(fan_in + fan_out)
    if name in ("xavier_normal", "xavier_uniform", "pm_sigma"):
        gain = p.get("gain", 1.0)
        if name == "xavier_normal":
            return "normal", 0.0, _f32(gain * math.sqrt(2.0 / F))
        if name == "pm_sigma":
            return "sign", _f32(gain * math.sqrt(2.0 / F)), 0.0
        bound = _f32((gain * math.sqrt(3.0)) * math.sqrt(2.0 / F))
        return "uniform", -bound, _f32(2.0 * bound)
    a, mode, nl = p.get("a", 0.0), p.get("mode", "fan_in"), p.get("nonlinearity", "leaky_relu")
    slope = 0.01 if a == 0.0 and "leaky_relu_zero_slope_as_default" in v else a  # kaiming passes its a, even 0
    gains = {"relu": math.sqrt(2.0), "tanh": 5.0 / 3, "selu": 3.0 / 4,
             "leaky_relu": math.sqrt(2.0 / (1 + slope * slope))}
    std = gains.get(nl, 1.0) / math.sqrt(float(fan_in if mode == "fan_in" else fan_out))
    if name == "kaiming_normal":
        return "normal", 0.0, _f32(std)
    bound = _f32(math.sqrt(3.0) * _f32(std)) if "kaiming_bound_from_f32_std" in v else _f32(math.sqrt(3.0) * std)
    return "uniform", -bound, _f32(2.0 * bound)


# --- the RNG vectors, one item each -------------------------------------------------------------------------------

def _hex(x) -> list[str]:
    return [f"{int(u):08x}" for u in np.ascontiguousarray(x, dtype="<f4").view("<u4").ravel()]


def rng_failures(v) -> tuple[int, int]:
    """(failing items, items) over rng_v1.json and rng_v1_extra.json."""
    fail = total = 0
    for fname in ("rng_v1.json", "rng_v1_extra.json"):
        d = json.load(open(os.path.join(VEC, fname), encoding="utf-8"))
        c = d["conversions"]
        w = np.array([int(x, 16) for x in c["words"]], dtype=np.uint32)
        got = [_hex(uniform(w, v).astype(F32)), _hex(normal(w, v)), _hex(sign(w, v))]
        for i in range(w.size):
            total += 1
            fail += (got[0][i], got[1][i], got[2][i]) != (c["uniform"][i], c["normal"][i], c["sign"][i])
        for case in d["initializers"]:
            total += 1
            shape = tuple(case["shape"])
            dist, a, b = resolve(case["init"], case["params"], shape, v)
            ok = (dist, _hex(F32(a))[0], _hex(F32(b))[0]) == (case["spec"]["dist"], case["a_hex"], case["b_hex"])
            x = generate(dist, a, b, shape, case["seed"], case["tensor"], v)
            ok = ok and hashlib.sha256(x.astype("<f4").tobytes()).hexdigest() == case["sha256"]
            fail += not ok
        for case in d.get("resolution", []):
            total += 1
            dist, a, b = resolve(case["init"], case["params"], tuple(case["shape"]), v)
            fail += (dist, _hex(F32(a))[0], _hex(F32(b))[0]) != (case["dist"], case["a_hex"], case["b_hex"])
    return fail, total


# --- FORMAT.md §5.3: reconstruction -------------------------------------------------------------------------------

def round_to(x32, dtype, v):
    """R: f32 -> dtype, round to nearest even, overflow to +-inf (F16 as float16, BF16 as uint16 bits)."""
    x32 = np.ascontiguousarray(x32, dtype=F32)
    if dtype == "F32":
        return x32.copy()
    if dtype == "F16":
        with np.errstate(over="ignore"):
            h = x32.astype(np.float16)
        if "f16_saturate" in v:
            h = np.where(np.isinf(h) & np.isfinite(x32), np.copysign(np.float16(65504), x32), h).astype(np.float16)
        if "f16_flush_subnormals" in v:
            h = np.where(np.abs(h) < np.float16(2.0 ** -14), np.copysign(np.float16(0), h), h).astype(np.float16)
        return h
    u = x32.view(np.uint32).astype(np.uint64)
    if "bf16_truncate" in v:
        return (u >> 16).astype(np.uint16)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def widen(x, dtype):
    return (x.astype(np.uint32) << 16).view(F32) if dtype == "BF16" else x.astype(F32)


def reconstruct(g, dtype, scale, positions, values, v):
    if "scale_rounded_once" in v and scale != 1.0:  # R(G x s) instead of R(f32(R(G) x s))
        with np.errstate(over="ignore"):
            d = round_to(g * F32(scale), dtype, v)
    else:
        d = round_to(g, dtype, v)
        if scale != 1.0 and "scale_trained_values_too" not in v:
            with np.errstate(over="ignore"):
                d = round_to(widen(d, dtype) * F32(scale), dtype, v)
    d[positions] = values
    if "scale_trained_values_too" in v and scale != 1.0:  # frozen_scale applied after the scatter
        with np.errstate(over="ignore"):
            d = round_to(widen(d, dtype) * F32(scale), dtype, v)
    return d


# --- FORMAT.md §6, §12.7, §12.8: the ANS core and the integer models ----------------------------------------------

class Ans:
    def __init__(self, words):
        self.stack = [int(x) for x in words]
        self.state = 0
        if self.stack:
            self.state = self.stack.pop()
            assert self.state != 0
            while self.stack and self.state < 1 << 32:
                self.state = (self.state << 32) | self.stack.pop()

    def pop(self, cdf):
        q = self.state & (ONE - 1)
        s = bisect.bisect_right(cdf, q) - 1
        self.state = (self.state >> 24) * (cdf[s + 1] - cdf[s]) + q - cdf[s]
        if self.state < 1 << 32 and self.stack:
            self.state = (self.state << 32) | self.stack.pop()
        return s

    def done(self):
        assert self.state == 0 and not self.stack, "stream does not end as §6.3 says"


def cum(probs):
    out = [0]
    for p in probs:
        out.append(out[-1] + p)
    assert out[-1] == ONE
    return out


def counts_model(counts, v):
    m, s = len(counts), sum(counts)
    t = ONE - m
    w = [c * t // s for c in counts]
    order = range(m - 1, -1, -1) if "counts_remainder_to_last" in v else range(m)
    for j in list(order)[:t - sum(w)]:
        w[j] += 1
    return cum([x + 1 for x in w])


def binary(size, ones, v):
    top = (size - ones) * ONE + (0 if "binary_cdf1_floor" in v else size // 2)
    return [0, min(max(top // size, 1), ONE - 1), ONE]


def bernoulli_cdf1(n, k, v):
    if "bernoulli_as_binary" in v:  # §12.7.1's binary(n, k) instead of §6.4's binary64 formula
        return binary(n, k, v)[1]
    p = k / n
    return math.trunc((1 - p) * ((ONE - 2) / ((1 - p) + p))) + 1


def gap_model(phi, v):
    x = [1 << 32]
    for _ in range(255):
        x.append((x[-1] * phi) >> 32)
    t, s = ONE - 256, sum(x)
    w = [xi * t // s for xi in x]
    for j in range(t - sum(w)):
        w[j] += 1
    return cum([y + 1 for y in w])


def decode_bernoulli(words, n, k, v):
    cdf1 = bernoulli_cdf1(n, k, v)
    st = Ans(words)
    m = np.array([st.pop([0, cdf1, ONE]) for _ in range(n)], dtype=bool)
    st.done()
    return m


def decode_gaps(words, n, k, value, b, phi, v):
    count = k if value else n - k
    if len(words) == 0:
        pos = np.arange(count)
    else:
        st = Ans(words)
        gm = gap_model(phi, v)
        u16, um = cum([256] * 65536), cum([1 << (24 - b)] * (1 << b))
        if "gaps_interleaved" in v:  # h, its escape, r gap by gap instead of all h, then escapes, then all r
            h, r = [], []
            for _ in range(count):
                h.append(st.pop(gm))
                if h[-1] == 255:
                    h[-1] = 255 + (st.pop(u16) << 16) + st.pop(u16)
                r.append(st.pop(um) if b else 0)
        else:
            h = [st.pop(gm) for _ in range(count)]
            for i in range(count):
                if h[i] == 255:
                    h[i] = 255 + (st.pop(u16) << 16) + st.pop(u16)
            r = [st.pop(um) for _ in range(count)] if b else [0] * count
        st.done()
        pos = np.cumsum([hj * (1 << b) + rj + 1 for hj, rj in zip(h, r)]) - 1
    m = np.full(n, not value)
    m[pos] = bool(value)
    return m


def decode_ctx(words, n, k, shape, params, g_keys, v):
    nb, flags, counts, cc, cr = params
    keys = g_keys
    rank = np.empty(n, np.int64)
    rank[np.lexsort((np.arange(n), keys))] = np.arange(n)
    bins = rank * nb // n
    st = Ans(words)
    rows, cols = shape[0], n // shape[0] if shape else 1
    col = [st.pop(binary(cols, cc, v)) if cc < cols else 1 for _ in range(cols)] if flags & 1 else [1] * cols
    row = [st.pop(binary(rows, cr, v)) if cr < rows else 1 for _ in range(rows)] if flags & 2 else [1] * rows
    members = [[] for _ in range(nb)]
    for i in range(n):
        if col[i % cols] and row[i // cols]:
            members[bins[i]].append(i)
    m = np.zeros(n, bool)
    for j in range(nb):
        s, c = len(members[j]), counts[j]
        for i in members[j]:
            m[i] = c == s if c in (0, s) else bool(st.pop(binary(s, c, v)))
    st.done()
    assert m.sum() == k
    return m


# --- version 1 (FORMAT.md §3-6) -----------------------------------------------------------------------------------

NP = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def _utf16_order_differs(keys) -> bool:
    keys = list(keys)
    return sorted(keys) != sorted(keys, key=lambda k: k.encode("utf-16-be"))


def _check_keys(obj, v):
    """A reader that checks canonical JSON by re-serializing with UTF-16 key order (JavaScript's sort)."""
    if isinstance(obj, dict):
        assert "utf16_key_order" not in v or not _utf16_order_differs(obj), "keys not in (UTF-16) order"
        for x in obj.values():
            _check_keys(x, v)
    elif isinstance(obj, list):
        for x in obj:
            _check_keys(x, v)


def _name(s: str, v) -> str:
    return s[1:] if "strip_leading_bom" in v and s.startswith("\ufeff") else s


def read_v1(data: bytes, v) -> dict[str, bytes]:
    n_head = struct.unpack("<Q", data[:8])[0]
    outer = json.loads(data[8:8 + n_head])
    h = json.loads(outer["__metadata__"]["freezepack"])
    _check_keys(outer, v)
    _check_keys(h, v)
    body = data[8 + n_head:]

    def stored(key):
        a, b = h["stored"][key]["data_offsets"]
        return body[a:b]

    seed, out = int(h["seed"]), {}
    for t in h["tensors"]:
        name = _name(t["name"], v)
        if t["kind"] == "whole":
            out[name] = stored(t["data"])
        elif t["kind"] == "alias":
            out[name] = out[_name(t["of"], v)]
        else:
            shape, n, k, dtype = t["shape"], math.prod(t["shape"]), t["trainable"], t["dtype"]
            ini, m = t["init"], t["mask"]
            g = generate(ini["dist"], ini["a"], ini["b"], shape, seed, _name(t.get("stream", t["name"]), v), v)
            words = np.frombuffer(stored(m["tensor"]), "<u4") if m["tensor"] else np.zeros(0, np.uint32)
            p = m["params"]
            if m["coder"] == "const":
                mask = np.full(n, k == n)
            elif m["coder"] == "positions":
                mask = np.full(n, not p["value"])
                mask[words.astype(np.int64)] = bool(p["value"])
            elif m["coder"] == "ans-bernoulli":
                assert p["cdf1"] == bernoulli_cdf1(n, k, v)
                mask = decode_bernoulli(words, n, k, v)
            else:
                mask = decode_gaps(words, n, k, p["value"], p["b"], p["phi"], v)
            vals = np.frombuffer(stored(t["values"]), NP[dtype]) if k else np.zeros(0, NP[dtype])
            out[name] = reconstruct(g, dtype, t["frozen_scale"], np.flatnonzero(mask), vals, v).astype(
                NP[dtype]).tobytes()
    return out


# --- version 2 (FORMAT.md §12) ------------------------------------------------------------------------------------

SIZES = [8, 8, 8, 4, 4, 4, 2, 2, 2, 2, 1, 1, 1]
DTYPES = ["F64", "I64", "U64", "F32", "I32", "U32", "F16", "BF16", "I16", "U16", "I8", "U8", "BOOL"]
DISTS = ["normal", "uniform", "sign", "constant"]


class Cursor:
    def __init__(self, r):
        self.r, self.i = r, 0

    def u8(self):
        self.i += 1
        return self.r[self.i - 1]

    def var(self):
        x = shift = 0
        while True:
            b = self.u8()
            x |= (b & 127) << shift
            shift += 7
            if b < 128:
                return x

    def take(self, n):
        self.i += n
        return self.r[self.i - n:self.i]

    def f32(self):
        return struct.unpack("<f", self.take(4))[0]

    def str(self):
        return self.take(self.var()).decode("utf-8")


def _value_block(c, n, e):
    coder = c.u8()
    if coder == 0:
        return ("raw", n * e, None)
    if coder == 2:
        target = c.u8()
        inner = _value_block(c, n, 2)
        return ("cast", inner[1], (target, inner))
    if coder == 3:
        form, m = c.u8(), c.u8() + 1
        if form == 0:
            table = [c.take(e) for _ in range(m)]
        else:
            step = F32(c.f32())
            z = c.var()
            levels = [z // 2 if z % 2 == 0 else -(z + 1) // 2]
            for _ in range(m - 1):
                levels.append(levels[-1] + 1 + c.var())
            table = [(F32(lv) * step).tobytes() for lv in levels]
        counts = [c.var() for _ in range(m)] if m > 1 else None
        return ("codebook", c.var() if m > 1 else 0, (table, counts, n))
    coded, tables = c.u8(), []
    for i in range(e):
        if coded >> (e - 1 - i) & 1:
            m = c.u8() + 1
            syms = list(c.take(m))
            tables.append((syms, [c.var() for _ in range(m)]))
        else:
            tables.append(None)
    stream = c.var()
    return ("planes", stream + n * sum(t is None for t in tables), (tables, stream, n, e))


def _values(block, payload, v) -> bytes:
    kind, _, p = block
    if kind == "raw":
        return bytes(payload)
    if kind == "cast":
        target, inner = p
        half = np.frombuffer(_values(inner, payload, v), "<u2")
        if target == 7:
            return (half.astype("<u4") << 16).astype("<u4").tobytes()
        f = half.view("<f2").astype("<f4")
        if "cast_flushes_f16_subnormals" in v:
            f = np.where(np.abs(f) < 2.0 ** -14, np.copysign(F32(0), f), f).astype("<f4")
        return f.tobytes()
    if kind == "codebook":
        table, counts, n = p
        if counts is None:
            return table[0] * n
        st, model = Ans(np.frombuffer(payload, "<u4")), counts_model(counts, v)
        syms = [st.pop(model) for _ in range(n)]
        st.done()
        return b"".join(table[s] for s in syms)
    tables, stream, n, e = p
    st = Ans(np.frombuffer(payload[:stream], "<u4"))
    planes = {}
    for i, t in enumerate(tables):
        if t is not None:
            syms, counts = t
            model = counts_model(counts, v) if len(syms) > 1 else None
            planes[e - 1 - i] = bytes(syms[st.pop(model)] if model else syms[0] for _ in range(n))
    st.done()
    raw, k = payload[stream:], 0
    for j in range(e):
        if j not in planes:
            planes[j] = raw[k * n:(k + 1) * n]
            k += 1
    return np.stack([np.frombuffer(planes[j], np.uint8) for j in range(e)], axis=1).tobytes()


def read_v2(data: bytes, v) -> dict[str, bytes]:
    n_head = struct.unpack("<Q", data[:8])[0]
    r = data[8 + n_head + 32:]
    c = Cursor(r)
    assert c.u8() == 0
    seed = c.var()
    c.str()
    keys = []
    for _ in range(c.var()):
        keys.append(c.str())
        c.str()
    assert keys == sorted(keys, key=(lambda k: k.encode("utf-16-be")) if "utf16_key_order" in v else
                          (lambda k: k.encode("utf-8"))), "metadata keys not increasing"
    entries, prev, kept = [], b"", []
    for _ in range(c.var()):
        shared = c.var()
        prev = prev[:shared] + c.take(c.var())
        tag = c.u8()
        e = {"name": _name(prev.decode("utf-8"), v), "kind": tag & 3}
        entries.append(e)
        if e["kind"] == 2:
            j = c.var()
            e["of"] = kept[j] if "alias_index_skips_aliases" in v else entries[j]
            continue
        kept.append(e)
        e["dtype"], e["shape"] = DTYPES[c.u8()], [c.var() for _ in range(c.var())]
        n, size = math.prod(e["shape"]), SIZES[DTYPES.index(e["dtype"])]
        if e["kind"] == 0:
            e["block"] = _value_block(c, n, size)
            continue
        e["stream"] = _name(c.str(), v) if tag & 4 else e["name"]
        ib = c.u8()
        e["init"] = (DISTS[ib & 3], c.f32(), c.f32())
        if tag & 16:
            c.str()
        e["scale"] = c.f32() if tag & 8 else 1.0
        e["k"] = k = c.var()
        e["coder"] = c.u8()
        if e["coder"] == 1:
            e["p"] = [c.u8()]
        elif e["coder"] == 2:
            e["p"] = [c.u8(), c.u8(), c.var()]
        elif e["coder"] == 4:
            nb, flags = c.u8(), c.u8()
            cc = c.var() if flags & 1 else None
            cr = c.var() if flags & 2 else None
            e["p"] = [nb, flags, [c.var() for _ in range(nb)], cc, cr]
        e["mlen"] = c.var() if e["coder"] else 0
        e["block"] = _value_block(c, k, size) if k else None
        c.take(16)
    out = {}
    for e in entries:
        if e["kind"] == 2:
            continue
        if e["kind"] == 0:
            out[e["name"]] = _values(e["block"], c.take(e["block"][1]), v)
            continue
        shape, n, k, dtype = e["shape"], math.prod(e["shape"]), e["k"], e["dtype"]
        words = np.frombuffer(c.take(e["mlen"]), "<u4")
        g = generate(*e["init"], shape, seed, e["stream"], v)
        if e["coder"] == 0:
            mask = np.full(n, k == n)
        elif e["coder"] == 1:
            mask = np.full(n, not e["p"][0])
            mask[words.astype(np.int64)] = bool(e["p"][0])
        elif e["coder"] == 2:
            mask = decode_gaps(words, n, k, *e["p"], v)
        elif e["coder"] == 3:
            mask = decode_bernoulli(words, n, k, v)
        else:
            src = g
            if "context_after_scale" in v:  # |dense frozen value| instead of |G| (before scale and rounding)
                src = widen(reconstruct(g, dtype, e["scale"], [], [], v), dtype)
            keys = src.astype(np.float64) if "context_signed" in v else src.view(np.uint32) & 0x7FFFFFFF  # G, not |G|
            mask = decode_ctx(words, n, k, shape, e["p"], keys, v)
        vals = np.frombuffer(_values(e["block"], c.take(e["block"][1]), v), NP[dtype]) if k else np.zeros(0, NP[dtype])
        out[e["name"]] = reconstruct(g, dtype, e["scale"], np.flatnonzero(mask), vals, v).astype(NP[dtype]).tobytes()
    for e in entries:
        if e["kind"] == 2:
            out[e["name"]] = out[e["of"]["name"]]
    assert c.i == len(r)
    return out


# --- the file vectors ---------------------------------------------------------------------------------------------

def _file_vectors():
    out = []
    for manifest in ("manifest.json", "manifest_v2.json", "manifest_rules.json"):
        for item in json.load(open(os.path.join(FPK, manifest)))["valid"]:
            out.append(item["file"])
    return out


FILES = _file_vectors()


def _dense(fname):
    """name -> tensor bytes of a plain safetensors file (read by its layout: any dtype, BF16 included)."""
    data = open(os.path.join(FPK, fname[:-4] + ".dense.safetensors"), "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8:8 + n])
    return {k: data[8 + n + t["data_offsets"][0]:8 + n + t["data_offsets"][1]] for k, t in head.items()
            if k != "__metadata__"}


def file_failures(v) -> tuple[int, int]:
    fail = 0
    for fname in FILES:
        data = open(os.path.join(FPK, fname), "rb").read()
        try:
            got = (read_v2 if b'{"__metadata__":{"freezepack":"2"' in data[8:48] else read_v1)(data, v)
            fail += got != _dense(fname)
        except (AssertionError, IndexError, KeyError, ValueError, ZeroDivisionError):
            fail += 1
    return fail, len(FILES)


VARIANTS = [  # generator and writer (RNG.md), reconstruction (FORMAT.md §5.3), coders and structure (§6, §12)
    "uniform_24_bits", "sign_low_bit", "normal_fma", "generator_fma", "leaky_relu_zero_slope_as_default",
    "kaiming_bound_from_f32_std", "uniform_span_in_f32",
    "bf16_truncate", "f16_saturate", "f16_flush_subnormals", "scale_rounded_once", "scale_trained_values_too",
    "cast_flushes_f16_subnormals", "context_after_scale", "context_signed", "counts_remainder_to_last",
    "binary_cdf1_floor", "bernoulli_as_binary", "gaps_interleaved", "alias_index_skips_aliases", "utf16_key_order",
    "strip_leading_bom"]


def test_the_correct_reader_passes_every_vector():
    assert rng_failures(set())[0] == 0
    assert file_failures(set()) == (0, len(FILES)) and len(FILES) >= 20


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_broken_rule_fails_at_least_three_vectors(variant):
    rng_fail, _ = rng_failures({variant})
    file_fail, _ = file_failures({variant})
    print(f"{variant}: {rng_fail} RNG vectors, {file_fail} file vectors fail")
    assert rng_fail + file_fail >= 3, (variant, rng_fail, file_fail)
