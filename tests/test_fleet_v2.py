"""Fleet deltas for format v2 .fpk files: cut at the payloads inside the one body tensor, so a fine-tune ships the
changed values and a small prefix; hostile v2-looking files fall back to the generic cut or fail cleanly."""
from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest

pytest.importorskip("tuf")

import torch  # noqa: E402

from freezepack import api  # noqa: E402
from freezepack.errors import FormatError  # noqa: E402
from freezepack.fleet import delta, file_pieces  # noqa: E402
from freezepack.format.record import FreezeRecord, FrozenTensor  # noqa: E402
from freezepack.format.v2 import reader as v2_reader  # noqa: E402
from freezepack.format.v2 import wire  # noqa: E402
from freezepack.testing.fleet import Fleet, record, start_registry_or_skip, write_fpk  # noqa: E402


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def mask_moved(rec: FreezeRecord, name="fc2.weight") -> FreezeRecord:
    """The same record with ``name``'s mask moved (same trainable count, same values): a mask-only change."""
    t = rec.frozen[name]
    flat = t.mask.flatten()
    g = torch.Generator().manual_seed(99)
    new = torch.zeros_like(flat)
    new[torch.randperm(flat.numel(), generator=g)[:int(flat.sum())]] = True
    frozen = dict(rec.frozen)
    frozen[name] = FrozenTensor(t.init, new.reshape(t.mask.shape), t.values)
    return FreezeRecord(rec.seed, frozen=frozen, whole=rec.whole)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("v2models")
    return {
        "r1": write_fpk(d / "r1.fpk", record(), version=2),
        "all": write_fpk(d / "all.fpk", record(value_seed=1), version=2),     # every trained value changed
        "head": write_fpk(d / "head.fpk", record(head_seed=1), version=2),    # one layer fine-tuned
        "mask": write_fpk(d / "mask.fpk", mask_moved(record()), version=2),   # fc2's mask moved, values kept
        "v1": write_fpk(d / "v1.fpk", record(), version=1),
    }


@pytest.fixture
def fleet(tmp_path, models):
    f = Fleet(tmp_path)
    f.publish(models["r1"])
    assert f.install().status == "installed"
    return f


def sizes(path) -> dict:
    out = {}
    for p in file_pieces(path):
        out[p.label] = out.get(p.label, 0) + p.length
    return out


def body_of(path) -> tuple[int, bytes]:
    data = open(path, "rb").read()
    base = 8 + struct.unpack("<Q", data[:8])[0]
    return base, data[base:]


def generic(path) -> list[tuple[int, int, str]]:
    with open(path, "rb") as f:
        n, header = delta.read_safetensors_header(f, os.path.getsize(path), path)
    return delta._ranges(path, os.path.getsize(path), n, header)


def check_tiles(path, pieces):
    data = open(path, "rb").read()
    assert b"".join(data[p.offset:p.offset + p.length] for p in pieces) == data
    assert all(hashlib.sha256(data[p.offset:p.offset + p.length]).hexdigest() == p.sha256 for p in pieces)


# ------------------------------------------------------------------------------------------------ the cut
def test_v2_file_is_cut_at_its_payloads(models):
    path = models["r1"]
    pieces = file_pieces(path)
    check_tiles(path, pieces)
    base, body = body_of(path)
    parts = v2_reader.parse_body(body)[1]     # the reader's own view (digest checked)
    first = min(start for _, _, start, _ in parts.values())
    assert pieces[0].label == delta.HEADER_LABEL and pieces[0].length == base + first
    assert [(p.offset - base, p.offset - base + p.length, p.label) for p in pieces[1:]] == \
        [(s, e, k) for k, (_, _, s, e) in parts.items() if e > s]
    assert {p.label for p in pieces[1:]} >= {"fc1.weight#mask", "fc1.weight#values", "fc3.weight#values"}
    # the layout parser reads only the body's first bytes, and refuses a head that stops inside the header
    end, spans = v2_reader.layout(body[:first + 10], len(body))
    assert end == first and spans == [(k, s, e) for k, (_, _, s, e) in parts.items()]
    with pytest.raises(FormatError, match="ends early"):
        v2_reader.layout(body[:first - 1], len(body))


