"""Format v2 (spec/FORMAT.md §12): bit-exact round trips of every feature, the integer models, the size promises
against v1, corruption and hostile headers."""
from __future__ import annotations

import dataclasses
import hashlib
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

import freezepack
from freezepack import api
from freezepack.api import encode_record
from freezepack.errors import FormatError, FreezepackError
from freezepack.format import entropy, maskcode, model
from freezepack.format import io as fpio
from freezepack.format.base import mask_indices
from freezepack.format.init import InitSpec, generate, make_init
from freezepack.format.model import AliasEntry, FrozenEntry, Header, WholeEntry
from freezepack.format.reader import open_file
from freezepack.format.record import FreezeRecord, FrozenTensor
from freezepack.format.v2 import wire
from freezepack.format.v2 import writer as v2_writer
from freezepack.testing import record_for, small_record
from freezepack.testing.reference import reference_ans_start
from freezepack.testing.v2 import body_rest, fuzz_resigned, resigned


def _write(tmp_path, rec, name="m.fpk", version=2, metadata=None):
    p = tmp_path / name
    p.write_bytes(b"".join(encode_record(rec, metadata=metadata, version=version)))
    return p


def _same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert bytes(api.tensor_bytes(a[k])) == bytes(api.tensor_bytes(b[k])), k


def snip_like_record(q=0.99, seed=3) -> FreezeRecord:
    """Masks chosen like SNIP (top |w_init * g| with a random per-row/col g): what ans-ctx is for."""
    rec = FreezeRecord(seed=seed)
    g = np.random.default_rng(seed)
    for name, shape in {"conv.weight": (20, 10, 5, 5), "fc.weight": (100, 400)}.items():
        init = make_init("xavier_normal", shape)
        w = generate(init, shape, seed, name).numpy().reshape(shape[0], -1)
        score = np.abs(w) * g.random((shape[0], 1)) * g.random((1, w.shape[1])) * g.lognormal(0, 0.3, w.shape)
        k = max(1, int(round((1 - q) * w.size)))
        m = np.zeros(w.size, bool)
        m[np.argsort(-score.reshape(-1))[:k]] = True
        vals = torch.from_numpy((g.standard_normal(k) * 0.05).astype(np.float32))
        rec.frozen[name] = FrozenTensor(init, torch.from_numpy(m.reshape(shape)), vals)
        rec.whole[name.replace("weight", "bias")] = torch.from_numpy((g.standard_normal(shape[0]) * 0.01)
                                                                     .astype(np.float32))
    return rec


# ---------------------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rec", [small_record(), snip_like_record(0.9), snip_like_record(0.999),
                                 record_for({"a.weight": (30, 40), "a.bias": (30,), "b.weight": (7, 3, 3)}, 0.5)],
                         ids=["small", "snip0.9", "snip0.999", "q0.5"])
def test_v2_loads_bit_exactly_what_v1_loads(tmp_path, rec):
    p1, p2 = _write(tmp_path, rec, "a.fpk", 1), _write(tmp_path, rec, "b.fpk", 2)
    _same(freezepack.load(p1), freezepack.load(p2))
    assert freezepack.verify(p2)["ok"]
    assert p2.stat().st_size < p1.stat().st_size
    info = freezepack.inspect(p2)
    assert info["format_version"] == 2 and info["file_bytes"] == p2.stat().st_size
    with open_file(p2) as r:
        assert r.header.version == 2 and r.header.seed == rec.seed


def test_v2_is_a_valid_safetensors_file_and_deterministic(tmp_path):
    p = _write(tmp_path, small_record(), metadata={"task": "t\u00e9st"})
    q = _write(tmp_path, small_record(), "again.fpk", metadata={"task": "t\u00e9st"})
    assert p.read_bytes() == q.read_bytes()
    with safe_open(str(p), framework="pt") as f:
        assert list(f.keys()) == ["freezepack"] and f.metadata() == {"freezepack": "2"}
        body = f.get_tensor("freezepack")
    assert body.dtype == torch.uint8 and body.numpy().tobytes() == p.read_bytes()[-body.numel():]
    assert (len(wire.outer_header(body.numel())) % 8) == 0
    assert freezepack.open(p).metadata() == {"task": "t\u00e9st"}


