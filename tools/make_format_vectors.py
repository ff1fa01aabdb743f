"""Write (or --check) the .fpk conformance vectors in spec/vectors/fpk/ (spec/FORMAT.md §11).

Valid vectors cover every mask coder, every initializer distribution, FreezeNet-WD's frozen_scale, every whole
dtype, scalars and empty tensors, non-ASCII metadata and a seed above 2**63; each comes with the dense tensors it
must decode to, as a plain .safetensors file. Invalid vectors are valid files with one defect each, and name the
check that must reject them.

    .venv/bin/python tools/make_format_vectors.py           # rewrite spec/vectors/fpk/
    .venv/bin/python tools/make_format_vectors.py --check   # exit 1 unless the writer reproduces them byte for byte
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import struct
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import save as st_save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from freezepack.api import encode_record  # noqa: E402
from freezepack.format import maskcode  # noqa: E402
from freezepack.format.init import make_init  # noqa: E402
from freezepack.format.model import AliasEntry, FrozenEntry, Header, WholeEntry  # noqa: E402
from freezepack.format.record import FreezeRecord, FrozenTensor  # noqa: E402
from freezepack.format.v1 import writer as v1_writer  # noqa: E402
from freezepack.format.v1.layout import FORMAT_VERSION  # noqa: E402
from freezepack.testing import rewrite, split_file, with_inner_text  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_rule_vectors  # noqa: E402  (tools/, next to this script)

OUT = os.path.join(ROOT, "spec", "vectors", "fpk")


@contextlib.contextmanager
def force_coder(name: str):
    """Make the writer use one coder (the vectors must show each, whatever the writer's size choice)."""
    original = maskcode.encode

    def encode(mask):
        flat = np.ascontiguousarray(np.asarray(mask)).reshape(-1)
        n, k = flat.size, int(flat.sum())
        if name == "positions":
            value = 1 if k <= n - k else 0
            return maskcode.CodedMask("positions", k, {"value": value},
                                      np.flatnonzero(flat if value else ~flat).astype("<u4"))
        if name == "ans-gaps":
            return min(maskcode._encode_gaps(flat, n, k), key=lambda c: c.nbytes)
        if name == "ans-bernoulli":
            return maskcode._encode_ans(flat, n, k)
        return original(mask)

    maskcode.encode = encode
    try:
        yield
    finally:
        maskcode.encode = original


def _mask(shape, p, seed):
    return torch.from_numpy(np.random.default_rng(seed).random(shape) < p)


def _frozen(init, mask, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return FrozenTensor(init, mask, torch.randn(int(mask.sum()), generator=g), scale)


def valid_vectors():
    """name -> (record, metadata, forced coder or None, description)."""
    v = {}
    rec = FreezeRecord(seed=1)
    shape = (40, 50)
    rec.frozen["layer.weight"] = _frozen(make_init("xavier_normal", shape), _mask(shape, 0.2, 1), 1)
    v["bernoulli"] = (rec, {}, "ans-bernoulli", "one xavier_normal tensor, mask coded 'ans-bernoulli'")

    rec = FreezeRecord(seed=2)
    shape = (16, 3, 3, 3)
    rec.frozen["conv1.weight"] = _frozen(make_init("kaiming_uniform", shape), _mask(shape, 0.05, 2), 2)
    rec.whole["conv1.bias"] = torch.linspace(-1, 1, 16)
    v["gaps"] = (rec, {}, "ans-gaps", "kaiming_uniform conv weight at q~0.95 ('ans-gaps') and a whole bias")

    rec = FreezeRecord(seed=3)
    shape = (60, 50)
    m = torch.zeros(shape, dtype=torch.bool)
    m.view(-1)[:600:3] = True
    m.view(-1)[2990] = True  # a gap of ~2400 > 255 * 2**b: an escape
    rec.frozen["fc.weight"] = _frozen(make_init("normal", shape, mean=0.25, std=0.5), m, 3)
    v["gaps_escape"] = (rec, {}, "ans-gaps", "'ans-gaps' with an escaped gap; normal(mean, std) initializer")

    rec = FreezeRecord(seed=4)
    shape = (30, 10)
    m = torch.zeros(shape, dtype=torch.bool)
    m[3, 4] = m[17, 9] = True
    rec.frozen["fc.weight"] = _frozen(make_init("pm_sigma", shape), m, 4)
    rec.frozen["fc2.weight"] = _frozen(make_init("uniform", shape, a=-0.5, b=0.25), ~m, 4)
    v["positions"] = (rec, {}, "positions", "'positions' of ones (pm_sigma) and of zeros (uniform)")

    rec = FreezeRecord(seed=5)
    rec.frozen["all_frozen.weight"] = _frozen(make_init("xavier_uniform", (8, 6)),
                                              torch.zeros(8, 6, dtype=torch.bool), 5)
    rec.frozen["all_trained.weight"] = _frozen(make_init("xavier_normal", (4, 5)),
                                               torch.ones(4, 5, dtype=torch.bool), 5)
    rec.frozen["const.weight"] = _frozen(make_init("constant", (3, 3), val=0.75), _mask((3, 3), 0.3, 5), 5)
    rec.frozen["pruned.weight"] = _frozen(make_init("zeros", (5, 5)), _mask((5, 5), 0.2, 6), 6)
    v["const"] = (rec, {}, None, "'const' masks (q = 1 and q = 0), constant and zeros initializers")

    rec = FreezeRecord(seed=6)
    shape = (20, 20)
    rec.frozen["wd.weight"] = _frozen(make_init("kaiming_normal", shape), _mask(shape, 0.1, 7), 7, scale=0.375)
    rec.frozen["wd2.weight"] = _frozen(make_init("pm_sigma", shape), _mask(shape, 0.1, 8), 8,
                                       scale=float(np.float32(0.8123)))
    v["frozen_scale"] = (rec, {}, None, "FreezeNet-WD: frozen_scale 0.375 and 0.8123 (as f32)")

    rec = FreezeRecord(seed=2**64 - 5)
    shape = (6, 7)
    rec.frozen["w"] = _frozen(make_init("xavier_normal", shape), _mask(shape, 0.3, 9), 9)
    g = torch.Generator().manual_seed(9)
    rec.whole.update({
        "f64": torch.randn(3, generator=g, dtype=torch.float64), "f16": torch.randn(2, 2, generator=g).half(),
        "bf16": torch.randn(5, generator=g).bfloat16(), "i64": torch.tensor([-1, 2**40]),
        "i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4)})
    meta = {"arch": "tiny", "note": "caf\u00e9 \u2713 \U0001f600", "\u00e9": "key with non-ASCII"}
    v["whole_dtypes"] = (rec, meta, None, "every whole dtype, a scalar, an empty tensor, non-ASCII metadata, "
                                          "seed 2**64 - 5")

    rec = FreezeRecord(seed=7)
    rec.whole.update({"u64": torch.tensor([0, 2**64 - 1], dtype=torch.uint64),
                      "u32": torch.tensor([[1, 2**32 - 1]], dtype=torch.uint32),
                      "i16": torch.tensor([-32768, 0, 32767], dtype=torch.int16),
                      "u16": torch.tensor([0, 65535], dtype=torch.uint16)})
    v["whole_dtypes_unsigned"] = (rec, {}, None, "the whole dtypes U64, U32, I16, U16 at their extremes")

    rec = FreezeRecord(seed=8)
    rec.frozen["scalar.frozen"] = _frozen(make_init("normal", (), mean=0.5, std=2.0), torch.tensor(False), 10)
    rec.frozen["scalar.trained"] = _frozen(make_init("normal", ()), torch.tensor(True), 11)
    rec.frozen["empty.weight"] = _frozen(make_init("uniform", (0, 4)), torch.zeros(0, 4, dtype=torch.bool), 12)
    v["frozen_scalars_empty"] = (rec, {}, None, "frozen scalars (all frozen, all trained) and an empty frozen tensor")

    rec = FreezeRecord(seed=9)
    shape = (32, 32)
    m = torch.zeros(shape, dtype=torch.bool)
    m.view(-1)[:37] = True  # the trainable entries are a prefix: every gap is 0, the stream has no words
    rec.frozen["prefix.weight"] = _frozen(make_init("xavier_normal", shape), m, 13)
    v["gaps_empty_stream"] = (rec, {}, "ans-gaps", "an empty 'ans-gaps' stream: \"tensor\": null (§3, §6.5)")
    return v


def _edit_vectors(valid: dict[str, bytes]):
    """Valid vectors made by editing a writer's file and re-signing it: x- extension members (§9)."""
    def extend(h):
        h["x-note"] = {"anything": [1, 2.5, None, "\u00e9"]}
        t = h["tensors"][0]
        t["x-origin"] = "run 7"
        t["init"]["x-comment"] = "ignored"
        t["mask"]["x-why"] = True
        h["stored"][t["values"]]["x-q"] = 1

    rec = FreezeRecord(seed=10)
    rec.frozen["x-proj.weight"] = _frozen(make_init("xavier_uniform", (12, 10)), _mask((12, 10), 0.3, 14), 14)
    rec.whole["x-proj.bias"] = torch.arange(12, dtype=torch.float32)
    data = b"".join(encode_record(rec, metadata={"x-origin": "metadata keys are data, not extensions"}, version=1))
    return {"extensions": (_resign(data, extend), rec.state_dict(),
                           "x- members in the header, an entry, init, mask and a stored entry; a tensor and a "
                           "metadata key named x-...")}


def _stream_dtype_alias():
    """stream / F16 / BF16 / alias (§5.1, §5.3), written by the v1 writer directly from the spec's rules, with
    the dense tensors computed independently (numpy reference generator, torch round-to-nearest-even casts)."""
    from freezepack.format.init import generate_np

    seed = 11
    blobs, entries, dense = {}, [], {}
    specs = [("enc.weight", "F32", "shared/emb", 1.0, 0.25), ("half.weight", "F16", None, 0.5, 0.2),
             ("bhalf.weight", "BF16", None, 1.0, 0.1)]
    for i, (name, dtype, stream, scale, p) in enumerate(specs):
        shape = (6, 8)
        init = make_init("xavier_normal", shape)
        tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
        g = torch.from_numpy(generate_np(init, shape, seed, stream or name)).to(tdt)
        if scale != 1.0:
            g = (g.to(torch.float32) * np.float32(scale)).to(tdt)
        mask = _mask(shape, p, 20 + i)
        values = torch.randn(int(mask.sum()), generator=torch.Generator().manual_seed(30 + i)).to(tdt)
        g[mask] = values
        dense[name] = g
        coded = maskcode.encode(mask.numpy())
        e = FrozenEntry(name, shape, dtype, hashlib.sha256(g.contiguous().view(torch.uint8).numpy()).hexdigest(),
                        init, scale, int(mask.sum()), coded.coder, dict(coded.params), int(coded.payload.size),
                        stream)
        if e.mask_key:
            blobs[e.mask_key] = ("U32", (int(coded.payload.size),), coded.payload.astype("<u4").tobytes())
        blobs[e.values_key] = (dtype, (e.trainable,), values.contiguous().view(torch.uint8).numpy().tobytes())
        entries.append(e)
    entries.append(AliasEntry("dec.weight", entries[0].name))
    dense["dec.weight"] = dense["enc.weight"].clone()  # the dense file stores the tied tensor twice
    header = Header(seed=seed, entries=tuple(entries), producer="make_format_vectors", version=1)
    data = b"".join(v1_writer.encode_file(header, blobs))
    return {"stream_dtypes_alias": (data, dense, "a frozen tensor drawing from another stream, F16 and BF16 "
                                                 "frozen tensors (one with frozen_scale), a tied alias entry")}


def _resign(data: bytes, edit, outer_extra: dict | None = None) -> bytes:
    """Edit the freezepack header and re-sign it: a consistent file whose content lies."""
    return rewrite(data, edit, (lambda outer: outer.update(outer_extra)) if outer_extra else None)


def invalid_vectors(valid: dict[str, bytes]):
    """name -> (bytes, error class, message substring, description)."""
    base = valid["gaps"]
    n = struct.unpack("<Q", base[:8])[0]
    out = {}
    b = bytearray(base)
    b[-3] ^= 0x10
    out["data_corrupted"] = (bytes(b), "IntegrityError", "corrupted", "one bit of the values tensor flipped")
    b = bytearray(base)
    i = base.index(b'"seed\\":\\"2\\"') + len(b'"seed\\":\\"')
    b[i] = ord("3")
    out["header_corrupted"] = (bytes(b), "IntegrityError", "header digest", "seed edited without re-signing")
    text = base[8:8 + n].rstrip(b" ")
    spaced = text.replace(b'"__metadata__":', b'"__metadata__": ', 1)
    spaced += b" " * (-(8 + len(spaced)) % 8)
    out["not_canonical"] = (struct.pack("<Q", len(spaced)) + spaced + base[8 + n:], "FormatError", "canonical",
                            "same JSON with one extra space after a colon")
    out["truncated"] = (base[:-4], "FormatError", "truncated", "last 4 bytes missing")
    out["future_version"] = (_resign(base, lambda h: h.update(version=3)), "FormatError", "newer",
                             "format version 3 (re-signed)")
    out["unknown_coder"] = (_resign(base, lambda h: h["tensors"][0]["mask"].update(coder="ctx-model")),
                            "FormatError", "unknown mask coder", "a coder this version does not know (re-signed)")
    out["unknown_generator"] = (_resign(base, lambda h: h.update(generator="mt19937/v1")), "SpecError",
                                "unknown generator", "a generator this version does not know (re-signed)")

    def lie(h):
        h["tensors"][0]["sha256"] = "0" * 64

    out["dense_digest_mismatch"] = (_resign(base, lie), "IntegrityError", "bit-exact",
                                    "dense digest that regeneration cannot match (re-signed)")
    out["count_lie"] = (_resign(base, lambda h: h["tensors"][0].update(trainable=h["tensors"][0]["trainable"] + 1)),
                        "FormatError", "expected", "trainable count disagrees with the values tensor (re-signed)")
    out["plain_safetensors"] = (st_save({"w": torch.zeros(2, 2)}), "FormatError", "plain safetensors",
                                "an ordinary safetensors file: refused, not misread")
    import pickle

    out["pickle"] = (pickle.dumps({"w": [0.0] * 4}, protocol=2), "FormatError", "pickle",
                     "a pickle (as a legacy torch checkpoint starts): named, not parsed")
    out["version_bool"] = (_resign(base, lambda h: h.update(version=True)), "FormatError", "unsupported format",
                           "\"version\": true is not the integer 1 (§4 number types)")
    def as_float(h):
        h["tensors"][0]["trainable"] = float(h["tensors"][0]["trainable"])
    out["integral_float"] = (_resign(base, as_float), "FormatError", "integer",
                             "trainable written as a JSON float (19.0)")
    out["scale_as_integer"] = (_resign(base, lambda h: h["tensors"][0].update(frozen_scale=1)), "FormatError",
                               "JSON float", "frozen_scale written as the integer 1")
    out["x_in_mask_params"] = (_resign(base, lambda h: h["tensors"][0]["mask"]["params"].update({"x-a": 1})),
                               "FormatError", "needs parameters", "an x- member where exact keys are required")
    out["init_params_wrong"] = (_resign(base, lambda h: h["tensors"][0]["init"]["params"].update(a=0)), "SpecError",
                                "init params", "kaiming_uniform's float parameter a written as an integer")
    out["lone_surrogate"] = (_resign(base, lambda h: h["tensors"][1].update(name="conv1.bias\ud800")),
                             "FormatError", "surrogate", "a tensor name with a lone surrogate escape")
    out["stream_is_name"] = (_resign(base, lambda h: h["tensors"][0].update(stream=h["tensors"][0]["name"])),
                             "FormatError", "stream", "stream spelled out although it equals the name")
    out["alias_forward"] = (_resign(base, lambda h: h["tensors"].insert(0, {"name": "tied", "kind": "alias",
                                                                            "of": "conv1.bias"})),
                            "FormatError", "alias", "an alias of a tensor that comes later")
    outer, inner, body = split_file(base)
    text = json.dumps(inner, sort_keys=True, separators=(",", ": "), ensure_ascii=True)
    out["inner_not_canonical"] = (with_inner_text(base, text), "FormatError", "freezepack header is not in canonical",
                                  "the inner header with a space after every colon (re-signed)")
    flags = valid["whole_dtypes"]
    o2, i2, b2 = split_file(flags)
    a, e = i2["stored"]["bool"]["data_offsets"]
    bad = bytearray(b2)
    bad[a + 1] = 2
    digest = hashlib.sha256(bytes(bad[a:e])).hexdigest()

    def resign_bool(h):
        h["stored"]["bool"]["sha256"] = digest
        next(t for t in h["tensors"] if t["name"] == "bool")["sha256"] = digest
    n2 = struct.unpack("<Q", flags[:8])[0]
    out["bool_byte"] = (_resign(flags[:8 + n2] + bytes(bad), resign_bool), "FormatError", "BOOL",
                        "a BOOL tensor byte of 2 (re-signed)")
    empty = valid["gaps_empty_stream"]

    def add_empty_mask(h):
        t = h["tensors"][0]
        t["mask"]["tensor"] = t["name"] + "#mask"
        h["stored"][t["name"] + "#mask"] = {"dtype": "U32", "shape": [0], "data_offsets": [0, 0],
                                            "sha256": hashlib.sha256(b"").hexdigest()}
    out["empty_mask_tensor"] = (_resign(empty, add_empty_mask, {"prefix.weight#mask": {
        "data_offsets": [0, 0], "dtype": "U32", "shape": [0]}}), "FormatError", "zero-length mask",
        "an empty stream stored as a zero-length U32 tensor instead of null")
    return out


def build() -> dict[str, bytes]:
    files = {}
    manifest = {"format": "freezepack", "version": FORMAT_VERSION, "valid": [], "invalid": []}
    valid_bytes = {}

    def add_valid(name, data, dense, desc):
        valid_bytes[name] = data
        dense_bytes = st_save({k: v.contiguous() for k, v in dense.items()})
        files[f"{name}.fpk"], files[f"{name}.dense.safetensors"] = data, dense_bytes
        _, inner, _ = split_file(data)
        manifest["valid"].append({
            "file": f"{name}.fpk", "sha256": hashlib.sha256(data).hexdigest(),
            "dense": f"{name}.dense.safetensors", "dense_sha256": hashlib.sha256(dense_bytes).hexdigest(),
            "coders": sorted({t["mask"]["coder"] for t in inner["tensors"] if t["kind"] == "frozen"}),
            "description": desc})

    for name, (rec, meta, coder, desc) in valid_vectors().items():
        with force_coder(coder) if coder else contextlib.nullcontext():
            data = b"".join(encode_record(rec, metadata=meta, version=1))
        add_valid(name, data, rec.state_dict(), desc)
    for name, (data, dense, desc) in {**_edit_vectors(valid_bytes), **_stream_dtype_alias()}.items():
        add_valid(name, data, dense, desc)
    for name, (data, err, reason, desc) in invalid_vectors(valid_bytes).items():
        fname = f"invalid_{name}.fpk"
        files[fname] = data
        manifest["invalid"].append({"file": fname, "sha256": hashlib.sha256(data).hexdigest(), "error": err,
                                    "reason": reason, "description": desc})
    files["manifest.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    files.update(build_v2())  # format version 2: its own function and manifest, below
    files.update(make_rule_vectors.build())  # the third set (FORMAT.md §11.1): tools/make_rule_vectors.py
    return files


# ===============================================================================================================
# Format version 2 (spec/FORMAT.md §12): v2_*.fpk, listed in manifest_v2.json. Kept apart from the v1 vectors above.
# ===============================================================================================================

def _v2_frozen(name, shape, dtype, seed, mask, init, scale=1.0, stream=None, blobs=None, dense=None, vals=None,
               hint=None):
    """A frozen v2 Entry from a mask; values 0.01 * j in the tensor's dtype; dense = the reference reconstruction
    (generator f32 output rounded to dtype, x frozen_scale in f32, rounded to dtype again, values scattered in)."""
    from freezepack import api
    from freezepack.format.init import generate

    g = generate(init, shape, seed, stream or name).reshape(-1)
    t = g.to(api.TORCH_DTYPES[dtype])
    if scale != 1.0:  # §5.3: R(f32(R(G) x frozen_scale)), G rounded to the dtype first
        t = (t.to(torch.float32) * np.float32(scale)).to(api.TORCH_DTYPES[dtype])
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    k = int(mask.sum())
    if vals is None:
        vals = (torch.arange(k, dtype=torch.float32) * 0.01 - 0.3).to(api.TORCH_DTYPES[dtype])
    t[torch.from_numpy(np.flatnonzero(mask))] = vals
    coded = maskcode.encode(mask)
    e = FrozenEntry(name, tuple(shape), dtype, api.digest(t), init, scale, k, coded.coder, dict(coded.params),
                    int(coded.payload.size), stream)
    if e.mask_key:
        blobs[e.mask_key] = ("U32", (coded.payload.size,), coded.payload.astype("<u4").tobytes())
    if e.values_key:
        blobs[e.values_key] = (dtype, (k,), bytes(api.tensor_bytes(vals))) + ((hint,) if hint else ())
    dense[name] = t.reshape(shape)
    return e


def _v2_whole(name, t, blobs, dense):
    from freezepack import api

    raw = bytes(api.tensor_bytes(t))
    blobs[name] = (api.DTYPE_NAMES[t.dtype], tuple(t.shape), raw)
    dense[name] = t
    return WholeEntry(name, tuple(t.shape), api.DTYPE_NAMES[t.dtype], hashlib.sha256(raw).hexdigest())


def _snip_like(shape, seed, q, dead_rows=0, dead_cols=0):
    """A mask chosen like SNIP (large |w_init| x a random per-row/column gradient), some rows/columns dead."""
    from freezepack.format.init import generate

    init = make_init("xavier_normal", shape)
    w = generate(init, shape, seed, "w").numpy().reshape(shape[0], -1)
    g = np.random.default_rng(seed)
    score = np.abs(w) * g.random((shape[0], 1)) * g.random((1, w.shape[1]))
    score[:dead_rows] = 0
    score[:, :dead_cols] = 0
    m = np.zeros(w.size, bool)
    m[np.argsort(-score.reshape(-1), kind="stable")[:int(round((1 - q) * w.size))]] = True
    return init, m


def v2_valid():
    """name -> (Header, blobs, dense tensors, description)."""
    from freezepack.format.init import generate  # noqa: F401  (torch generator, as the writer uses)

    out = {}
    # 1. a LeNet-like layer: ans-ctx with row/column flags, 'planes' values, a whole bias coded 'planes'
    blobs, dense = {}, {}
    seed = 21
    init, m = _snip_like((60, 300), seed, 0.95, dead_rows=6, dead_cols=40)
    e = _v2_frozen("fc.weight", (60, 300), "F32", seed, m, init, blobs=blobs, dense=dense)
    bias = _v2_whole("fc.bias", torch.linspace(-0.05, 0.05, 60), blobs, dense)
    out["v2_ctx"] = (Header(seed=seed, entries=(e, bias), producer="freezepack vectors"), blobs, dense,
                     "'ans-ctx' mask with row and column flags, 'planes' values and a whole 'planes' bias")
    # 2. every other mask coder
    blobs, dense = {}, {}
    seed = 22
    rng = np.random.default_rng(seed)
    few = np.zeros(300, bool)
    few[[7, 201]] = True
    ents = [_v2_frozen("const.weight", (8, 6), "F32", seed, np.zeros(48, bool), make_init("xavier_uniform", (8, 6)),
                       blobs=blobs, dense=dense),
            _v2_frozen("all.weight", (4, 5), "F32", seed, np.ones(20, bool), make_init("xavier_normal", (4, 5)),
                       blobs=blobs, dense=dense),
            _v2_frozen("positions.weight", (30, 10), "F32", seed, few, make_init("pm_sigma", (30, 10)), blobs=blobs,
                       dense=dense),
            _v2_frozen("gaps.weight", (50, 40), "F32", seed, rng.random(2000) < 0.03, make_init("zeros", (50, 40)),
                       blobs=blobs, dense=dense),
            _v2_frozen("bernoulli.weight", (40, 50), "F32", seed, rng.random(2000) < 0.3,
                       make_init("constant", (40, 50), val=0.75), blobs=blobs, dense=dense)]
    out["v2_coders"] = (Header(seed=seed, entries=tuple(ents), producer="freezepack vectors"), blobs, dense,
                        "'const' (q = 1 and q = 0), 'positions', 'ans-gaps', 'ans-bernoulli' masks in v2 blocks")
    # 3. everything else v2 carries
    blobs, dense = {}, {}
    seed = 2**64 - 7
    g = torch.Generator().manual_seed(23)
    rng = np.random.default_rng(23)
    ents = [_v2_frozen("half.weight", (8, 9), "F16", seed, rng.random(72) < 0.3, make_init("xavier_uniform", (8, 9)),
                       0.5, "old.name", blobs, dense),
            _v2_frozen("bf.weight", (6, 5, 3), "BF16", seed, rng.random(90) < 0.2, make_init("pm_sigma", (6, 5, 3)),
                       0.25, None, blobs, dense),
            _v2_frozen("relu.weight", (20, 20), "F32", seed, rng.random(400) < 0.1,
                       make_init("kaiming_normal", (20, 20), nonlinearity="relu"), float(np.float32(0.8123)), None,
                       blobs, dense)]
    wholes = {"f64": torch.randn(3, generator=g, dtype=torch.float64), "f16": torch.randn(2, 2, generator=g).half(),
              "bf16": torch.randn(5, generator=g).bfloat16(), "i64": torch.tensor([-1, 2**40]),
              "u64": torch.tensor([5], dtype=torch.uint64), "i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32),
              "u32": torch.tensor([7], dtype=torch.uint32), "i16": torch.tensor([-3], dtype=torch.int16),
              "u16": torch.tensor([9], dtype=torch.uint16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
              "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
              "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
              "bn.running_var": (torch.rand(200, generator=g) + 0.5)}
    ents += [_v2_whole(k, v, blobs, dense) for k, v in wholes.items()]
    ents.append(AliasEntry("tied.weight", "relu.weight"))
    dense["tied.weight"] = dense["relu.weight"].clone()
    meta = {"arch": "tiny", "note": "caf\u00e9 \u2713 \U0001f600", "\u00e9": "key with non-ASCII"}
    out["v2_features"] = (Header(seed=seed, entries=tuple(ents), metadata=meta, producer="freezepack vectors"),
                          blobs, dense, "F16/BF16 frozen tensors, a stream key, frozen_scale, initializer params, "
                                        "every whole dtype, 0-d and empty tensors, an alias, metadata, seed 2**64-7")
    # 4. the value coders for lossy-quantized (or naturally few-valued) values: cast, codebook table and grid
    from freezepack.format.entropy import grid_values

    blobs, dense = {}, {}
    seed = 24
    g = torch.Generator().manual_seed(24)
    rng = np.random.default_rng(24)

    def masked(shape, p):
        m = rng.random(int(np.prod(shape))) < p
        return m, int(m.sum())

    m1, k1 = masked((30, 40), 0.3)
    m2, k2 = masked((30, 40), 0.3)
    m3, k3 = masked((30, 40), 0.2)
    m4, k4 = masked((30, 40), 0.2)
    m5, k5 = masked((12, 10), 0.5)
    step = float(np.float32(0.0123))
    levels = rng.integers(-7, 8, k4)
    ents = [_v2_frozen("bf16.weight", (30, 40), "F32", seed, m1, make_init("xavier_normal", (30, 40)), blobs=blobs,
                       dense=dense, vals=(torch.randn(k1, generator=g) * 0.05).bfloat16().float()),
            _v2_frozen("f16.weight", (30, 40), "F32", seed, m2, make_init("xavier_normal", (30, 40)), blobs=blobs,
                       dense=dense, vals=(torch.randn(k2, generator=g) * 0.05).half().float()),
            _v2_frozen("kmeans.weight", (30, 40), "F32", seed, m3, make_init("xavier_normal", (30, 40)), blobs=blobs,
                       dense=dense, vals=torch.tensor([-0.11, -0.04, 0.0, 0.05, 0.13])[torch.from_numpy(
                           rng.integers(0, 5, k3))]),
            _v2_frozen("grid.weight", (30, 40), "F32", seed, m4, make_init("xavier_normal", (30, 40)), blobs=blobs,
                       dense=dense, vals=torch.from_numpy(grid_values(levels, step)), hint={"step": step}),
            _v2_frozen("half.weight", (12, 10), "F16", seed, m5, make_init("xavier_uniform", (12, 10)), blobs=blobs,
                       dense=dense, vals=torch.tensor([-0.5, 0.25, 0.375], dtype=torch.float16)[torch.from_numpy(
                           rng.integers(0, 3, k5))])]
    ents += [_v2_whole("labels", torch.from_numpy(rng.integers(0, 3, 500).astype(np.int32)), blobs, dense),
             _v2_whole("zeros.bias", torch.zeros(64), blobs, dense)]
    out["v2_values"] = (Header(seed=seed, entries=tuple(ents), producer="freezepack vectors"), blobs, dense,
                        "value coders: 'cast' to BF16 and to F16, 'codebook' tables (F32, F16, I32, a one-value "
                        "table) and a 'codebook' grid")
    return out


def _v2_redigest(data: bytes, edit) -> bytes:
    """Apply ``edit`` to the body's R (after the digest) and re-digest: a consistent file that lies."""
    from freezepack.format.v2.wire import outer_header

    n = struct.unpack("<Q", data[:8])[0]
    rest = edit(bytearray(data[8 + n + 32:]))
    body = hashlib.sha256(rest).digest() + bytes(rest)
    return outer_header(len(body)) + body


def v2_invalid(valid: dict[str, bytes]):
    """name -> (bytes, error class, message substring, description)."""
    base = valid["v2_ctx"]
    out = {}
    b = bytearray(base)
    b[-2] ^= 0x20
    out["v2_invalid_body_corrupted"] = (bytes(b), "IntegrityError", "SHA-256", "one bit of the body flipped")
    out["v2_invalid_json_edited"] = (base.replace(b'"dtype":"U8"', b'"dtype":"I8"', 1), "FormatError",
                                     "v2 safetensors header", "the safetensors JSON edited (U8 -> I8)")
    out["v2_invalid_truncated"] = (base[:-3], "FormatError", "", "last 3 bytes missing")

    def seed_edit(r):
        r[1] ^= 1  # the seed (varint after the generator code): changes regeneration, dense digest catches it
        return r

    out["v2_invalid_dense_digest"] = (_v2_redigest(base, seed_edit), "IntegrityError", "bit-exact",
                                      "seed changed and body re-digested: regeneration cannot match")
    out["v2_invalid_unknown_generator"] = (_v2_redigest(base, lambda r: bytearray([9]) + r[1:]), "SpecError",
                                           "generator", "generator code 9 (re-digested)")
    out["v2_invalid_trailing"] = (_v2_redigest(base, lambda r: r + b"\0"), "FormatError", "after the last payload",
                                  "one byte after the last payload (re-digested)")
    return out


def build_v2() -> dict[str, bytes]:
    from freezepack.format.model import MASK_SUFFIX
    from freezepack.format.v2 import writer as compact
    from freezepack.format.v2.reader import coding_name, parse_body

    files, valid = {}, {}
    manifest = {"format": "freezepack", "version": 2, "valid": [], "invalid": []}
    best = compact._best_mask
    force = {"positions.weight": "positions", "gaps.weight": "ans-gaps", "bernoulli.weight": "ans-bernoulli",
             "fc.weight": "ans-ctx"}  # every coder shown, whatever the writer's size choice
    planes = compact._planes_block
    for name, (h, blobs, dense, desc) in v2_valid().items():
        compact._best_mask = lambda e, mask, seed: best(e, mask, seed, only=force.get(e.name))
        if name == "v2_values":  # show 'cast': no 4-byte 'planes' (which codes F16/BF16-exact f32 about as well)
            compact._planes_block = lambda raw, elem: None if elem == 4 else planes(raw, elem)
        try:
            data = b"".join(compact.encode_file(h, blobs))
        finally:
            compact._best_mask, compact._planes_block = best, planes
        valid[name] = data
        dense_bytes = st_save({k: v.contiguous() for k, v in dense.items()})
        files[f"{name}.fpk"], files[f"{name}.dense.safetensors"] = data, dense_bytes
        n = struct.unpack("<Q", data[:8])[0]
        parsed, parts, _ = parse_body(data[8 + n:])
        manifest["valid"].append({
            "file": f"{name}.fpk", "sha256": hashlib.sha256(data).hexdigest(), "dense": f"{name}.dense.safetensors",
            "dense_sha256": hashlib.sha256(dense_bytes).hexdigest(),
            "coders": sorted({e.coder for e in parsed.entries if e.kind == "frozen"}),
            "value_coders": sorted({coding_name(c, p) for k, (c, p, _, _) in parts.items()
                                    if not k.endswith(MASK_SUFFIX)}),
            "description": desc})
    for name, (data, err, reason, desc) in v2_invalid(valid).items():
        files[f"{name}.fpk"] = data
        manifest["invalid"].append({"file": f"{name}.fpk", "sha256": hashlib.sha256(data).hexdigest(), "error": err,
                                    "reason": reason, "description": desc})
    files["manifest_v2.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    files = build()
    if args.check:
        bad = [f for f, data in files.items()
               if not os.path.exists(os.path.join(args.out, f)) or open(os.path.join(args.out, f), "rb").read() != data]
        extra = sorted(set(os.listdir(args.out)) - set(files)) if os.path.isdir(args.out) else []
        for f in bad:
            print(f"differs: {f}")
        for f in extra:
            print(f"not produced by this tool: {f}")
        print("ok" if not bad and not extra else "MISMATCH")
        return 0 if not bad and not extra else 1
    os.makedirs(args.out, exist_ok=True)
    for f, data in files.items():
        fd, tmp = tempfile.mkstemp(dir=args.out)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, os.path.join(args.out, f))
    print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