def test_v1_and_dense_files_keep_the_generic_cut(models, tmp_path):
    from safetensors.torch import save_file

    dense = str(tmp_path / "d.safetensors")
    save_file(record().state_dict(), dense)
    for path in (models["v1"], dense):
        pieces = file_pieces(path)
        assert [(p.offset, p.length, p.label) for p in pieces] == generic(path)
        check_tiles(path, pieces)


def test_large_v2_payloads_are_split_at_max_piece(models, monkeypatch):
    monkeypatch.setattr(delta, "MAX_PIECE", 4096)
    pieces = file_pieces(models["r1"])
    check_tiles(models["r1"], pieces)
    values = [p for p in pieces if p.label == "fc1.weight#values"]
    assert len(values) > 1 and max(p.length for p in values) == 4096


def test_v2_header_longer_than_the_parse_cap_falls_back_to_the_generic_cut(models, monkeypatch):
    monkeypatch.setattr(delta, "MAX_PIECE", 128)      # the v2 header (~500 B) no longer fits in what we parse
    path = models["r1"]
    assert [(p.offset, p.length, p.label) for p in file_pieces(path)] == generic(path)


# ------------------------------------------------------------------------------------------------ updates
def changed(old, new) -> set[str]:
    have = {p.sha256 for p in file_pieces(old)}
    return {p.label for p in file_pieces(new) if p.sha256 not in have}


@pytest.mark.parametrize("update, expect", [
    ("head", {"__header__", "fc3.weight#values"}),
    ("all", {"__header__", "fc1.weight#values", "fc2.weight#values", "fc3.weight#values"}),
    ("mask", {"__header__", "fc2.weight#mask"}),
])
def test_update_fetches_only_changed_payloads_and_the_prefix(fleet, models, update, expect):
    assert changed(models["r1"], models[update]) == expect
    fleet.publish(models[update])
    r = fleet.install()
    assert (r.status, r.release) == ("installed", 2)
    path = fleet.device.model_path("net")
    assert sha(path) == sha(models[update])
    assert api.verify(path)["ok"]
    s = sizes(models[update])
    assert r.fetched_bytes == sum(s[k] for k in expect)
    assert r.fetched_bytes + r.reused_bytes == r.full_bytes == os.path.getsize(models[update])
    assert s["__header__"] < 1024                      # the prefix stays small
    if update != "all":
        assert r.fetched_bytes < 0.1 * r.full_bytes


