"""The .fpk layout: a valid, deterministic, aligned safetensors file; every header lie is refused."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import freezepack
from freezepack.api import encode_record
from freezepack.errors import FormatError, FreezepackError, IntegrityError, SpecError, UsageError
from freezepack.format import dtypes, framing, maskcode, model, strictjson
from freezepack.format import io as fpio
from freezepack.format.v1 import layout as v1_layout
from freezepack.testing import record_for, rewrite, small_record, split_file


def test_is_a_valid_safetensors_file(fpk):
    rec = small_record()
    with safe_open(str(fpk), framework="pt") as f:
        keys = set(f.keys())
        assert keys == {"conv.weight#values", "conv.weight#mask", "conv2.weight#values", "conv2.weight#mask",
                        "fc.weight#values", "fc.weight#mask", "fc.bias", "bn.num_batches_tracked", "half"}
        assert f.get_tensor("conv.weight#values").dtype == torch.float32
        assert f.get_tensor("conv.weight#mask").dtype == torch.uint32
        assert torch.equal(f.get_tensor("fc.bias"), rec.whole["fc.bias"])
        assert torch.equal(f.get_tensor("half"), rec.whole["half"])
        assert torch.equal(f.get_tensor("conv.weight#values"), rec.frozen["conv.weight"].values)
        meta = f.metadata()
    inner = json.loads(meta[v1_layout.HEADER_KEY])
    assert inner["format"] == "freezepack" and inner["version"] == 1 and inner["metadata"] == {"task": "test"}


@pytest.mark.parametrize("version", [1, 2])
def test_same_record_gives_identical_bytes(tmp_path, version):
    a, b = tmp_path / "a.fpk", tmp_path / "b.fpk"
    freezepack.save(a, small_record(), version=version)
    freezepack.save(b, small_record(), version=version)
    assert a.read_bytes() == b.read_bytes()


def test_layout_is_aligned_and_canonical(fpk):
    data = fpk.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert (8 + n) % 8 == 0
    text = data[8:8 + n].decode("ascii")
    outer = json.loads(text)
    assert text.rstrip(" ") == strictjson.canonical_json(outer)
    inner_text = outer["__metadata__"][v1_layout.HEADER_KEY]
    assert inner_text == strictjson.canonical_json(json.loads(inner_text))
    spans = sorted((v["data_offsets"], v["dtype"]) for k, v in outer.items() if k != "__metadata__")
    pos = 0
    for (start, end), dtype in spans:
        assert start == pos and start % dtypes.DTYPE_SIZES[dtype] == 0
        pos = end
    assert 8 + n + pos == len(data)


def test_values_only_change_touches_only_values_and_header(tmp_path):
    rec = record_for({"a.weight": (40, 50), "b.weight": (30, 20), "a.bias": (40,)}, 0.9)
    one = b"".join(encode_record(rec, version=1))
    rec.frozen["a.weight"].values.add_(1.0)
    two = b"".join(encode_record(rec, version=1))
    assert len(one) == len(two)
    o1, _, body1 = split_file(one)
    o2, _, body2 = split_file(two)
    assert {k: v for k, v in o1.items() if k != "__metadata__"} == {k: v for k, v in o2.items() if k != "__metadata__"}
    start, end = o1["a.weight#values"]["data_offsets"]
    assert body1[:start] == body2[:start] and body1[end:] == body2[end:] and body1[start:end] != body2[start:end]


def test_plain_safetensors_is_refused_not_misread(tmp_path):
    p = tmp_path / "dense.safetensors"
    save_file({"w": torch.randn(3, 4)}, str(p))
    with pytest.raises(FormatError, match="plain safetensors"):
        freezepack.load(p)
    with pytest.raises(FormatError, match="plain safetensors"):
        freezepack.inspect(p)


def test_paths_that_are_not_files(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        freezepack.load(tmp_path / "missing.fpk")
    with pytest.raises(FormatError, match="not a regular file"):
        freezepack.load(tmp_path)
    (tmp_path / "empty.fpk").write_bytes(b"")
    with pytest.raises(FormatError, match="too short"):
        freezepack.load(tmp_path / "empty.fpk")


# what a padded file is told: v1 finds its data section too long, v2's outer header no longer matches its length
PADDED = {1: "truncated or padded", 2: "not the one its length implies"}


@pytest.mark.parametrize("version", [1, 2])
def test_truncated_and_extended_files(tmp_path, version):
    fpk = tmp_path / "m.fpk"
    freezepack.save(fpk, small_record(), {"task": "test"}, version=version)
    data = fpk.read_bytes()
    for cut in (4, 8, 100, len(data) // 2, len(data) - 1):
        fpk.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            freezepack.load(fpk)
    for pad in (1, 8):
        fpk.write_bytes(data + b"\0" * pad)
        with pytest.raises(FormatError, match=PADDED[version]):
            freezepack.load(fpk)


def _lie(fpk, edit_inner=None, edit_outer=None):
    fpk.write_bytes(rewrite(fpk.read_bytes(), edit_inner, edit_outer))


def _tensor(inner, name):
    return next(t for t in inner["tensors"] if t["name"] == name)


@pytest.mark.parametrize("edit, err, match", [
    (lambda h: h.update(version=2), FormatError, "claims version 2"),
    (lambda h: h.update(format="gguf"), FormatError, "unsupported format"),
    (lambda h: h.update(generator="mt19937/v1"), SpecError, "unknown generator"),
    (lambda h: h.update(seed="-1"), FormatError, "seed"),
    (lambda h: h.update(seed=str(2**64)), FormatError, "seed"),
    (lambda h: h.update(extra=1), FormatError, "unknown fields"),
    (lambda h: _tensor(h, "conv.weight")["init"].update(dist="cauchy"), SpecError, "unknown distribution"),
    (lambda h: _tensor(h, "conv.weight")["mask"].update(coder="ctx-v2"), FormatError, "unknown mask coder"),
    (lambda h: _tensor(h, "conv.weight").update(trainable=_tensor(h, "conv.weight")["trainable"] + 1),
     FormatError, "disagrees"),
    (lambda h: _tensor(h, "conv.weight").update(shape=[40, 51]), FormatError, "disagrees"),
    (lambda h: _tensor(h, "conv.weight").update(shape=[2**40, 2**20]), FormatError, "limit"),
    (lambda h: _tensor(h, "fc.bias").update(shape=[11]), FormatError, "expected"),
    (lambda h: _tensor(h, "fc.bias").update(kind="lazy"), FormatError, "unknown tensor kind"),
    (lambda h: _tensor(h, "fc.weight").update(frozen_scale=float("1e39")), FormatError, "float32"),
    (lambda h: _tensor(h, "fc.weight").update(frozen_scale=True), FormatError, "float32"),
    (lambda h: _tensor(h, "fc2.weight").update(dtype="I32"), FormatError, "not allowed"),
    (lambda h: h["tensors"].append(dict(_tensor(h, "fc.bias"))), FormatError, "twice"),
    (lambda h: h["stored"]["fc.bias"].update(data_offsets=[0, 40]), FormatError, "offset|disagrees"),
    (lambda h: h["stored"]["fc.bias"].update(sha256="0" * 64), FormatError, "differs"),
])
def test_header_lies_are_refused(fpk, edit, err, match):
    _lie(fpk, edit)
    with pytest.raises(err, match=match):
        freezepack.load(fpk)


def test_safetensors_entries_must_match_the_freezepack_header(fpk):
    _lie(fpk, edit_outer=lambda o: o["fc.bias"].update(dtype="I32"))
    with pytest.raises(FormatError, match="disagrees"):
        freezepack.load(fpk)


@pytest.mark.parametrize("version", [1, 2])
def test_huge_declared_sizes_are_refused_before_allocating(tmp_path, version):
    fpk = tmp_path / "m.fpk"
    freezepack.save(fpk, small_record(), {"task": "test"}, version=version)
    data = fpk.read_bytes()
    fpk.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    with pytest.raises(FormatError, match="header"):
        freezepack.load(fpk)
    fpk.write_bytes(data)
    if version == 1:
        _lie(fpk, lambda h: _tensor(h, "fc2.weight").update(shape=[2**20, 2**20]))  # 4 TiB if it were allocated
    else:  # a v2 header of one whole F32 tensor 'w' of shape [2**40, 2**40]
        from freezepack.format.v2 import wire
        from freezepack.testing.v2 import header_start, resigned

        o = header_start(1, producer="x")
        wire.name_out(o, b"", "w")
        o.b += bytes([wire.KINDS.index("whole"), dtypes.DTYPES.index("F32")])
        for d in (2, 1 << 40, 1 << 40):  # rank 2, each dimension over the element limit
            o.var(d)
        fpk.write_bytes(resigned(data, bytes(o.b)))
    with pytest.raises(FormatError, match="limit"):
        freezepack.load(fpk)
    # explicit limits let a reader be stricter still
    fpk.write_bytes(data)
    with pytest.raises(FormatError, match="limit"):
        freezepack.load(fpk, limits=model.Limits(max_tensor_elements=100))


@pytest.mark.parametrize("version", [1, 2])
def test_a_corrupted_data_byte_is_an_integrity_error(tmp_path, version):
    fpk = tmp_path / "m.fpk"
    freezepack.save(fpk, small_record(), {"task": "test"}, version=version)
    data = fpk.read_bytes()
    for pos, bit in ((-1, 1), (-5, 4)):  # in the data section (v1) / the digested body (v2)
        bad = bytearray(data)
        bad[pos] ^= bit
        fpk.write_bytes(bytes(bad))
        with pytest.raises(IntegrityError, match="corrupted.*SHA-256"):
            freezepack.load(fpk)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "m.fpk"
    freezepack.save(p, small_record(), version=1)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fpio.os, "replace", boom)
    with pytest.raises(OSError):
        freezepack.save(p, record_for({"w": (5, 5)}, 0.5), version=1)
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.fpk"]  # no temp file left behind


def test_name_collisions_and_bad_records_are_refused(tmp_path):
    rec = record_for({"w": (4, 4)}, 0.5)
    rec.whole["w#values"] = torch.zeros(3)
    with pytest.raises(UsageError, match="collide"):
        freezepack.save(tmp_path / "x.fpk", rec)
    rec = record_for({"w": (4, 4)}, 0.5)
    rec.frozen["w"].values = rec.frozen["w"].values[:-1]
    with pytest.raises(UsageError, match="one per True"):
        freezepack.save(tmp_path / "x.fpk", rec)
    rec = record_for({"w": (4, 4)}, 0.5, frozen_scale=0.1)  # 0.1 is not a float32 number
    with pytest.raises(UsageError, match="float32"):
        freezepack.save(tmp_path / "x.fpk", rec)
    assert not (tmp_path / "x.fpk").exists()


def test_every_error_names_the_file(fpk):
    _lie(fpk, lambda h: _tensor(h, "conv.weight")["mask"].update(coder="ctx-v2"))
    with pytest.raises(FreezepackError) as e:
        freezepack.load(fpk)
    assert str(fpk) in str(e.value) and "conv.weight" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# conformance vectors (spec/vectors/fpk, spec/FORMAT.md §11)
# ---------------------------------------------------------------------------------------------------------------

VECTORS = os.path.join(os.path.dirname(__file__), "..", "spec", "vectors", "fpk")
MANIFEST = json.load(open(os.path.join(VECTORS, "manifest.json")))
# the third set (FORMAT.md §11.1): version-1 items of manifest_rules.json, in the same form
RULES = json.load(open(os.path.join(VECTORS, "manifest_rules.json")))
RULES_V1 = [v for v in RULES["valid"] if v["version"] == 1]
RULES_V1_INVALID = [v for v in RULES["invalid"] if v["version"] == 1]


@pytest.mark.parametrize("v", MANIFEST["valid"] + RULES_V1, ids=lambda v: v["file"])
def test_valid_vectors_decode_to_their_dense_tensors(v):
    import hashlib

    from safetensors.torch import load_file

    from freezepack.api import tensor_bytes

    path = os.path.join(VECTORS, v["file"])
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == v["sha256"]
    want = load_file(os.path.join(VECTORS, v["dense"]))
    got = freezepack.load(path)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and bytes(tensor_bytes(got[k])) == bytes(tensor_bytes(want[k])), k
    coders = {t.get("coder") for t in freezepack.inspect(path)["tensors"] if t["kind"] == "frozen"}
    assert coders == set(v["coders"])


@pytest.mark.parametrize("v", MANIFEST["invalid"] + RULES_V1_INVALID, ids=lambda v: v["file"])
def test_invalid_vectors_are_rejected_for_their_reason(v):
    import freezepack.errors as errors

    with pytest.raises(getattr(errors, v["error"])) as e:
        freezepack.load(os.path.join(VECTORS, v["file"]))
    assert v["reason"] in e.value.reason


def test_vector_tool_reproduces_the_committed_files():
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "make_format_vectors.py")
    r = subprocess.run([sys.executable, tool, "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_coder_and_dtype_is_covered_by_the_vectors():
    assert {c for v in MANIFEST["valid"] for c in v["coders"]} == set(maskcode.CODERS)
    seen = {"whole": set(), "frozen": set(), "alias": set(), "features": set()}
    for v in MANIFEST["valid"]:
        _, inner, _ = split_file(open(os.path.join(VECTORS, v["file"]), "rb").read())
        for t in inner["tensors"]:
            seen[t["kind"]].add(t.get("dtype", "alias"))
            if t["kind"] == "frozen":
                seen["features"] |= {"stream"} & set(t) | ({"empty-stream"} if t["mask"]["coder"] == "ans-gaps"
                                                           and t["mask"]["tensor"] is None else set())
                seen["features"] |= {"scalar"} if t["shape"] == [] else {"empty"} if 0 in t["shape"] else set()
            seen["features"] |= {"x-"} if any(k.startswith("x-") for k in t) else set()
    assert seen["whole"] == set(dtypes.DTYPE_SIZES)
    assert seen["frozen"] == set(dtypes.FROZEN_DTYPES) and seen["alias"]
    assert seen["features"] == {"stream", "empty-stream", "scalar", "empty", "x-"}
    reasons = {v["reason"] for v in MANIFEST["invalid"]}
    assert {"BOOL", "zero-length mask", "surrogate", "integer", "JSON float", "pickle"} <= reasons


def _spec_only_read(path):
    """A reader written from spec/FORMAT.md alone (plus the RNG spec's numpy reference): no freezepack.format reader,
    no freezepack.format.maskcode, no constriction. It decoding every vector proves the spec is complete."""
    import hashlib
    import math

    from freezepack.format.init import InitSpec, generate_np
    from freezepack.testing.reference import reference_ans_decode, reference_gap_decode

    data = open(path, "rb").read()
    n_head = struct.unpack("<Q", data[:8])[0]
    outer = json.loads(data[8:8 + n_head])
    inner_text = outer["__metadata__"]["freezepack"]
    assert hashlib.sha256(inner_text.encode()).hexdigest() == outer["__metadata__"]["freezepack.sha256"]
    h = json.loads(inner_text)
    body = data[8 + n_head:]

    def stored(key):
        s = h["stored"][key]
        start, end = s["data_offsets"]
        raw = body[start:end]
        assert hashlib.sha256(raw).hexdigest() == s["sha256"]
        return raw

    def round_to(a32: np.ndarray, dtype: str) -> np.ndarray:
        """§5.3: round float32 to the dense dtype, nearest-even; BF16 kept as its 16-bit patterns."""
        if dtype == "F32":
            return a32.astype(np.float32)
        if dtype == "F16":
            with np.errstate(over="ignore"):  # beyond 65504 + 16: +-inf, as IEEE rounding says
                return a32.astype(np.float16)
        u = a32.astype(np.float32).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

    def widen(a: np.ndarray, dtype: str) -> np.ndarray:
        return (a.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else a.astype(np.float32)

    np_dtype = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
    out = {}
    for t in h["tensors"]:
        if t["kind"] == "whole":
            out[t["name"]] = stored(t["data"])
            continue
        if t["kind"] == "alias":
            out[t["name"]] = out[t["of"]]
            continue
        shape, n, k, dtype = t["shape"], math.prod(t["shape"]), t["trainable"], t["dtype"]
        init = t["init"]
        g = generate_np(InitSpec(init["name"], init["dist"], init["a"], init["b"]), shape, int(h["seed"]),
                        t.get("stream", t["name"])).reshape(-1)
        dense = round_to(g, dtype)
        if t["frozen_scale"] != 1.0:
            with np.errstate(over="ignore"):
                dense = round_to(widen(dense, dtype) * np.float32(t["frozen_scale"]), dtype)
        m = t["mask"]
        words = np.frombuffer(stored(m["tensor"]), "<u4") if m["tensor"] else np.zeros(0, np.uint32)
        if m["coder"] == "const":
            mask = np.full(n, k == n)
        elif m["coder"] == "positions":
            mask = np.full(n, not m["params"]["value"])
            mask[words.astype(np.int64)] = bool(m["params"]["value"])
        elif m["coder"] == "ans-bernoulli":
            mask = reference_ans_decode(words, n, m["params"]["cdf1"])
        else:
            p = m["params"]
            mask = reference_gap_decode(words, n, k, p["value"], p["b"], p["phi"])
        if k:
            dense[np.flatnonzero(mask)] = np.frombuffer(stored(t["values"]), np_dtype[dtype])
        raw = dense.astype(np_dtype[dtype]).tobytes()
        assert hashlib.sha256(raw).hexdigest() == t["sha256"]
        out[t["name"]] = raw
    return out


@pytest.mark.parametrize("v", MANIFEST["valid"] + RULES_V1, ids=lambda v: v["file"])
def test_a_reader_written_from_the_spec_alone_decodes_the_vectors(v):
    from safetensors.torch import load_file

    from freezepack.api import tensor_bytes

    got = _spec_only_read(os.path.join(VECTORS, v["file"]))
    want = load_file(os.path.join(VECTORS, v["dense"]))
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name] == bytes(tensor_bytes(t)), name


# ---------------------------------------------------------------------------------------------------------------
# hostile input: every refusal is a FreezepackError, before the work it would cost
# ---------------------------------------------------------------------------------------------------------------

def test_lone_surrogates_are_refused_not_crashed(fpk):
    data = fpk.read_bytes()
    for edit in (lambda h: _tensor(h, "fc.bias").update(name="fc\ud800"),
                 lambda h: h["metadata"].update(task="bad \udcff"),
                 lambda h: h.update(producer="\ud800")):
        fpk.write_bytes(rewrite(data, edit))
        with pytest.raises(FormatError, match="surrogate"):
            freezepack.load(fpk)
    # in the outer header: the inner text itself holds a raw surrogate
    outer, inner, body = split_file(data)
    outer["__metadata__"]["freezepack"] = strictjson.canonical_json(inner)[:-1] + ',"x-a":"\ud800"}'
    head = strictjson.canonical_json(outer).encode()
    head += b" " * (-(8 + len(head)) % 8)
    fpk.write_bytes(struct.pack("<Q", len(head)) + head + body)
    with pytest.raises(FormatError, match="surrogate|not ASCII"):
        freezepack.load(fpk)
    rec = small_record()
    rec.whole["b\ud800"] = torch.zeros(2)
    with pytest.raises(UsageError, match="Unicode"):
        freezepack.save(fpk.parent / "s.fpk", rec)
    with pytest.raises(UsageError, match="Unicode"):
        freezepack.save(fpk.parent / "s.fpk", small_record(), {"k": "\udcff"})


@pytest.mark.parametrize("edit", [
    lambda h: h.update(version=True),
    lambda h: h.update(version=1.0),
    lambda h: _tensor(h, "conv.weight").update(trainable=float(_tensor(h, "conv.weight")["trainable"])),
    lambda h: _tensor(h, "fc2.weight").update(trainable=False),
    lambda h: _tensor(h, "conv.weight").update(frozen_scale=1),
    lambda h: _tensor(h, "conv.weight")["init"].update(a=0),
    lambda h: _tensor(h, "conv.weight").update(shape=[40.0, 50]),
    lambda h: _tensor(h, "fc.weight")["mask"]["params"].update(value=True),
    lambda h: _tensor(h, "conv.weight")["init"]["params"].update(a=0),        # a float parameter as an integer
    lambda h: _tensor(h, "conv.weight")["init"]["params"].update(extra=1.0),  # not a parameter of kaiming_uniform
], ids=["version-true", "version-1.0", "trainable-float", "trainable-false", "scale-int", "init-a-int",
        "shape-float", "params-bool", "init-param-int", "init-param-extra"])
def test_numbers_have_types(fpk, edit):
    """Integers are JSON integers, floats are JSON floats (FORMAT.md §4): ``true``/``1.0`` are not the integer 1."""
    _lie(fpk, edit)
    with pytest.raises((FormatError, SpecError)):
        freezepack.load(fpk)


def test_non_canonical_inner_header_is_refused(fpk):
    outer, inner, body = split_file(fpk.read_bytes())
    text = json.dumps(inner, sort_keys=True, separators=(",", ": "), ensure_ascii=True)  # one space after colons
    from freezepack.testing.hostile import with_inner_text

    fpk.write_bytes(with_inner_text(fpk.read_bytes(), text))
    with pytest.raises(FormatError, match="freezepack header is not in canonical form"):
        freezepack.load(fpk)


def test_x_members_only_where_the_spec_allows_them(tmp_path, fpk):
    data = fpk.read_bytes()
    want = {k: api_bytes(v) for k, v in freezepack.load(fpk).items()}
    allowed = [lambda h: h.update({"x-note": {"any": [1, 2.5, None]}}),
               lambda h: _tensor(h, "conv.weight").update({"x-src": "run 7"}),
               lambda h: _tensor(h, "conv.weight")["init"].update({"x-seed-was": 3}),
               lambda h: _tensor(h, "conv.weight")["mask"].update({"x-why": "test"}),
               lambda h: h["stored"]["fc.bias"].update({"x-q": 1})]
    for edit in allowed:
        fpk.write_bytes(rewrite(data, edit))
        assert {k: api_bytes(v) for k, v in freezepack.load(fpk).items()} == want
    refused = [lambda h: _tensor(h, "conv.weight")["mask"]["params"].update({"x-a": 1}),
               lambda h: _tensor(h, "conv.weight")["init"]["params"].update({"x-a": 1.0}),
               lambda h: h["stored"].update({"x-extra": h["stored"]["fc.bias"]})]
    for edit in refused:
        fpk.write_bytes(rewrite(data, edit))
        with pytest.raises((FormatError, SpecError)):
            freezepack.load(fpk)
    # x- members are bounded in total, like metadata
    fpk.write_bytes(rewrite(data, lambda h: h.update({"x-big": "a" * (1 << 20)})))
    with pytest.raises(FormatError, match="max_metadata_bytes"):
        freezepack.load(fpk)
    # keys of data-keyed objects are data, not extensions: a tensor and a metadata key may start with x-
    rec = record_for({"x-proj.weight": (6, 6), "x-proj.bias": (6,)}, 0.5)
    freezepack.save(tmp_path / "x.fpk", rec, {"x-origin": "lab"})
    got = freezepack.load(tmp_path / "x.fpk")
    assert set(got) == {"x-proj.weight", "x-proj.bias"}
    assert freezepack.inspect(tmp_path / "x.fpk")["metadata"] == {"x-origin": "lab"}


def api_bytes(t):
    from freezepack.api import tensor_bytes

    return bytes(tensor_bytes(t))


def _resign_data(data: bytes, key: str, new: bytes) -> bytes:
    """Replace a stored tensor's bytes (same length) and re-sign its digests: only semantic checks can object."""
    import hashlib

    outer, inner, body = split_file(data)
    s = inner["stored"][key]
    a, b = s["data_offsets"]
    assert len(new) == b - a
    body = body[:a] + new + body[b:]
    digest = hashlib.sha256(new).hexdigest()

    def edit(h):
        h["stored"][key]["sha256"] = digest
        for t in h["tensors"]:
            if t.get("data") == key:
                t["sha256"] = digest
    n = struct.unpack("<Q", data[:8])[0]
    return rewrite(data[:8 + n] + body, edit)


@pytest.mark.parametrize("version", [1, 2])
def test_bool_bytes_must_be_0_or_1(tmp_path, version):
    rec = record_for({"w": (4, 4)}, 0.5)
    rec.whole["flags"] = torch.tensor([True, False, True])
    p = tmp_path / "b.fpk"
    if version == 1:  # the stored bytes edited and re-signed
        freezepack.save(p, rec, version=1)
        p.write_bytes(_resign_data(p.read_bytes(), "flags", b"\x01\x02\x01"))
    else:  # a v2 file whose BOOL tensor is a 'raw' value block: the bytes as they are; with 0/1 bytes it loads
        from freezepack.format.v2 import wire
        from freezepack.testing.v2 import body_with_whole

        raw = bytes([wire.VALUE_CODERS.index("raw")])
        p.write_bytes(body_with_whole(raw, b"\x01\x00\x01", "BOOL", 3))
        assert freezepack.load(p)["x"].tolist() == [True, False, True]
        p.write_bytes(body_with_whole(raw, b"\x01\x02\x01", "BOOL", 3))
    with pytest.raises(FormatError, match="BOOL"):
        freezepack.load(p)
    # and the writer refuses to store such bytes in the first place
    rec.whole["flags"] = torch.tensor([1, 2, 1], dtype=torch.uint8).view(torch.bool)
    with pytest.raises(UsageError, match="BOOL"):
        freezepack.save(tmp_path / "c.fpk", rec, version=version)
    assert not (tmp_path / "c.fpk").exists()


def test_header_cap_is_the_safetensors_cap():
    head = struct.pack("<Q", 100_000_000)
    big = model.Limits(max_header_bytes=model.MAX_HEADER_BYTES)
    assert framing.parse_prefix(head, 200_000_000, limits=big) == 100_000_000
    with pytest.raises(FormatError, match="over the cap of 100000000"):
        framing.parse_prefix(struct.pack("<Q", 100_000_008), 200_000_000, limits=big)
    # a reader's own default is smaller (parsing costs a few times the header): a limit that says how to raise it
    with pytest.raises(FormatError, match=r"max_header_bytes=16777216.*Limits\(max_header_bytes"):
        framing.parse_prefix(head, 200_000_000)


def test_mask_tensor_exists_exactly_when_the_stream_has_words(tmp_path, fpk):
    from freezepack.testing.hostile import gaps_prefix_file

    p = tmp_path / "prefix.fpk"
    p.write_bytes(gaps_prefix_file(1000, 10))  # the minority is a prefix: an empty 'ans-gaps' stream
    e = freezepack.open(p).entry("w")
    assert e.coder == "ans-gaps" and e.mask_key is None
    w = freezepack.load(p)["w"]
    assert torch.equal(w[:10], torch.ones(10))
    # a zero-length mask tensor is never written: a reader refuses it
    outer, inner, body = split_file(p.read_bytes())

    def add_empty(h):
        h["tensors"][0]["mask"]["tensor"] = "w#mask"
        h["stored"]["w#mask"] = {"dtype": "U32", "shape": [0], "data_offsets": [0, 0],
                                 "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
    p.write_bytes(rewrite(p.read_bytes(), add_empty,
                          lambda o: o.update({"w#mask": {"dtype": "U32", "shape": [0], "data_offsets": [0, 0]}})))
    with pytest.raises(FormatError, match="zero-length mask"):
        freezepack.load(p)


def test_torch_checkpoints_are_named(tmp_path):
    for name, kw in (("zip.pt", {}), ("legacy.pt", {"_use_new_zipfile_serialization": False})):
        p = tmp_path / name
        torch.save({"w": torch.zeros(3)}, p, **kw)
        with pytest.raises(FormatError, match="torch checkpoint.*freezepack convert"):
            freezepack.inspect(p)


@pytest.mark.parametrize("version", [1, 2])
def test_load_on_the_meta_device(tmp_path, version):
    fpk = tmp_path / "m.fpk"
    freezepack.save(fpk, small_record(), version=version)
    got = freezepack.load(fpk, device="meta")
    want = freezepack.load(fpk)
    assert set(got) == set(want)
    for k in want:
        assert got[k].is_meta and got[k].shape == want[k].shape and got[k].dtype == want[k].dtype
    with freezepack.open(fpk, device="meta") as f:
        assert f.get_tensor("conv.weight").is_meta
    with pytest.raises(UsageError, match="meta"):
        freezepack.verify(fpk, device="meta")


def test_missing_parent_directory_is_refused_unless_asked(tmp_path):
    target = tmp_path / "no" / "such" / "m.fpk"
    with pytest.raises(FreezepackError, match="does not exist"):
        freezepack.save(target, small_record())
    assert not (tmp_path / "no").exists()
    fpio.atomic_write(target, [b"x"], make_parents=True)
    assert target.read_bytes() == b"x"


_FSIZE_SCRIPT = r"""
import resource, sys
import freezepack
sys.path.insert(0, sys.argv[2])
from freezepack.testing import small_record
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
try:
    freezepack.save(sys.argv[1], small_record())
except freezepack.FreezepackError as e:
    print("REFUSED", e)
"""


def test_file_too_large_names_the_path_and_keeps_the_old_file(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "m.fpk"
    target.write_bytes(b"old")
    r = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(target), os.path.dirname(__file__)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("REFUSED " + str(target)) and "File too large" in r.stdout
    assert "free space or write elsewhere" in r.stdout
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.fpk"]


def test_an_atomic_replace_during_open_is_read_consistently(tmp_path, monkeypatch):
    """The size comes from the open file: a rename between a stat and the open cannot make a good file look
    truncated (the old reader stat-ed the path, then opened whatever was there by then)."""
    a, b = tmp_path / "m.fpk", tmp_path / "other.fpk"
    freezepack.save(a, small_record())
    freezepack.save(b, record_for({"w": (30, 30)}, 0.9))
    real_stat = os.stat

    def stat_then_replace(path, *args, **kw):
        st = real_stat(path, *args, **kw)
        if os.fspath(path) == str(a) and b.exists():
            os.replace(b, a)  # another process publishes a new version right now
        return st

    monkeypatch.setattr(fpio.os, "stat", stat_then_replace)
    got = set(freezepack.load(a))  # the old version or the new one, never a refusal
    assert got in ({"w"}, set(small_record().state_dict()))


def test_concurrent_atomic_replaces_never_look_truncated(tmp_path):
    import threading

    p = tmp_path / "m.fpk"
    versions = [b"".join(encode_record(record_for({"w": (20 + 5 * i, 20)}, 0.9))) for i in range(3)]
    p.write_bytes(versions[0])
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            fpio.atomic_write(p, [versions[i % 3]])

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(150):
            freezepack.inspect(p)  # any FreezepackError here is a spurious refusal
    finally:
        stop.set()
        t.join()


def test_check_regular_file_is_public():
    assert fpio.check_regular_file(__file__) == os.path.getsize(__file__)
    with pytest.raises(FormatError, match="no such file"):
        fpio.check_regular_file("/nonexistent/x.fpk")
    with pytest.raises(FormatError, match="not a regular file"):
        fpio.check_regular_file(os.path.dirname(__file__))


def test_memory_limit_is_checked_before_allocating(fpk, monkeypatch):
    from freezepack.testing.hostile import frozen_bomb

    fpk.write_bytes(frozen_bomb(fpk.read_bytes()))
    sizes = []
    real_empty = torch.empty

    def spy(*shape, **kw):
        sizes.append(shape)
        return real_empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", spy)
    with pytest.raises(FormatError, match=r"max_dense_bytes=\d+.*Limits\(max_dense_bytes"):
        freezepack.load(fpk, limits=model.Limits(max_dense_bytes=1 << 30))
    report = freezepack.verify(fpk, limits=model.Limits(max_dense_bytes=1 << 30))
    bad = [t for t in report["tensors"] if not t["ok"]]
    assert [t["name"] for t in bad] == ["fc2.weight"] and "max_dense_bytes" in bad[0]["error"]
    assert not any(1 << 32 in (s[0] if s and isinstance(s[0], tuple) else s) for s in sizes)
    assert len(fpk.read_bytes()) < 8000  # 16 GiB from a few KB: the file size cannot be the bound


def test_rng_spec_states_the_table_layouts_and_digests():
    """RNG.md §5.4: the text table's digest and line layout, and the binary table as A then D, little-endian."""
    import hashlib
    import re

    root = os.path.join(os.path.dirname(__file__), "..")
    spec = open(os.path.join(root, "spec", "RNG.md"), encoding="utf-8").read()
    text = open(os.path.join(root, "spec", "normal_table_v1.txt"), "rb").read()
    binary = open(os.path.join(root, "freezepack", "format", "tables", "normal_v1.f32"), "rb").read()
    text_digest, bin_digest = re.search(r"Text\*\*.*?SHA-256 `([0-9a-f]{64})`.*?Binary\*\*.*?SHA-256 `([0-9a-f]{64})`",
                                        spec, re.S).groups()
    assert hashlib.sha256(text).hexdigest() == text_digest and hashlib.sha256(binary).hexdigest() == bin_digest
    lines = text.decode("ascii").split("\n")
    rows = [line.split(" ") for line in lines if line and not line.startswith("#")]
    assert len(rows) == 4096 and sum(line.startswith("#") for line in lines) == 2
    a = np.frombuffer(binary, "<u4")
    for idx, (e, j, ahex, dhex, _, _) in enumerate(rows):
        assert idx == 128 * int(e) + int(j)
        assert int(ahex, 16) == a[idx] and int(dhex, 16) == a[4096 + idx]