def _frozen_entry(name, shape, dtype, seed, mask, init, scale=1.0, stream=None):
    """A frozen Entry plus its v1 blobs, with the dense digest computed the way api does (rounded to dtype)."""
    n = int(np.prod(shape))
    g = generate(init, shape, seed, stream or name).reshape(-1)
    if scale != 1.0:
        g = g * scale
    tdt = api.TORCH_DTYPES[dtype]
    dense = g.to(tdt)
    k = int(mask.sum())
    vals = torch.arange(k, dtype=torch.float32).mul(0.01).to(tdt)
    dense[torch.from_numpy(np.flatnonzero(mask))] = vals
    coded = maskcode.encode(mask)
    e = FrozenEntry(name, shape, dtype, api.digest(dense), init, scale, k, coded.coder, dict(coded.params),
                    int(coded.payload.size), stream)
    blobs = {}
    if e.mask_key:
        blobs[e.mask_key] = ("U32", (coded.payload.size,), coded.payload.astype("<u4").tobytes())
    if e.values_key:
        blobs[e.values_key] = (dtype, (k,), bytes(api.tensor_bytes(vals)))
    assert n == mask.size
    return e, blobs, dense


def test_every_v2_feature_round_trips_at_the_container_level(tmp_path):
    """stream keys, F16/BF16 frozen tensors, frozen_scale, custom init params, alias, every whole dtype, 0-d and
    empty tensors, metadata, a seed above 2**63: the parsed header equals the written one, bytes decode exactly."""
    seed = 2**64 - 3
    rng = np.random.default_rng(1)
    entries, blobs, dense = [], {}, {}
    specs = [("f32.weight", (40, 50), "F32", make_init("kaiming_normal", (40, 50), nonlinearity="relu"), 1.0, None),
             ("f16.weight", (8, 9), "F16", make_init("xavier_uniform", (8, 9)), 0.5, "renamed.stream"),
             ("bf16.weight", (6, 5, 3), "BF16", make_init("pm_sigma", (6, 5, 3)), 0.25, None),
             ("const.weight", (5, 5), "F32", make_init("constant", (5, 5), val=0.75), 1.0, None),
             ("scaled.weight", (30, 30), "F32", make_init("normal", (30, 30), mean=0.1, std=0.2),
              float(np.float32(0.8123)), None)]
    for i, (name, shape, dtype, init, scale, stream) in enumerate(specs):
        mask = rng.random(int(np.prod(shape))) < (0.05, 0.3, 0.0, 0.4, 1.0)[i]
        e, b, d = _frozen_entry(name, shape, dtype, seed, mask, init, scale, stream)
        entries.append(e)
        blobs.update(b)
        dense[name] = d
    wholes = {"f64": torch.randn(3, dtype=torch.float64), "f16": torch.randn(2, 2).half(),
              "bf16": torch.randn(5).bfloat16(), "i64": torch.tensor([-1, 2**40]), "u64": torch.tensor([2**63 + 5],
                                                                                                     dtype=torch.uint64),
              "i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32), "u32": torch.tensor([7], dtype=torch.uint32),
              "i16": torch.tensor([-3], dtype=torch.int16), "u16": torch.tensor([9], dtype=torch.uint16),
              "i8": torch.tensor([-128, 127], dtype=torch.int8), "u8": torch.arange(200, dtype=torch.uint8),
              "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
              "big": torch.randn(300)}
    for name, t in wholes.items():
        raw = bytes(api.tensor_bytes(t))
        blobs[name] = (api.DTYPE_NAMES[t.dtype], tuple(t.shape), raw)
        entries.append(WholeEntry(name, tuple(t.shape), api.DTYPE_NAMES[t.dtype], hashlib.sha256(raw).hexdigest()))
    entries.append(AliasEntry("tied.weight", "f32.weight"))
    meta = {"b": "2", "a": "caf\u00e9 \U0001f600", "\u00e9": ""}
    h = Header(seed=seed, entries=tuple(entries), metadata=meta, producer="test 1")
    p = tmp_path / "all.fpk"
    fpio.atomic_write(p, v2_writer.encode_file(h, blobs))
    with open_file(p) as r:
        g = r.header
        assert (g.version, g.seed, g.metadata, g.producer, g.generator) == (2, seed, meta, "test 1", h.generator)
        assert [e.name for e in g.entries] == [e.name for e in entries]
        for want, got in zip(entries, g.entries):
            assert type(got) is type(want) and g.target(got).name == h.target(want).name
            if want.kind != "alias":
                assert (got.shape, got.dtype) == (want.shape, want.dtype)
            if want.kind == "whole":
                assert bytes(r.whole_bytes(got)) == blobs[want.data_key][2]
            elif want.kind == "frozen":
                assert got.init == want.init and got.init.params == want.init.params
                assert (got.stream_key, got.frozen_scale, got.trainable) == (want.stream_key, want.frozen_scale,
                                                                             want.trainable)
                assert got.sha256 == want.sha256[:32] and model.digest_ok(got.sha256, want.sha256)
                if want.values_key:
                    assert bytes(r.values_bytes(got)) == blobs[want.values_key][2]
                words = r.mask_words(got)
                keys = entropy.context_keys(generate(got.init, got.shape, seed, got.stream_key).numpy())
                idx = r.mask_indices(got, words, keys)
                want_idx = maskcode.decode_indices(want.coder, want.numel, want.trainable, dict(want.coder_params),
                                                   np.frombuffer(blobs[want.mask_key][2], "<u4") if want.mask_key
                                                   else np.zeros(0, np.uint32))
                assert np.array_equal(idx, want_idx)
    # the same model written again gives the same bytes
    assert b"".join(v2_writer.encode_file(h, blobs)) == p.read_bytes()


