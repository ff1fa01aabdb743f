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
from freezepack.format import container
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
    inner = json.loads(meta[container.HEADER_KEY])
    assert inner["format"] == "freezepack" and inner["version"] == 1 and inner["metadata"] == {"task": "test"}


def test_same_record_gives_identical_bytes(tmp_path):
    a, b = tmp_path / "a.fpk", tmp_path / "b.fpk"
    freezepack.save(a, small_record(), version=1)
    freezepack.save(b, small_record(), version=1)
    assert a.read_bytes() == b.read_bytes()


def test_layout_is_aligned_and_canonical(fpk):
    data = fpk.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert (8 + n) % 8 == 0
    text = data[8:8 + n].decode("ascii")
    outer = json.loads(text)
    assert text.rstrip(" ") == container.canonical_json(outer)
    inner_text = outer["__metadata__"][container.HEADER_KEY]
    assert inner_text == container.canonical_json(json.loads(inner_text))
    spans = sorted((v["data_offsets"], v["dtype"]) for k, v in outer.items() if k != "__metadata__")
    pos = 0
    for (start, end), dtype in spans:
        assert start == pos and start % container.DTYPE_SIZES[dtype] == 0
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


def test_truncated_and_extended_files(fpk):
    data = fpk.read_bytes()
    for cut in (4, 8, 100, len(data) // 2, len(data) - 1):
        fpk.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            freezepack.load(fpk)
    fpk.write_bytes(data + b"\0" * 8)
    with pytest.raises(FormatError, match="truncated or padded"):
        freezepack.load(fpk)


def _lie(fpk, edit_inner=None, edit_outer=None):
    fpk.write_bytes(rewrite(fpk.read_bytes(), edit_inner, edit_outer))


def _tensor(inner, name):
    return next(t for t in inner["tensors"] if t["name"] == name)


@pytest.mark.parametrize("edit, err, match", [
    (lambda h: h.update(version=2), FormatError, "newer than this reader"),
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


def test_huge_declared_sizes_are_refused_before_allocating(fpk):
    data = fpk.read_bytes()
    fpk.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    with pytest.raises(FormatError, match="header"):
        freezepack.load(fpk)
    fpk.write_bytes(data)
    _lie(fpk, lambda h: _tensor(h, "fc2.weight").update(shape=[2**20, 2**20]))  # 4 TiB if it were allocated
    with pytest.raises(FormatError, match="limit"):
        freezepack.load(fpk)
    # explicit limits let a reader be stricter still
    fpk.write_bytes(data)
    with pytest.raises(FormatError, match="limit"):
        freezepack.load(fpk, limits=container.Limits(max_tensor_elements=100))


def test_corrupted_header_digest_and_data(fpk):
    data = bytearray(fpk.read_bytes())
    _, _, body = split_file(bytes(data))
    data[-1] ^= 1  # last byte of the data section
    fpk.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupted"):
        freezepack.load(fpk)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "m.fpk"
    freezepack.save(p, small_record(), version=1)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(container.os, "replace", boom)
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


@pytest.mark.parametrize("v", MANIFEST["valid"], ids=lambda v: v["file"])
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


@pytest.mark.parametrize("v", MANIFEST["invalid"], ids=lambda v: v["file"])
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
    assert {c for v in MANIFEST["valid"] for c in v["coders"]} == set(container.maskcode.CODERS)


def _spec_only_read(path):
    """A reader written from spec/FORMAT.md alone (plus the RNG spec's numpy reference): no freezepack.format.container,
    no freezepack.format.maskcode, no constriction. It decoding every vector proves the spec is complete."""
    import hashlib
    import math

    from test_maskcode import reference_ans_decode, reference_gap_decode

    from freezepack.format.init import InitSpec, generate_np

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

    out = {}
    for t in h["tensors"]:
        if t["kind"] == "whole":
            out[t["name"]] = stored(t["data"])
            continue
        shape, n, k = t["shape"], math.prod(t["shape"]), t["trainable"]
        init = t["init"]
        dense = generate_np(InitSpec(init["name"], init["dist"], init["a"], init["b"]), shape, int(h["seed"]),
                            t["name"]).reshape(-1)
        if t["frozen_scale"] != 1.0:
            dense = (dense * np.float32(t["frozen_scale"])).astype(np.float32)
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
            dense[np.flatnonzero(mask)] = np.frombuffer(stored(t["values"]), "<f4")
        raw = dense.astype("<f4").tobytes()
        assert hashlib.sha256(raw).hexdigest() == t["sha256"]
        out[t["name"]] = raw
    return out


@pytest.mark.parametrize("v", MANIFEST["valid"], ids=lambda v: v["file"])
def test_a_reader_written_from_the_spec_alone_decodes_the_vectors(v):
    from safetensors.torch import load_file

    from freezepack.api import tensor_bytes

    got = _spec_only_read(os.path.join(VECTORS, v["file"]))
    want = load_file(os.path.join(VECTORS, v["dense"]))
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name] == bytes(tensor_bytes(t)), name
