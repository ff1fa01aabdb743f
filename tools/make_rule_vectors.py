"""The third set of .fpk conformance vectors (spec/FORMAT.md §11.1): ``rules_*.fpk``, listed in
``spec/vectors/fpk/manifest_rules.json``. Called by ``tools/make_format_vectors.py`` (which writes and --checks
every file of spec/vectors/fpk/); the first two sets (manifest.json, manifest_v2.json) never change.

Each rule a reader could get subtly wrong is shown by several files, so that breaking any single rounding step,
conversion or coder rule fails at least three of them (tests/test_vector_strength.py proves it):

* ``frozen_scale`` that is not a power of two (0.75, 0.6875, 1.5, 1.25) on F16 and BF16 tensors: the dense value
  is ``R(f32(R(G) x s))`` (round G to the dtype, multiply in f32, round again; §5.3), which differs from
  rounding ``G x s`` once on ~30 % of the elements;
* initializers with an offset (normal mean, uniform low) and a step that is not a power of two: ``a + b*z``
  rounded twice (RNG.md §6);
* F16 overflow to infinity (|x| >= 65520) and F16 subnormals, BF16 overflow (round-to-nearest-even carries into
  the exponent), when rounding G and when multiplying by ``frozen_scale``;
* names that start with U+FEFF (part of the name, and of the stream) and keys beyond U+FFFF next to keys in
  U+E000..U+FFFF (code point order differs from UTF-16 code unit order);
* v2: ``ans-ctx`` masks on F16/BF16 tensors with a frozen_scale (the context is |G| before scaling and rounding),
  alias entries after other aliases (``j`` counts every entry), ``cast`` values that are F16 subnormals;
* invalid files for the single-dimension bound, an alias that is not earlier, ``frozen_scale`` not exact in the
  dtype or spelled as 1.0, a coder other than ``raw`` for an empty tensor, unsorted metadata and a v2 BOOL byte.

The dense tensors are computed here from the spec with numpy (the reference generator, then numpy's IEEE
float16 conversion and integer round-to-nearest-even for BF16), not by the writer; the tool checks that
freezepack decodes every file to them.
"""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import torch
from safetensors.torch import save as st_save

from freezepack import api
from freezepack.format.init import generate_np, make_init
from freezepack.format.record import FreezeRecord, FrozenTensor
from freezepack.testing import rewrite
from freezepack.testing.v2 import leb128 as _var

BOM, PRIVATE, ASTRAL = "\ufeff", "\ue000", "\U0001f600"  # U+E000 < U+1F600, but UTF-16 units D83D < E000


# --- the dense truth, from the spec (FORMAT.md §5.3) -------------------------------------------------------------

def round_to(x32: np.ndarray, dtype: str) -> np.ndarray:
    """R: f32 -> the dtype, round to nearest even, overflow to +-inf; F16 as float16, BF16 as its uint16 bits."""
    x32 = np.ascontiguousarray(x32, dtype=np.float32)
    if dtype == "F32":
        return x32.copy()
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x32.astype(np.float16)
    u = x32.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # a carry out of 0x7F7F is 0x7F80 = inf