def test_api_round_trip_of_frozen_scale_and_empty_and_scalar_tensors(tmp_path):
    rec = FreezeRecord(seed=9)
    m = torch.zeros(20, 30, dtype=torch.bool)
    m[::7, ::3] = True
    rec.frozen["wd.weight"] = FrozenTensor(make_init("kaiming_uniform", (20, 30)), m,
                                           torch.randn(int(m.sum())), frozen_scale=0.375)
    rec.frozen["none.weight"] = FrozenTensor(make_init("xavier_normal", (4, 4)), torch.zeros(4, 4, dtype=torch.bool),
                                             torch.zeros(0))
    rec.frozen["all.weight"] = FrozenTensor(make_init("xavier_normal", (4, 4)), torch.ones(4, 4, dtype=torch.bool),
                                            torch.randn(16))
    rec.whole.update({"scalar": torch.tensor(2.5), "empty": torch.zeros(3, 0), "steps": torch.tensor(7)})
    _same(freezepack.load(_write(tmp_path, rec, "a", 1)), freezepack.load(_write(tmp_path, rec, "b", 2)))


# ---------------------------------------------------------------------------------------------------------------
# coders
# ---------------------------------------------------------------------------------------------------------------

def test_integer_models_are_what_constriction_codes_with():
    """A plain-integer ANS decoder (spec §12.4) with our integer probabilities decodes constriction's stream."""
    rng = np.random.default_rng(0)
    counts = [5, 1, 300, 70, 2]
    probs = entropy.quantize_counts(counts)
    assert probs.sum() == 1 << 24 and probs.min() >= 1
    sym = rng.choice(5, size=3000, p=np.array(counts) / sum(counts))
    coder = entropy._coder()
    coder.encode_reverse(sym.astype(np.int32), entropy.categorical(probs))
    words = entropy._words(coder)
    cdf = np.concatenate([[0], np.cumsum(probs)]).tolist()
    stack, state = reference_ans_start(words)
    got = []
    for _ in sym:
        quantile = state & ((1 << 24) - 1)
        s = next(i for i in range(len(probs)) if cdf[i + 1] > quantile)
        state = (state >> 24) * int(probs[s]) + quantile - cdf[s]
        if state < 1 << 32 and stack:
            state = (state << 32) | stack.pop()
        got.append(s)
    assert got == sym.tolist() and state == 0 and not stack
    assert entropy.binary_cdf1(10, 1) == 15099494 and entropy.binary_cdf1(3, 3 - 1) == 5592405


