"""Fleet distribution over the directory and static-HTTP back ends: installs, deltas, resume, trust attacks, CLI."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import timedelta

import pytest

pytest.importorskip("tuf")

from click.testing import CliRunner  # noqa: E402

from freezepack.cli import cli  # noqa: E402
from freezepack.errors import FleetError, FormatError, IntegrityError  # noqa: E402
from freezepack.fleet import Device, Publisher, file_pieces, open_store  # noqa: E402
from freezepack.fleet.repo import DirStore  # noqa: E402
from freezepack.testing.fleet import Fleet, StaticServer, record, write_fpk  # noqa: E402


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "v1": write_fpk(d / "v1.fpk", record()),
        "v2": write_fpk(d / "v2.fpk", record(value_seed=1)),      # every trained value changed
        "head": write_fpk(d / "head.fpk", record(head_seed=1)),   # only the last layer fine-tuned
        "mask": write_fpk(d / "mask.fpk", record(mask_seed=1)),   # fc2 got a new mask (and values)
    }


@pytest.fixture
def fleet(tmp_path, models):
    f = Fleet(tmp_path)
    f.publish(models["v1"])
    r = f.install()
    assert r.status == "installed" and r.release == 1
    return f


def pieces_by_label(path):
    out = {}
    for p in file_pieces(path):
        out[p.label] = out.get(p.label, 0) + p.length
    return out


# ------------------------------------------------------------------------------------------------ installs
def test_install_then_values_only_update_fetches_only_values_and_header(fleet, models):
    dev = fleet.device
    assert sha(dev.model_path("net")) == sha(models["v1"])
    fleet.publish(models["v2"])
    r = fleet.install()
    assert (r.status, r.release, r.previous_release) == ("installed", 2, 1)
    assert sha(dev.model_path("net")) == sha(models["v2"])
    assert sha(dev.prev_path("net")) == sha(models["v1"])             # kept for rollback
    sizes = pieces_by_label(models["v2"])
    values = sum(n for k, n in sizes.items() if k.endswith("#values"))
    assert r.fetched_bytes == values + sizes["__header__"]          # masks and biases were reused
    assert r.fetched_bytes + r.reused_bytes == r.full_bytes == os.path.getsize(models["v2"])
    assert dev.status("net")["release"] == 2


def test_head_fine_tune_transfers_a_small_fraction(fleet, models):
    fleet.publish(models["head"])
    r = fleet.install()
    sizes = pieces_by_label(models["head"])
    assert r.fetched_bytes == sizes["fc3.weight#values"] + sizes["__header__"]
    assert r.fetched_bytes < 0.1 * r.full_bytes
    assert sha(fleet.device.model_path("net")) == sha(models["head"])


def test_mask_change_fetches_only_changed_tensors(fleet, models):
    fleet.publish(models["mask"])
    r = fleet.install()
    new = {p.label: p.sha256 for p in file_pieces(models["mask"])}
    old = {p.label: p.sha256 for p in file_pieces(models["v1"])}
    changed = {k for k in new if new[k] != old.get(k)}
    assert changed == {"__header__", "fc2.weight#mask", "fc2.weight#values"}
    sizes = pieces_by_label(models["mask"])
    assert r.fetched_bytes == sum(sizes[k] for k in changed)
    assert sha(fleet.device.model_path("net")) == sha(models["mask"])


def test_up_to_date_install_transfers_no_model_bytes(fleet):
    r = fleet.install()
    assert r.status == "up-to-date" and r.fetched_bytes == 0 and r.release == 1


def test_pull_then_install_and_rollback(fleet, models):
    fleet.publish(models["v2"])
    pulled = fleet.install(download_only=True)
    assert pulled.status == "pulled" and pulled.fetched_bytes > 0
    assert sha(fleet.device.model_path("net")) == sha(models["v1"])   # not installed yet
    r = fleet.install()
    assert r.status == "installed" and r.fetched_bytes == 0
    back = fleet.device.rollback("net")
    assert (back["release"], back["was"]) == (1, 2)
    assert sha(fleet.device.model_path("net")) == sha(models["v1"])
    assert sha(fleet.device.prev_path("net")) == sha(models["v2"])


class FlakyStore(DirStore):
    """A directory store whose connection drops after ``budget`` blobs."""

    def __init__(self, root, budget):
        super().__init__(root)
        self.budget = budget
        self.fetched = []

    def _blob_chunks(self, sha256, max_length):
        if self.budget == 0:
            raise FleetError("connection reset", path=self.root)
        self.budget -= 1
        self.fetched.append(sha256)
        return super()._blob_chunks(sha256, max_length)


def test_interrupted_download_resumes_without_refetching(tmp_path, models):
    f = Fleet(tmp_path)
    f.publish(models["v1"])
    flaky = FlakyStore(f.repo, budget=3)
    with pytest.raises(FleetError, match="connection reset"):
        f.device.install(flaky, "net", root_file=f.root_file)
    assert not os.path.exists(f.device.model_path("net"))
    again = FlakyStore(f.repo, budget=100)
    r = f.device.install(again, "net")
    assert set(again.fetched).isdisjoint(flaky.fetched)                # the first 3 pieces were kept
    assert r.reused_bytes > 0 and r.fetched_bytes + r.reused_bytes == r.full_bytes
    assert sha(f.device.model_path("net")) == sha(models["v1"])


def test_damaged_staged_piece_is_fetched_again(tmp_path, models):
    f = Fleet(tmp_path)
    f.publish(models["v1"])
    f.install(download_only=True)
    stage = f.device.staging("net")
    victim = os.path.join(stage, sorted(os.listdir(stage))[0])
    with open(victim, "r+b") as fh:
        fh.write(b"\xff\xff\xff\xff")
    f.install()
    assert sha(f.device.model_path("net")) == sha(models["v1"])


def test_http_back_end_end_to_end(tmp_path, models):
    f = Fleet(tmp_path)
    server = StaticServer(f.repo)
    try:
        f.publish(models["v1"])
        r1 = f.install(source=server.url)
        assert r1.release == 1 and sha(f.device.model_path("net")) == sha(models["v1"])
        f.publish(models["head"])
        before = server.served
        r2 = f.install(source=server.url)
        assert r2.release == 2 and sha(f.device.model_path("net")) == sha(models["head"])
        # bytes the server actually sent: the delta plus the small signed metadata, far below the full file
        assert server.served - before == r2.fetched_bytes + r2.metadata_bytes
        assert r2.fetched_bytes < 0.1 * r2.full_bytes
        with pytest.raises(FleetError, match="read-only"):
            Publisher(open_store(server.url), f.keys).load().publish(models["v2"], "net")
    finally:
        server.close()


def test_non_safetensors_file_is_refused_by_publish(tmp_path):
    f = Fleet(tmp_path)
    bad = tmp_path / "bad.fpk"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(FormatError, match="bad.fpk"):
        f.publish(bad)


def test_publisher_refuses_older_release_number(fleet, models):
    with pytest.raises(FleetError, match="not newer"):
        fleet.publish(models["v2"], release=1)


# ------------------------------------------------------------------------------------------------ attacks
def _meta(f, name):
    return os.path.join(f.repo, "metadata", name)


def _latest(f, role):
    ts = json.load(open(_meta(f, "timestamp.json")))["signed"]
    sv = ts["meta"]["snapshot.json"]["version"]
    if role == "snapshot":
        return f"{sv}.snapshot.json"
    snap = json.load(open(_meta(f, f"{sv}.snapshot.json")))["signed"]
    return f"{snap['meta']['targets.json']['version']}.targets.json"


def test_tampered_blob_is_rejected_and_old_release_kept(fleet, models):
    fleet.publish(models["v2"])
    new = {p.sha256 for p in file_pieces(models["v2"])} - {p.sha256 for p in file_pieces(models["v1"])}
    victim = os.path.join(fleet.repo, "blobs", "sha256", sorted(new)[0])
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 1
    open(victim, "wb").write(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its digest"):
        fleet.install()
    assert sha(fleet.device.model_path("net")) == sha(models["v1"])


def test_substituted_blob_from_another_release_is_rejected(fleet, models):
    fleet.publish(models["v2"])
    old = {p.label: p.sha256 for p in file_pieces(models["v1"])}
    new = {p.label: p.sha256 for p in file_pieces(models["v2"])}
    blobs = os.path.join(fleet.repo, "blobs", "sha256")
    # serve v1's values under v2's digest (a mix-and-match of pieces): caught by the piece digest
    shutil.copy(os.path.join(blobs, old["fc1.weight#values"]), os.path.join(blobs, new["fc1.weight#values"]))
    with pytest.raises(IntegrityError):
        fleet.install()
    assert sha(fleet.device.model_path("net")) == sha(models["v1"])


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_tampered_metadata_is_rejected(fleet, models, role):
    fleet.publish(models["v2"])
    path = _meta(fleet, "timestamp.json" if role == "timestamp" else _latest(fleet, role))
    md = json.load(open(path))
    md["signed"]["expires"] = "2099-01-01T00:00:00Z"          # any edit breaks the signature
    json.dump(md, open(path, "w"))
    with pytest.raises(FleetError, match="signature check failed"):
        fleet.install()
    assert sha(fleet.device.model_path("net")) == sha(models["v1"])


def test_replayed_old_metadata_is_rejected_as_rollback(fleet, models):
    old_ts = open(_meta(fleet, "timestamp.json"), "rb").read()
    fleet.publish(models["v2"])
    assert fleet.install().release == 2
    open(_meta(fleet, "timestamp.json"), "wb").write(old_ts)   # attacker serves the v1-era metadata
    with pytest.raises(FleetError, match="rollback"):
        fleet.install()
    assert sha(fleet.device.model_path("net")) == sha(models["v2"])


def test_mixed_targets_from_another_release_is_rejected(fleet, models):
    old_targets = open(_meta(fleet, _latest(fleet, "targets")), "rb").read()
    fleet.publish(models["v2"])
    # the current snapshot names targets version N; serve the (validly signed) version N-1 in its place
    open(_meta(fleet, _latest(fleet, "targets")), "wb").write(old_targets)
    with pytest.raises(FleetError, match="version|rollback"):
        fleet.install()
    assert sha(fleet.device.model_path("net")) == sha(models["v1"])


def test_expired_timestamp_is_rejected_as_freeze(fleet, models):
    fleet.publish(models["v2"])
    fleet.publisher().refresh_timestamp(expiry={"timestamp": timedelta(seconds=-60)})
    with pytest.raises(FleetError, match="expired.*freeze"):
        fleet.install()
    fleet.publisher().refresh_timestamp()     # the operator's cron job re-signs: devices update again
    assert fleet.install().release == 2


def test_wrong_signer_is_rejected_even_with_stolen_online_keys(fleet, models, tmp_path):
    """The attacker holds the online snapshot + timestamp keys but not the targets key: a release signed
    with their own key is refused."""
    from freezepack.fleet.trust import KeyRing

    evil = str(tmp_path / "evil-keys")
    shutil.copytree(fleet.keys, evil)
    for p in os.listdir(evil):
        if p.startswith("targets-"):
            os.unlink(os.path.join(evil, p))
    attacker_key = KeyRing(evil).create("targets")
    pub = Publisher(fleet.store, evil).load()
    pub._sign = _sign_with_extra(pub, attacker_key)
    pub.publish(models["v2"], "net")
    with pytest.raises(FleetError, match="signature check failed"):
        fleet.install()
    assert sha(fleet.device.model_path("net")) == sha(models["v1"])


def _sign_with_extra(pub, key):
    original = pub._sign

    def sign(md, role, extra_roots=()):
        if role == "targets":
            md.signatures.clear()
            md.sign(key)
        else:
            original(md, role, extra_roots)
    return sign


def test_threshold_two_needs_both_signatures(tmp_path, models):
    f = Fleet(tmp_path, thresholds={"targets": 2})
    assert len([p for p in os.listdir(f.keys) if p.startswith("targets-")]) == 2
    f.publish(models["v1"])
    assert f.install().release == 1
    f.publish(models["head"])
    path = _meta(f, _latest(f, "targets"))
    md = json.load(open(path))
    assert len(md["signatures"]) == 2
    md["signatures"] = md["signatures"][:1]                    # one valid signature is below threshold
    json.dump(md, open(path, "w"))
    with pytest.raises(FleetError, match="signature check failed"):
        f.install()
    one_key = str(tmp_path / "one-key")
    shutil.copytree(f.keys, one_key)
    os.unlink(os.path.join(one_key, sorted(p for p in os.listdir(one_key) if p.startswith("targets-"))[0]))
    with pytest.raises(FleetError, match="needs 2 signature"):
        Publisher(f.store, one_key).load().publish(models["v2"], "net")


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets", "root"])
def test_key_rotation_is_followed_and_revoked_key_is_refused(fleet, models, role, tmp_path):
    old_keys = str(tmp_path / "old-keys")
    shutil.copytree(fleet.keys, old_keys)
    info = fleet.publisher().rotate(role, revoke=list(fleet.publisher().root.signed.roles[role].keyids))
    assert info["root_version"] == 2 and len(info["added"]) == 1
    fleet.publish(models["v2"])
    assert fleet.install().release == 2                        # the device walked the root chain
    assert json.load(open(os.path.join(fleet.device.tuf_dir, "root.json")))["signed"]["version"] == 2
    if role == "root":
        return
    # an attacker holding the revoked key re-signs the role: refused
    from securesystemslib.signer import CryptoSigner  # noqa: F401

    from freezepack.fleet.trust import KeyRing

    revoked = [s for k, s in KeyRing(old_keys).signers().items() if k in info["revoked"]]
    pub = fleet.publisher()
    original = pub._sign

    def sign(md, r, extra_roots=()):
        if r == role:
            md.signatures.clear()
            md.sign(revoked[0])
        else:
            original(md, r, extra_roots)
    pub._sign = sign
    pub.publish(models["head"], "net")
    with pytest.raises(FleetError, match="signature check failed"):
        fleet.install()
    assert sha(fleet.device.model_path("net")) == sha(models["v2"])


def test_first_install_needs_a_pinned_root(tmp_path, models):
    f = Fleet(tmp_path)
    f.publish(models["v1"])
    with pytest.raises(FleetError, match="no trusted root pinned"):
        Device(tmp_path / "other").install(f.repo, "net")
    other = Fleet(tmp_path / "other-operator")                 # a root from a different repository
    with pytest.raises(FleetError, match="signature check failed"):
        Device(tmp_path / "d2").install(f.repo, "net", root_file=other.root_file)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_round_trip(tmp_path, models):
    run = CliRunner().invoke
    repo, keys, root, dev = (str(tmp_path / n) for n in ("repo", "keys", "root.json", "dev"))
    r = run(cli, ["fleet", "init", repo, "--keys", keys, "--root-out", root, "--expires", "timestamp=2"])
    assert r.exit_code == 0, r.output
    r = run(cli, ["fleet", "publish", repo, models["v1"], "--name", "lenet", "--keys", keys, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["release"] == 1
    r = run(cli, ["fleet", "install", repo, "lenet", "--dir", dev, "--root", root, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["status"] == "installed"
    assert run(cli, ["fleet", "publish", repo, models["head"], "--name", "lenet", "--keys", keys]).exit_code == 0
    r = run(cli, ["fleet", "install", repo, "lenet", "--dir", dev])
    assert r.exit_code == 0 and "installed lenet release 2" in r.output and "% of the full file" in r.output
    r = run(cli, ["fleet", "status", "lenet", "--dir", dev, "--json"])
    st = json.loads(r.output)
    assert (st["release"], st["previous_release"]) == (2, 1)
    r = run(cli, ["fleet", "keys", "rotate", repo, "--keys", keys, "--role", "timestamp"])
    assert r.exit_code == 0 and "root version 2" in r.output
    r = run(cli, ["fleet", "timestamp", repo, "--keys", keys, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["timestamp_version"] > 1
    r = run(cli, ["fleet", "timestamp", repo, "--keys", keys, "--snapshot", "--targets"])
    assert r.exit_code == 0, r.output
    r = run(cli, ["fleet", "keys", "renew", repo, "--keys", keys, "--expires", "root=30"])
    assert r.exit_code == 0 and "root version 3" in r.output
    r = run(cli, ["fleet", "keys", "revoke", repo, "nosuchkey", "--keys", keys, "--role", "snapshot"])
    assert r.exit_code == 1 and "matches 0 keys" in r.output
    r = run(cli, ["fleet", "keys", "list", repo, "--json"])
    assert json.loads(r.output)["models"]["lenet"]["release"] == 2
    assert run(cli, ["fleet", "install", repo, "lenet", "--dir", dev]).exit_code == 0
    r = run(cli, ["fleet", "rollback", "lenet", "--dir", dev])
    assert r.exit_code == 0 and "release 1 is installed again" in r.output


def test_cli_errors_are_one_clear_line(tmp_path, models):
    run = CliRunner().invoke
    r = run(cli, ["fleet", "install", str(tmp_path / "nowhere"), "lenet", "--dir", str(tmp_path / "d")])
    assert r.exit_code == 1 and "no trusted root pinned" in r.output and "Traceback" not in r.output
    r = run(cli, ["fleet", "publish", str(tmp_path / "nowhere"), models["v1"], "--name", "x",
                  "--keys", str(tmp_path / "k")])
    assert r.exit_code == 1 and "fleet init" in r.output
    r = run(cli, ["fleet", "init", str(tmp_path / "r"), "--keys", str(tmp_path / "k"), "--root-out",
                  str(tmp_path / "root.json"), "--threshold", "boss=2"])
    assert r.exit_code == 2 and "ROLE=VALUE" in r.output
    r = run(cli, ["fleet", "status", "Bad Name", "--dir", str(tmp_path)])
    assert r.exit_code == 1 and "model name" in r.output


def test_concurrent_install_on_one_device_is_refused(fleet, models):
    import fcntl

    fleet.publish(models["v2"])
    fd = os.open(os.path.join(fleet.device.meta, "lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(FleetError, match="another install is running"):
            fleet.install()
    finally:
        os.close(fd)
    assert fleet.install().release == 2


# ------------------------------------------------------------------------------------------------ pieces
def test_pieces_cover_the_file_and_split_large_tensors(tmp_path):
    import struct

    import torch
    from safetensors.torch import save_file

    from freezepack.fleet.delta import MAX_PIECE

    path = str(tmp_path / "dense.safetensors")
    save_file({"big": torch.arange(2_500_000, dtype=torch.float32), "small": torch.ones(3)}, path)
    pieces = file_pieces(path)
    data = open(path, "rb").read()
    assert b"".join(data[p.offset:p.offset + p.length] for p in pieces) == data      # exact cover, in order
    assert all(hashlib.sha256(data[p.offset:p.offset + p.length]).hexdigest() == p.sha256 for p in pieces)
    assert pieces[0].label == "__header__" and pieces[0].length == 8 + struct.unpack("<Q", data[:8])[0]
    big = [p for p in pieces if p.label == "big"]
    assert len(big) == 3 and max(p.length for p in big) == MAX_PIECE


@pytest.mark.parametrize("header, why", [
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, "bad data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 8]}}, "overlap"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}}, "bad data_offsets"),
    ([1, 2], "not a JSON object"),
])
def test_malformed_safetensors_layouts_are_refused(tmp_path, header, why):
    import struct

    text = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    with pytest.raises(FormatError, match=why) as e:
        file_pieces(path)
    assert "bad.safetensors" in str(e.value)


def test_truncated_header_is_refused(tmp_path):
    path = tmp_path / "short.fpk"
    path.write_bytes((10_000).to_bytes(8, "little") + b"{}")
    with pytest.raises(FormatError, match="does not fit"):
        file_pieces(path)


_FLEET_FSIZE = r"""
import resource, sys
from click.testing import CliRunner
from freezepack.cli import cli
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), int(sys.argv[4])))  # Python ignores SIGXFSZ: EFBIG
r = CliRunner().invoke(cli, ["fleet", "install", sys.argv[1], "net", "--dir", sys.argv[2], "--root", sys.argv[3]])
print(r.exit_code, r.output)
"""


@pytest.mark.parametrize("limit, what", [(2048, "a downloaded piece"), (56000, "the new release")])
def test_install_on_a_full_disk_names_the_file(tmp_path, models, limit, what):
    """EFBIG (here: ulimit -f in a subprocess) while fetching a piece or assembling the file: one line naming
    the file, not 'error: : File too large'."""
    import subprocess
    import sys

    f = Fleet(tmp_path)
    f.publish(models["v1"])
    device = tmp_path / "dev"
    r = subprocess.run([sys.executable, "-c", _FLEET_FSIZE, f.repo, str(device), f.root_file, str(limit)],
                       capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr
    code, output = r.stdout.split(" ", 1)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == "1" and len(errors) == 1, r.stdout
    assert errors[0].startswith(f"error: {device}{os.sep}") and f"cannot write {what}: File too large" in errors[0]
    assert "Traceback" not in r.stdout
    assert not (device / "net.fpk").exists()
