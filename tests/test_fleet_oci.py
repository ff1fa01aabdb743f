"""Fleet distribution through a real OCI registry: Debian's docker-registry (CNCF Distribution 2.8) on loopback.

Skipped when the binary is missing, unless FREEZEPACK_REQUIRE_REGISTRY=1 (the CI), then it fails.
"""
from __future__ import annotations

import hashlib
import json
import urllib.request

import pytest

pytest.importorskip("tuf")
pytest.importorskip("oras")

from freezepack.errors import FleetError, IntegrityError  # noqa: E402
from freezepack.fleet import file_pieces  # noqa: E402
from freezepack.fleet.oci import ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, PIECE_MEDIA_TYPE  # noqa: E402
from freezepack.testing.fleet import Fleet, free_port, record, start_registry_or_skip, write_fpk  # noqa: E402


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="session")
def registry():
    reg = start_registry_or_skip()
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("oci-models")
    return {"v1": write_fpk(d / "v1.fpk", record()),
            "v2": write_fpk(d / "v2.fpk", record(value_seed=1)),
            "head": write_fpk(d / "head.fpk", record(head_seed=1))}


def manifest(registry, repo, tag):
    req = urllib.request.Request(f"http://{registry.host}/v2/{repo}/manifests/{tag}",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def test_registry_end_to_end_with_delta(registry, models, tmp_path):
    f = Fleet(tmp_path, repo=registry.url("fleet/e2e"))
    p1 = f.publish(models["v1"])
    assert p1["uploaded_bytes"] == p1["length"]
    r1 = f.install()
    assert r1.release == 1 and sha(f.device.model_path("net")) == sha(models["v1"])

    p2 = f.publish(models["v2"])                     # values-only: the registry gets only new pieces
    changed = {p.sha256 for p in file_pieces(models["v2"])} - {p.sha256 for p in file_pieces(models["v1"])}
    sizes = {p.sha256: p.length for p in file_pieces(models["v2"])}
    assert p2["uploaded_bytes"] == sum(sizes[s] for s in changed)
    r2 = f.install()
    assert (r2.release, r2.previous_release) == (2, 1)
    assert r2.fetched_bytes == sum(sizes[s] for s in changed) < r2.full_bytes
    assert sha(f.device.model_path("net")) == sha(models["v2"])

    f.publish(models["head"])
    r3 = f.install()
    assert r3.fetched_bytes < 0.1 * r3.full_bytes
    assert sha(f.device.model_path("net")) == sha(models["head"])

    # each release is an OCI artifact with freezepack's own types, its layers the pieces in file order
    m = manifest(registry, "fleet/e2e", "net-r3")
    assert m["artifactType"] == ARTIFACT_TYPE and m["config"]["mediaType"] == CONFIG_MEDIA_TYPE
    assert [layer["digest"] for layer in m["layers"]] == [f"sha256:{p.sha256}" for p in file_pieces(models["head"])]
    assert all(layer["mediaType"] == PIECE_MEDIA_TYPE for layer in m["layers"][1:])
    assert manifest(registry, "fleet/e2e", "timestamp.json")["layers"][0]["size"] > 0


def test_registry_serving_tampered_blob_is_caught(registry, models, tmp_path):
    f = Fleet(tmp_path, repo=registry.url("fleet/tamper"))
    f.publish(models["v1"])
    f.install()
    f.publish(models["v2"])
    new = {p.sha256 for p in file_pieces(models["v2"])} - {p.sha256 for p in file_pieces(models["v1"])}
    victim = max(new, key=lambda s: [p.length for p in file_pieces(models["v2"]) if p.sha256 == s][0])
    path = registry.blob_file(victim)              # a compromised registry edits its storage
    original = open(path, "rb").read()
    data = bytearray(original)
    data[100] ^= 0x40
    open(path, "wb").write(bytes(data))
    try:
        with pytest.raises(IntegrityError, match="does not match its digest"):
            f.install()
        assert sha(f.device.model_path("net")) == sha(models["v1"])
    finally:
        open(path, "wb").write(original)          # blobs are shared by every repository of the registry
    assert f.install().release == 2


def test_registry_metadata_replay_is_rejected(registry, models, tmp_path):
    f = Fleet(tmp_path, repo=registry.url("fleet/replay"))
    f.publish(models["v1"])
    old_timestamp = f.store.get_metadata("timestamp.json", 1 << 20)
    f.publish(models["v2"])
    assert f.install().release == 2
    f.store.put_metadata("timestamp.json", old_timestamp)     # the registry re-tags the old metadata
    with pytest.raises(FleetError, match="rollback"):
        f.install()
    assert sha(f.device.model_path("net")) == sha(models["v2"])


def test_unknown_model_and_unreachable_registry_are_clear_errors(tmp_path, models, registry):
    f = Fleet(tmp_path, repo=registry.url("fleet/gone"))
    f.publish(models["v1"])
    with pytest.raises(FleetError, match="no model 'other'"):
        f.install(name="other")
    dead = f"oci+http://127.0.0.1:{free_port()}/fleet/gone"
    with pytest.raises(FleetError, match="cannot download metadata: network error: .*Connection refused"):
        f.install(source=dead)


def test_cli_publish_and_install_through_the_registry(registry, models, tmp_path):
    from click.testing import CliRunner

    from freezepack.cli import cli

    run = CliRunner().invoke
    repo = registry.url("fleet/cli")
    keys, root, dev = (str(tmp_path / n) for n in ("keys", "root.json", "dev"))
    assert run(cli, ["fleet", "init", repo, "--keys", keys, "--root-out", root]).exit_code == 0
    r = run(cli, ["fleet", "publish", repo, models["v1"], "--name", "lenet", "--keys", keys])
    assert r.exit_code == 0 and "published lenet release 1" in r.output, r.output
    r = run(cli, ["fleet", "install", repo, "lenet", "--dir", dev, "--root", root, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["fetched_bytes"] == json.loads(r.output)["full_bytes"]
    assert run(cli, ["fleet", "publish", repo, models["head"], "--name", "lenet", "--keys", keys]).exit_code == 0
    r = run(cli, ["fleet", "install", repo, "lenet", "--dir", dev, "--json"])
    out = json.loads(r.output)
    assert out["release"] == 2 and out["fetched_bytes"] < 0.1 * out["full_bytes"]
    assert sha(str(tmp_path / "dev" / "lenet.fpk")) == sha(models["head"])