def test_releases_published_with_the_generic_cut_still_install_and_update(tmp_path, models, monkeypatch):
    """A repository signed before v2 cutting existed: its layouts still verify and install; the next release,
    cut at payloads, is a delta against the file the device already holds."""
    f = Fleet(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(delta, "_payload_ranges", lambda *a: None)       # what the publisher did before
        f.publish(models["r1"])
    info = f.publisher().latest("net")
    assert [label for _, _, label in info["layout"]] == [delta.HEADER_LABEL, wire.TENSOR_KEY]
    assert f.install().status == "installed"
    f.publish(models["head"])
    r = f.install()
    assert sha(f.device.model_path("net")) == sha(models["head"])
    assert r.fetched_bytes == sum(sizes(models["head"])[k] for k in ("__header__", "fc3.weight#values"))
    with monkeypatch.context() as m:                           # and back: a generic layout after a payload one
        m.setattr(delta, "_payload_ranges", lambda *a: None)
        f.publish(models["all"])
    r = f.install()
    assert sha(f.device.model_path("net")) == sha(models["all"]) and r.fetched_bytes == r.full_bytes


def test_v2_delta_through_an_oci_registry(tmp_path, models):
    pytest.importorskip("oras")
    reg = start_registry_or_skip()
    try:
        f = Fleet(tmp_path, repo=reg.url("fleet/v2"))
        f.publish(models["r1"])
        f.install()
        p = f.publish(models["head"])                  # the registry gets only the new pieces
        s = sizes(models["head"])
        assert p["uploaded_bytes"] == s["__header__"] + s["fc3.weight#values"]
        r = f.install()
        assert r.fetched_bytes == p["uploaded_bytes"] and sha(f.device.model_path("net")) == sha(models["head"])
    finally:
        reg.close()


def test_v1_to_v2_format_switch_installs(tmp_path, models):
    f = Fleet(tmp_path)
    f.publish(models["v1"])
    f.install()
    f.publish(models["head"])
    r = f.install()
    assert r.status == "installed" and sha(f.device.model_path("net")) == sha(models["head"])


# ------------------------------------------------------------------------------------------------ hostile
def refit(path, out, body: bytes) -> str:
    """A file whose safetensors part is exactly the v2 one for ``body`` (so only the body can lie)."""
    with open(out, "wb") as f:
        f.write(wire.outer_header(len(body)) + body)
    return os.fspath(out)


def outcome(path):
    """file_pieces' answer: the pieces (which must tile the file) or a FormatError naming it; nothing else."""
    try:
        pieces = file_pieces(path)
    except FormatError as e:
        assert os.path.basename(path) in str(e)
        return None
    check_tiles(path, pieces)
    return pieces


@pytest.mark.parametrize("how", ["short", "long", "huge-producer", "digest-only"])
def test_lying_v2_bodies_fall_back_to_the_generic_cut(models, tmp_path, how):
    _, body = body_of(models["r1"])
    if how == "short":           # payload lengths run past the end
        body = body[:-100]
    elif how == "long":          # bytes after the last payload
        body = body + bytes(100)
    elif how == "huge-producer":  # the header claims a 1 MiB string in a file far shorter
        body = body[:32] + bytes([0, 0]) + b"\x80\x80\x40" + body[35:]
    else:
        body = bytes(32) + body[32:]
    path = refit(models["r1"], tmp_path / f"{how}.fpk", body)
    pieces = outcome(path)
    if how == "digest-only":     # the cut does not need the digest (the signed full-file hash is the check)
        assert [p.label for p in pieces] == [p.label for p in file_pieces(models["r1"])]
    else:
        assert [(p.offset, p.length, p.label) for p in pieces] == generic(path)


def test_truncated_v2_file_is_a_clean_format_error_and_publish_refuses_it(models, tmp_path):
    data = open(models["r1"], "rb").read()
    path = tmp_path / "cut.fpk"
    path.write_bytes(data[:-100])
    with pytest.raises(FormatError, match="cut.fpk"):
        file_pieces(path)
    with pytest.raises(FormatError, match="cut.fpk"):
        Fleet(tmp_path / "f").publish(path)


def test_mutated_v2_prefix_never_crashes_the_cut(models, tmp_path):
    data = bytearray(open(models["r1"], "rb").read())
    base = 8 + struct.unpack("<Q", data[:8])[0]
    head_end = file_pieces(models["r1"])[0].length
    rng = random.Random(0)
    kinds = {"v2": 0, "generic": 0, "error": 0}
    for i in range(300):
        mutated = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4))):
            mutated[rng.randrange(base + 32, head_end)] = rng.randrange(256)
        if i % 3 == 0:       # also lie about the length, with the safetensors part made consistent
            body = bytes(mutated[base:])
            body = body[:len(body) - rng.randrange(1, 4000)] if i % 2 else body + bytes(rng.randrange(1, 64))
            mutated = wire.outer_header(len(body)) + body
        path = tmp_path / "m.fpk"
        path.write_bytes(bytes(mutated))
        pieces = outcome(str(path))
        kinds["error" if pieces is None else "generic" if len(pieces) <= 2 else "v2"] += 1
    assert kinds["v2"] and kinds["generic"]        # both paths were exercised


def test_hostile_installed_file_only_costs_a_bigger_download(fleet, models):
    path = fleet.device.model_path("net")
    _, body = body_of(path)
    os.chmod(path, 0o644)
    refit(path, path, body[:-100])                     # parses as v2 up to lying payload lengths
    fleet.publish(models["head"])
    r = fleet.install()
    assert r.status == "installed" and sha(path) == sha(models["head"]) and api.verify(path)["ok"]