@pytest.mark.parametrize("kind", ["random", "snip"])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 0.999])
def test_ctx_masks_never_lose_to_v1_and_win_on_snip_masks(kind, q):
    shape = (60, 200)
    init = make_init("xavier_normal", shape)
    e = FrozenEntry("w", shape, "F32", "0" * 64, init)
    w = generate(init, shape, 5, "w").numpy().reshape(-1)
    rng = np.random.default_rng(int(q * 1000))
    n = w.size
    k = max(1, int(round((1 - q) * n)))
    score = rng.random(n) if kind == "random" else np.abs(w) * rng.lognormal(0, 0.5, n)
    mask = np.zeros(n, bool)
    mask[np.argsort(-score)[:k]] = True
    head, payload, coder, params = v2_writer._best_mask(e, mask, 5)
    v1 = maskcode.encode(mask)
    assert len(head) + len(payload) <= v1.nbytes + 16
    if kind == "snip" and q <= 0.99:
        assert coder == "ans-ctx" and len(head) + len(payload) < 0.85 * maskcode.entropy_bytes(n, k)
    keys = entropy.context_keys(w)
    e = dataclasses.replace(e, coder=coder, coder_params=params, trainable=k, mask_words=len(payload) // 4)
    assert np.array_equal(mask_indices(e, np.frombuffer(payload, "<u4"), keys), np.flatnonzero(mask))


@pytest.mark.parametrize("elem", [1, 2, 4, 8])
def test_plane_values_round_trip(elem):
    rng = np.random.default_rng(elem)
    for n in (1, 2, 17, 1000):
        raw = (rng.standard_normal(n) * 0.05).astype(np.float32).tobytes()[:n * elem] if elem == 4 else \
            rng.integers(0, 256, n * elem, dtype=np.uint8).tobytes()
        raw = raw.ljust(n * elem, b"\x01")
        tables, payload = entropy.encode_planes(raw, elem)
        assert bytes(entropy.decode_planes(n, elem, tables, payload)) == raw
    zeros = bytes(4 * 580)  # zero biases: every plane is one symbol, no payload at all
    tables, payload = entropy.encode_planes(zeros, 4)
    assert payload == b"" and bytes(entropy.decode_planes(580, 4, tables, payload)) == zeros
    head, payload, coder = v2_writer._value_block(zeros, "F32")
    assert coder == "codebook" and len(head) + len(payload) < 16  # one table entry, no stream


def test_trained_like_values_cost_less_than_085_of_raw():
    v = (np.random.default_rng(0).standard_normal(20000) * 0.05).astype(np.float32).tobytes()
    head, payload, coder = v2_writer._value_block(v, "F32")
    assert coder == "planes" and len(head) + len(payload) < 0.85 * len(v)


def test_lying_histograms_and_streams_are_refused():
    raw = (np.random.default_rng(0).standard_normal(500) * 0.05).astype(np.float32).tobytes()
    tables, payload = entropy.encode_planes(raw, 4)
    used, counts = tables[0]
    bad = [(used, [counts[0] + 1, counts[1] - 1] + counts[2:])] + tables[1:]
    with pytest.raises(FormatError):
        entropy.decode_planes(500, 4, bad, payload)
    with pytest.raises(FormatError):
        entropy.decode_planes(500, 4, tables, payload[:-1])
    with pytest.raises(FormatError):
        entropy.decode_planes(500, 4, tables, b"\0\0\0\0" + payload)


# ---------------------------------------------------------------------------------------------------------------
# integrity and hostile files
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def v2file(tmp_path_factory):
    p = tmp_path_factory.mktemp("v2") / "m.fpk"
    p.write_bytes(b"".join(encode_record(small_record(), version=2)))
    want = {k: bytes(api.tensor_bytes(v)) for k, v in freezepack.load(p).items()}
    return p.read_bytes(), want


# the byte-flip sweeps, truncations and a corrupted body: tests/test_corruption.py and test_container.py, both versions


def test_hostile_v2_headers_are_format_errors(tmp_path, v2file):
    data, want = v2file
    rest = body_rest(data)
    p = tmp_path / "h.fpk"
    # a dimension over the element limit: test_container.py's huge declared sizes, for both versions
    for cut in (0, 1, 5, len(rest) // 2, len(rest) - 1):  # truncated (and re-digested) bodies
        p.write_bytes(resigned(data, rest[:cut]))
        with pytest.raises(FormatError):
            freezepack.load(p)
    p.write_bytes(resigned(data, bytes([1]) + rest[1:]))  # unknown generator code
    with pytest.raises(FreezepackError, match="generator"):
        freezepack.load(p)
    p.write_bytes(resigned(data, rest[:1] + b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"))  # 11-byte varint
    with pytest.raises(FormatError, match="varint"):
        freezepack.load(p)
    p.write_bytes(data[:8] + data[8:].replace(b'"freezepack":"2"', b'"freezepack":"3"', 1))
    with pytest.raises(FreezepackError):
        freezepack.load(p)


def test_fuzzed_resigned_v2_bodies_never_escape_as_other_errors(tmp_path, v2file):
    fuzz_resigned(tmp_path, v2file[0], seed=7)


# ---------------------------------------------------------------------------------------------------------------
# conformance vectors, and a reader written from spec/FORMAT.md §12 alone
# ---------------------------------------------------------------------------------------------------------------

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

VECTORS = os.path.join(os.path.dirname(__file__), "..", "spec", "vectors", "fpk")
MANIFEST_V2 = json.load(open(os.path.join(VECTORS, "manifest_v2.json")))
# the third set (FORMAT.md §11.1): version-2 items of manifest_rules.json, in the same form
RULES = json.load(open(os.path.join(VECTORS, "manifest_rules.json")))
RULES_V2 = [v for v in RULES["valid"] if v["version"] == 2]
RULES_V2_INVALID = [v for v in RULES["invalid"] if v["version"] == 2]


def _spec_v2_read(path) -> dict[str, bytes]:
    """Dense tensor bytes of a v2 file, from spec §12 (plain integers; generate_np for the generator)."""
    from freezepack.format.init import generate_np
    from freezepack.testing.reference import reference_ans_decode, reference_gap_decode

    data = open(path, "rb").read()
    n_head = struct.unpack("<Q", data[:8])[0]
    body = data[8 + n_head:]
    text = json.dumps({"__metadata__": {"freezepack": "2"},
                       "freezepack": {"data_offsets": [0, len(body)], "dtype": "U8", "shape": [len(body)]}},
                      separators=(",", ":"), sort_keys=True).encode()
    assert data[8:8 + n_head] == text + b" " * (-(8 + len(text)) % 8)
    r = body[32:]
    assert hashlib.sha256(r).digest() == body[:32]
    pos = 0

    def u8():
        nonlocal pos
        pos += 1
        return r[pos - 1]

    def var():
        v = shift = 0
        while True:
            b = u8()
            v |= (b & 127) << shift
            shift += 7
            if b < 128:
                return v

    def take(n):
        nonlocal pos
        pos += n
        return r[pos - n:pos]

    def f32():
        return struct.unpack("<f", take(4))[0]

    def string():
        return take(var()).decode()

    sizes = [8, 8, 8, 4, 4, 4, 2, 2, 2, 2, 1, 1, 1]
    inits = ["xavier_normal", "xavier_uniform", "kaiming_normal", "kaiming_uniform", "normal", "uniform", "pm_sigma",
             "zeros", "constant"]

    def models_counts(counts):
        m, s = len(counts), sum(counts)
        t = (1 << 24) - m
        w = [c * t // s for c in counts]
        for j in range(t - sum(w)):
            w[j] += 1
        return [x + 1 for x in w]

    def cdf1(s, c):
        return min(max(((s - c) * (1 << 24) + s // 2) // s, 1), (1 << 24) - 1)

    class Stream:  # §6.3 with any integer model
        def __init__(self, words):
            self.stack, self.state = reference_ans_start(words)

        def pop(self, probs):
            q = self.state & ((1 << 24) - 1)
            cdf = 0
            for s, p in enumerate(probs):  # noqa: B007  (s is the decoded symbol)
                if cdf + p > q:
                    break
                cdf += p
            self.state = (self.state >> 24) * p + q - cdf
            if self.state < 1 << 32 and self.stack:
                self.state = (self.state << 32) | self.stack.pop()
            return s

        def done(self):
            assert self.state == 0 and not self.stack

    def value_block(n, e):
        """(coder, payload length, what decoding needs) of a §12.8 value block."""
        c = u8()
        if c == 0:
            return ("raw", n * e, None)
        if c == 2:  # cast: target dtype code, then a nested block of 2-byte elements
            target = u8()
            inner = value_block(n, 2)
            return ("cast", inner[1], (target, inner))
        if c == 3:  # codebook: table or grid, counts, stream
            form, m = u8(), u8() + 1
            if form == 0:
                table = [bytes(take(e)) for _ in range(m)]
            else:
                step = np.float32(f32())
                z = var()
                levels = [z // 2 if z % 2 == 0 else -(z + 1) // 2]
                for _ in range(m - 1):
                    levels.append(levels[-1] + 1 + var())
                table = [np.float32(np.float32(lv) * step).tobytes() for lv in levels]  # one binary32 multiply
            counts = [var() for _ in range(m)] if m > 1 else None
            return ("codebook", var() if m > 1 else 0, (table, counts, n))
        tables = []
        coded = u8()
        for i in range(e):  # top plane first
            if coded >> (e - 1 - i) & 1:
                m = u8() + 1
                syms = list(take(m))
                tables.append((syms, [var() for _ in range(m)]))
            else:
                tables.append(None)
        stream = var()
        return ("planes", stream + n * sum(t is None for t in tables), (tables, stream, n, e))

    def value_bytes(block, payload):
        kind, _, p = block
        if kind == "raw":
            return payload
        if kind == "cast":
            target, inner = p
            half = np.frombuffer(value_bytes(inner, payload), "<u2")
            if target == 7:  # BF16: the f32 with bits h << 16
                return (half.astype("<u4") << 16).astype("<u4").tobytes()
            assert target == 6
            return half.view("<f2").astype("<f4").tobytes()
        if kind == "codebook":
            table, counts, n = p
            if counts is None:
                return table[0] * n
            st = Stream(np.frombuffer(payload, "<u4"))
            probs = models_counts(counts)
            syms = [st.pop(probs) for _ in range(n)]
            st.done()
            return b"".join(table[s] for s in syms)
        tables, stream, n, e = p
        st = Stream(np.frombuffer(payload[:stream], "<u4"))
        planes = {}
        for i, t in enumerate(tables):
            if t is not None:
                syms, counts = t
                probs = models_counts(counts)
                planes[e - 1 - i] = [syms[st.pop(probs)] if len(syms) > 1 else syms[0] for _ in range(n)]
        st.done()
        rawp, k = payload[stream:], 0
        for j in range(e):  # raw planes, lowest first
            if j not in planes:
                planes[j] = list(rawp[k * n:(k + 1) * n])
                k += 1
        return b"".join(bytes(planes[j][i] for j in range(e)) for i in range(n))

    assert u8() == 0
    seed = var()
    string()
    for _ in range(var()):
        string(), string()
    entries, prev = [], b""
    for _ in range(var()):
        shared = var()
        name_b = prev[:shared] + take(var())
        prev = name_b
        tag = u8()
        e = {"name": name_b.decode(), "kind": tag & 3}
        if e["kind"] == 2:
            e["of"] = var()
            entries.append(e)
            continue
        e["dtype"] = u8()
        e["shape"] = [var() for _ in range(var())]
        n = math.prod(e["shape"])
        esize = sizes[e["dtype"]]
        if e["kind"] == 0:
            e["block"] = value_block(n, esize)
            entries.append(e)
            continue
        e["stream"] = string() if tag & 4 else e["name"]
        ib = u8()
        e["init"] = (inits[ib >> 2], ["normal", "uniform", "sign", "constant"][ib & 3], f32(), f32())
        if tag & 16:
            string()
        e["scale"] = f32() if tag & 8 else 1.0
        e["k"] = k = var()
        e["coder"] = u8()
        if e["coder"] == 1:
            e["p"] = [u8()]
        elif e["coder"] == 2:
            e["p"] = [u8(), u8(), var()]
        elif e["coder"] == 4:
            nb, flags = u8(), u8()
            cc = var() if flags & 1 else None
            cr = var() if flags & 2 else None
            e["p"] = [nb, flags, cc, cr, [var() for _ in range(nb)]]
        e["mlen"] = var() if e["coder"] else 0
        e["block"] = value_block(k, esize) if k else None
        e["digest"] = take(16)
        entries.append(e)
    out = {}
    for e in entries:  # payloads, in entry order
        if e["kind"] == 2:
            continue
        if e["kind"] == 0:
            out[e["name"]] = value_bytes(e["block"], take(e["block"][1]))
            continue
        shape, n, k = e["shape"], math.prod(e["shape"]), e["k"]
        words = np.frombuffer(take(e["mlen"]), "<u4")
        iname, dist, a, b = e["init"]
        g = generate_np(InitSpec(iname, dist, a, b), shape, seed, e["stream"]).reshape(-1)
        if e["coder"] == 0:
            mask = np.full(n, k == n)
        elif e["coder"] == 1:
            mask = np.full(n, not e["p"][0])
            mask[words.astype(np.int64)] = bool(e["p"][0])
        elif e["coder"] == 2:
            mask = reference_gap_decode(words, n, k, *e["p"])
        elif e["coder"] == 3:
            mask = reference_ans_decode(words, n, maskcode.ans_threshold(n, k))
        else:
            nb, flags, cc, cr, counts = e["p"]
            keys = g.view(np.uint32) & 0x7FFFFFFF
            rank = np.empty(n, np.int64)
            rank[np.lexsort((np.arange(n), keys))] = np.arange(n)
            bins = rank * nb // n
            st = Stream(words)
            rows, cols = shape[0], n // shape[0]
            col = [st.pop([cdf1(cols, cc), (1 << 24) - cdf1(cols, cc)]) if cc < cols else 1 for _ in range(cols)] \
                if flags & 1 else [1] * cols
            row = [st.pop([cdf1(rows, cr), (1 << 24) - cdf1(rows, cr)]) if cr < rows else 1 for _ in range(rows)] \
                if flags & 2 else [1] * rows
            active = [i for i in range(n) if col[i % cols] and row[i // cols]]
            mask = np.zeros(n, bool)
            for j in range(nb):
                members = [i for i in active if bins[i] == j]
                s, c = len(members), counts[j]
                for i in members:
                    mask[i] = c == s if c in (0, s) else bool(st.pop([cdf1(s, c), (1 << 24) - cdf1(s, c)]))
            st.done()
        def round_to(x, code=e["dtype"]):  # R of §5.3: f32 -> the dtype, round to nearest even, overflow to +-inf
            if code == 3:
                return x.astype(np.float32)
            if code == 6:
                with np.errstate(over="ignore"):
                    return x.astype(np.float16)
            u = x.view(np.uint32).astype(np.uint64)  # BF16: round to nearest even on the f32 bits
            return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")

        d = round_to(g)
        if e["scale"] != 1.0:  # R(f32(R(G) x frozen_scale)): G is rounded to the dtype first (§5.3, §12.5)
            wide = (d.astype(np.uint32) << 16).view(np.float32) if e["dtype"] == 7 else d.astype(np.float32)
            with np.errstate(over="ignore"):
                d = round_to(wide * np.float32(e["scale"]))
        dense = d.view(np.uint8).reshape(n, -1).copy()
        if k:
            vals = np.frombuffer(value_bytes(e["block"], take(e["block"][1])), np.uint8).reshape(k, -1)
            dense[np.flatnonzero(mask)] = vals
        raw = dense.tobytes()
        assert hashlib.sha256(raw).digest()[:16] == e["digest"], e["name"]
        out[e["name"]] = raw
    for e in entries:
        if e["kind"] == 2:
            out[e["name"]] = out[entries[e["of"]]["name"]]
    assert pos == len(r)
    return out


@pytest.mark.parametrize("v", MANIFEST_V2["valid"] + RULES_V2, ids=lambda v: v["file"])
def test_v2_vectors_decode_by_the_spec_alone_and_by_freezepack(v):
    from safetensors.torch import load_file

    path = os.path.join(VECTORS, v["file"])
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == v["sha256"]
    want = load_file(os.path.join(VECTORS, v["dense"]))
    got = _spec_v2_read(path)
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name] == bytes(api.tensor_bytes(t)), name
    with open_file(path) as r:
        plain = all(e.kind == "frozen" and e.dtype == "F32" for e in r.header.entries if e.kind != "whole")
    if plain:  # what api.load supports today: F32 frozen tensors, no aliases
        _same({k: want[k] for k in freezepack.load(path)}, freezepack.load(path))


@pytest.mark.parametrize("v", RULES_V2, ids=lambda v: v["file"])
def test_rule_vectors_load_with_freezepack_f16_bf16_and_aliases_included(v):
    from safetensors.torch import load_file

    want = load_file(os.path.join(VECTORS, v["dense"]))
    got = freezepack.load(os.path.join(VECTORS, v["file"]))
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and bytes(api.tensor_bytes(got[name])) == bytes(api.tensor_bytes(t)), name


@pytest.mark.parametrize("v", MANIFEST_V2["invalid"] + RULES_V2_INVALID, ids=lambda v: v["file"])
def test_invalid_v2_vectors_are_rejected_for_their_reason(v):
    import freezepack.errors as errors

    with pytest.raises(getattr(errors, v["error"]), match=v["reason"] or None):
        freezepack.load(os.path.join(VECTORS, v["file"]))


def test_v2_vectors_cover_every_coder():
    coders = {c for v in MANIFEST_V2["valid"] for c in v["coders"]}
    assert coders == set(wire.MASK_CODERS)
    values = {c.split(":")[0] for v in MANIFEST_V2["valid"] for c in v["value_coders"]}
    assert values == set(wire.VALUE_CODERS)
    shown = {c for v in MANIFEST_V2["valid"] for c in v["value_coders"]}
    assert {"cast:BF16+planes", "cast:F16+planes", "codebook:1"} <= shown
    with open_file(os.path.join(VECTORS, "v2_ctx.fpk")) as r:
        e = r.header.entries[0]
        assert e.coder == "ans-ctx" and e.coder_params["flags"] == 3
        assert {p[0] for p in r.parts.values()} >= {"planes", "mask"}
    with open_file(os.path.join(VECTORS, "v2_features.fpk")) as r:
        kinds = {(e.kind, r.header.target(e).dtype) for e in r.header.entries}
        assert {("frozen", "F16"), ("frozen", "BF16"), ("alias", "F32")} <= kinds
        assert {p[0] for p in r.parts.values()} >= {"planes", "raw"}