def widen(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


def dense_of(init, shape, seed, stream, dtype, scale, mask, values) -> np.ndarray:
    g = generate_np(init, shape, seed, stream).reshape(-1)
    d = round_to(g, dtype)
    if scale != 1.0:
        with np.errstate(over="ignore"):
            d = round_to(widen(d, dtype) * np.float32(scale), dtype)
    d[np.flatnonzero(mask)] = values
    return d.reshape(shape)


def as_torch(x: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.view(torch.bfloat16) if dtype == "BF16" else t


# --- valid files ----------------------------------------------------------------------------------------------------

# (name, dtype, init name, params, shape, frozen_scale, q): F16/BF16 with non-power-of-two scales, overflow, tiny values
FLOAT_TENSORS = {
    "f16": [("half.scaled", "F16", "xavier_uniform", {}, (32, 24), 0.75, 0.9),
            ("half.mean", "F16", "normal", {"mean": 0.3, "std": 0.7}, (16, 32), 0.6875, 0.8),
            ("half.overflow", "F16", "normal", {"std": 30000.0}, (16, 16), 1.5, 0.9),
            ("half.tiny", "F16", "normal", {"std": 2e-6}, (16, 16), 0.75, 0.9),
            ("half.plain", "F16", "uniform", {"a": -0.37, "b": 0.02}, (24, 10), 1.0, 0.9),
            ("ctx.narrow.f16", "F16", "uniform", {"a": 1.0, "b": 1.0 + 2 ** -9}, (24, 32), 0.75, 0.8)],
    "bf16": [("bf.scaled", "BF16", "uniform", {"a": -0.37, "b": 0.39}, (32, 24), 0.75, 0.9),
             ("bf.mean", "BF16", "normal", {"mean": 0.3, "std": 0.7}, (16, 32), 0.6875, 0.8),
             ("bf.kaiming", "BF16", "kaiming_normal", {"nonlinearity": "relu"}, (20, 20), 1.25, 0.9),
             ("bf.overflow", "BF16", "uniform", {"a": 3.38e38, "b": 3.402e38}, (16, 16), 1.0, 0.9),
             ("bf.overflow_scaled", "BF16", "uniform", {"a": 2.0e38, "b": 3.4e38}, (16, 16), 1.5, 0.9),
             ("ctx.narrow.bf16", "BF16", "uniform", {"a": -1.0, "b": -1.0 + 2 ** -6}, (24, 32), 0.75, 0.8)],
    "mixed": [("f32.offset", "F32", "normal", {"mean": 7.25, "std": 2.2}, (24, 24), 1.0, 0.9),
              ("f32.uniform", "F32", "uniform", {"a": 2.0, "b": 4.5}, (24, 24), 0.8123, 0.9),
              ("half.k", "F16", "kaiming_uniform", {}, (24, 20), 0.8125, 0.85),
              ("half.overflow", "F16", "normal", {"mean": 1000.0, "std": 40000.0}, (16, 16), 0.75, 0.9),
              ("half.tiny", "F16", "uniform", {"a": -3e-6, "b": 3e-6}, (16, 16), 1.25, 0.9),
              ("bf.x", "BF16", "xavier_normal", {"gain": 1.3}, (20, 24), 0.5625, 0.85),
              ("ctx.narrow.bf16", "BF16", "uniform", {"a": 0.5, "b": 0.5 + 2 ** -8}, (24, 32), 1.0, 0.8)],
}


def _snip_like(init, shape, seed, name, q, g) -> np.ndarray:
    """A mask chosen like SNIP: the largest |G| x a random factor per row and column, the first row and column
    dead, so that 'ans-ctx' picks several bins and row/column flags (and its context is what decodes it). A
    ``ctx.narrow`` tensor's mask is the largest |G| alone: its G round to a few F16/BF16 values, so ranking the
    rounded (or scaled) values instead of G's f32 bits puts entries in other bins."""
    a = np.abs(generate_np(init, shape, seed, name).astype(np.float64)).reshape(shape[0], -1)
    narrow = name.startswith("ctx.narrow")
    score = a if narrow else a * g.random((shape[0], 1)) * g.random((1, a.shape[1]))
    if not narrow:
        score[0] = score[:, 0] = 0
    mask = np.zeros(a.size, bool)
    mask[np.argsort(-score.reshape(-1), kind="stable")[:int(round((1 - q) * a.size))]] = True
    return mask


def _record(kind: str, seed: int):
    """(record, entry order, dense tensors) of one set; the same record is written as v1 and as v2 (twins)."""
    g = np.random.default_rng(seed)
    rec, dense, order = FreezeRecord(seed=seed), {}, []
    specs = FLOAT_TENSORS[kind] + [(BOM + "bom.weight", "F32", "uniform", {"a": -0.5, "b": 0.3}, (12, 12), 1.0, 0.9)]
    for i, (name, dtype, iname, params, shape, scale, q) in enumerate(specs):
        scale = float(np.float32(scale))
        init = make_init(iname, shape, **params)
        mask = _snip_like(init, shape, seed, name, q, g)
        k = int(mask.sum())
        vals = round_to((g.standard_normal(k) * 0.05).astype(np.float32), dtype)
        if kind == "f16" and i == 0:
            vals[:4] = np.array([6e-8, -3e-5, 65504, -0.0], dtype=np.float16)  # subnormal, max, -0 as values
        d = dense_of(init, shape, seed, name, dtype, scale, mask, vals)
        tdt = api.TORCH_DTYPES[dtype]
        rec.frozen[name] = FrozenTensor(init, torch.from_numpy(mask.reshape(shape)), as_torch(vals, dtype).to(tdt),
                                        scale)
        dense[name] = as_torch(d, dtype)
        order.append(name)
        if i in (0, 1):  # an alias after each of the first two: the second alias's j counts the first alias
            rec.aliases[name + ".tied"] = name
            order.append(name + ".tied")
            dense[name + ".tied"] = dense[name].clone()
    # F32 values that are F16 numbers, subnormals included ('cast' in v2), and names beyond U+FFFF
    sub = np.arange(1, 151, dtype=np.float32) * np.float32(2.0 ** -24)  # F16 subnormals (k x 2^-24)
    cast_vals = np.stack([sub * np.float32(1 - 2 * (seed % 2)), 1 + sub * 2 ** 14]).T.reshape(-1)  # + F16 normals
    assert np.array_equal(cast_vals.astype(np.float16).astype(np.float32), cast_vals)
    name, shape = "cast.weight", (12, 40)
    mask = np.zeros(480, bool)
    mask[np.sort(g.choice(480, cast_vals.size, replace=False))] = True
    init = make_init("xavier_normal", shape)
    rec.frozen[name] = FrozenTensor(init, torch.from_numpy(mask.reshape(shape)), torch.from_numpy(cast_vals))
    dense[name] = torch.from_numpy(dense_of(init, shape, seed, name, "F32", 1.0, mask, cast_vals))
    order.append(name)
    for w in (PRIVATE, ASTRAL, PRIVATE + "x", ASTRAL + "x"):
        rec.whole[w] = torch.tensor([len(w) + 0.5, -1.0])
        dense[w] = rec.whole[w]
        order.append(w)
    return rec, order, dense


METADATA = {PRIVATE: "private use (U+E000)", ASTRAL: "beyond U+FFFF", "plain": "ascii"}
SETS = {"f16": 31, "bf16": 32, "mixed": 33}
# v2: these tensors' masks are coded 'ans-ctx' whatever the writer's size choice (context on scaled F16/BF16)
CTX = {"half.scaled", "half.mean", "bf.scaled", "bf.mean", "bf.kaiming", "half.k", "bf.x", "f32.offset",
       "ctx.narrow.f16", "ctx.narrow.bf16"}


def valid(version: int):
    """file name -> (bytes, dense tensors, description)."""
    from freezepack.format.v2 import writer as compact

    out = {}
    best = compact._best_mask
    for kind, seed in SETS.items():
        rec, order, dense = _record(kind, seed)
        compact._best_mask = lambda e, mask, seed, _b=best: _b(e, mask, seed, only="ans-ctx" if e.name in CTX
                                                               and 0 < mask.sum() < mask.size else None)
        try:
            data = b"".join(api.encode_record(rec, order, METADATA, truth=dense, version=version))
        finally:
            compact._best_mask = best
        out[f"rules_v{version}_{kind}.fpk"] = (data, dense, f"{kind}: frozen_scale not a power of two on F16/BF16, "
                                                             "offset initializers, overflow, subnormals, a U+FEFF "
                                                             "name, keys beyond U+FFFF, aliases after aliases")
    return out


# --- invalid files: v2 bodies assembled by hand from §12 (so the spec alone says how), v1 by re-signing ----------

def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return _var(len(raw)) + raw


def _v2_file(entries: bytes, count: int, payload: bytes = b"", meta=()) -> bytes:
    from freezepack.format.v2.wire import outer_header

    head = bytes([0]) + _var(5) + _str("hand-made") + _var(len(meta)) + b"".join(_str(k) + _str(v) for k, v in meta)
    r = head + _var(count) + entries + payload
    body = hashlib.sha256(r).digest() + r
    return outer_header(len(body)) + body


def _name(prev: str, name: str) -> bytes:  # front coding (§12.2), shared prefix of the UTF-8 bytes
    p, n = prev.encode(), name.encode()
    s = 0
    while s < min(len(p), len(n)) and p[s] == n[s]:
        s += 1
    return _var(s) + _var(len(n) - s) + n[s:]


def _whole(prev, name, dtype_code, shape, coder=0) -> bytes:
    return _name(prev, name) + bytes([0, dtype_code]) + _var(len(shape)) + b"".join(map(_var, shape)) + bytes([coder])


def _frozen_f16_scaled(scale: float) -> bytes:
    """A frozen F16 [2, 2] xavier_normal tensor, all frozen (const mask), with an explicit frozen_scale."""
    return (_name("", "w") + bytes([1 | 8, 6]) + _var(2) + _var(2) + _var(2) + bytes([0]) + struct.pack("<ff", 0.0, 0.5)
            + struct.pack("<f", scale) + _var(0) + bytes([0]) + bytes(16))


def invalid(v1_base: bytes):
    """file name -> (bytes, error class, reason phrase, description)."""
    out = {
        "rules_v2_invalid_dimension.fpk": (
            _v2_file(_whole("", "empty", 3, [0, 1 << 33]), 1), "FormatError", "dimension",
            "whole F32 tensor of shape [0, 2**33]: no elements, but a dimension over the 2**32 bound"),
        "rules_v2_invalid_alias_self.fpk": (
            _v2_file(_whole("", "a", 3, [1]) + _name("a", "b") + bytes([2]) + _var(1), 2, b"\0\0\x80\x3f"),
            "FormatError", "out of range", "alias j = 1 in entry 1: not an earlier entry"),
        "rules_v2_invalid_alias_of_alias.fpk": (
            _v2_file(_whole("", "a", 3, [1]) + _name("a", "b") + bytes([2]) + _var(0) + _name("b", "c") + bytes([2])
                     + _var(1), 3, b"\0\0\x80\x3f"), "FormatError", "itself an alias",
            "alias j = 1 names entry 1, which is itself an alias"),
        "rules_v2_invalid_planes_on_empty.fpk": (
            _v2_file(_whole("", "empty", 3, [0, 4], coder=1), 1), "FormatError", "empty tensor",
            "an empty whole tensor coded 'planes' (n = 0: 'raw' only)"),
        "rules_v2_invalid_metadata_order.fpk": (
            _v2_file(_whole("", "a", 3, [1]), 1, b"\0\0\x80\x3f", meta=[(ASTRAL, "x"), (PRIVATE, "y")]),
            "FormatError", "strictly increasing", "metadata keys U+1F600 then U+E000 (UTF-16 order, not UTF-8)"),
        "rules_v2_invalid_bool_byte.fpk": (
            _v2_file(_whole("", "flags", 12, [3]), 1, b"\x00\x02\x01"), "FormatError", "BOOL",
            "a whole BOOL tensor holding the byte 2"),
        "rules_v2_invalid_scale_not_f16.fpk": (
            _v2_file(_frozen_f16_scaled(float(np.float32(0.1))), 1), "FormatError", "not exactly",
            "frozen_scale f32(0.1) on an F16 tensor: not an F16 number"),
        "rules_v2_invalid_scale_one.fpk": (
            _v2_file(_frozen_f16_scaled(1.0), 1), "FormatError", "spelled out",
            "frozen_scale 1.0 written out (tag bit 3 set): one spelling per model"),
    }

    def dim(h, outer=None):
        t = next(t for t in h["tensors"] if t["kind"] == "whole")
        t["shape"] = h["stored"][t["data"]]["shape"] = [0, 1 << 33]

    def dim_outer(o):
        t = next(k for k, v in o.items() if k != "__metadata__" and "#" not in k)
        o[t]["shape"] = [0, 1 << 33]

    rec = FreezeRecord(seed=1)
    rec.whole["empty"] = torch.zeros(0, 4)
    empty = b"".join(api.encode_record(rec, version=1))
    out["rules_v1_invalid_dimension.fpk"] = (rewrite(empty, dim, dim_outer), "FormatError", "max_tensor_elements",
                                             "whole tensor of shape [0, 2**33] (re-signed)")

    def scale(h):
        t = next(t for t in h["tensors"] if t["kind"] == "frozen" and t["dtype"] == "BF16")
        t["frozen_scale"] = float(np.float32(0.8123))
    out["rules_v1_invalid_scale_not_bf16.fpk"] = (rewrite(v1_base, scale), "FormatError", "not exactly",
                                                  "frozen_scale f32(0.8123) on a BF16 tensor (re-signed)")
    return out


def build() -> dict[str, bytes]:
    """Every rules_* file and manifest_rules.json."""
    from freezepack.format.model import MASK_SUFFIX
    from freezepack.format.v2.reader import coding_name, parse_body

    files = {}
    manifest = {"format": "freezepack", "valid": [], "invalid": []}
    v1 = valid(1)
    for version, vs in ((1, v1), (2, valid(2))):
        for fname, (data, dense, desc) in vs.items():
            dname = fname[:-4] + ".dense.safetensors"
            dense_bytes = st_save({k: v.contiguous() for k, v in dense.items()})
            files[fname], files[dname] = data, dense_bytes
            item = {"version": version, "file": fname, "sha256": hashlib.sha256(data).hexdigest(), "dense": dname,
                    "dense_sha256": hashlib.sha256(dense_bytes).hexdigest(), "description": desc}
            if version == 2:
                n = struct.unpack("<Q", data[:8])[0]
                parsed, parts, _ = parse_body(data[8 + n:])
                item["coders"] = sorted({e.coder for e in parsed.entries if e.kind == "frozen"})
                item["value_coders"] = sorted({coding_name(c, p) for k, (c, p, _, _) in parts.items()
                                               if not k.endswith(MASK_SUFFIX)})
            else:
                inner = json.loads(json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"][
                    "freezepack"])
                item["coders"] = sorted({t["mask"]["coder"] for t in inner["tensors"] if t["kind"] == "frozen"})
            manifest["valid"].append(item)
    for fname, (data, err, reason, desc) in invalid(v1["rules_v1_bf16.fpk"][0]).items():
        files[fname] = data
        manifest["invalid"].append({"version": 1 if fname.startswith("rules_v1") else 2, "file": fname,
                                    "sha256": hashlib.sha256(data).hexdigest(), "error": err, "reason": reason,
                                    "description": desc})
    files["manifest_rules.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    return files
