"""Fleet against hostile input: a device directory with planted symlinks, hostile servers (allocation bombs,
trickling and stalling mirrors), names with trailing newlines, file modes, temp files left by SIGKILL."""
from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import time

import pytest

pytest.importorskip("tuf")

from click.testing import CliRunner  # noqa: E402

from freezepack import api  # noqa: E402
from freezepack.atomic import STALE_TEMP_AGE, atomic_write  # noqa: E402
from freezepack.cli import cli  # noqa: E402
from freezepack.errors import FleetError  # noqa: E402
from freezepack.fleet import Device, NetLimits  # noqa: E402
from freezepack.fleet.names import check_digest, check_meta_name, check_model_name  # noqa: E402
from freezepack.fleet.net import HEADER_SLACK  # noqa: E402
from freezepack.fleet.repo import HttpStore  # noqa: E402
from freezepack.testing.fleet import (  # noqa: E402
    Fleet,
    HostileServer,
    StaticServer,
    record,
    repeat,
    send_body,
    write_fpk,
)

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1 << 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-models")
    return {"v1": write_fpk(d / "v1.fpk", record()), "v2": write_fpk(d / "v2.fpk", record(value_seed=1))}


@pytest.fixture
def fleet(tmp_path, models):
    f = Fleet(tmp_path)
    f.publish(models["v1"])
    return f


def victim_dir(tmp_path):
    """A directory outside the device holding files an install must never touch."""
    v = tmp_path / "victim"
    v.mkdir()
    for i in range(3):
        (v / f"precious-{i}").write_bytes(b"keep me %d" % i)
    (v / ("ab" * 32)).write_bytes(b"looks like a piece")
    return v


def assert_untouched(v):
    assert sorted(os.listdir(v)) == sorted(["precious-0", "precious-1", "precious-2", "ab" * 32])
    assert (v / "precious-0").read_bytes() == b"keep me 0"


# ------------------------------------------------------------------------------------------------ symlinks
def test_symlinked_staging_dir_is_refused_and_its_target_kept(fleet, models, tmp_path):
    v = victim_dir(tmp_path)
    stage = fleet.device.staging("net")
    os.makedirs(os.path.dirname(stage))
    os.symlink(v, stage)
    with pytest.raises(FleetError, match="symlink"):
        fleet.install()
    assert_untouched(v)
    assert not os.path.exists(fleet.device.model_path("net"))


@pytest.mark.parametrize("where", [".fleet", ".fleet/staging"])
def test_symlinked_fleet_directories_are_refused(fleet, tmp_path, where):
    v = victim_dir(tmp_path)
    path = os.path.join(fleet.device.dir, where)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(v, path)
    with pytest.raises(FleetError, match="symlink"):
        fleet.install()
    assert_untouched(v)


def test_symlinked_lock_does_not_create_its_target(fleet, tmp_path):
    target = tmp_path / "created-by-lock"
    os.makedirs(fleet.device.meta)
    os.symlink(target, os.path.join(fleet.device.meta, "lock"))
    with pytest.raises(FleetError, match="symlink"):
        fleet.install()
    assert not target.exists()


def test_symlinked_tuf_dir_gets_no_metadata(fleet, tmp_path):
    v = victim_dir(tmp_path)
    os.makedirs(fleet.device.meta)
    os.symlink(v, fleet.device.tuf_dir)
    with pytest.raises(FleetError, match="symlink"):
        fleet.install()
    assert_untouched(v)


def test_symlinked_trusted_root_is_refused(fleet, tmp_path):
    fleet.install()
    other = Fleet(tmp_path / "evil")            # an attacker's own root
    root = os.path.join(fleet.device.tuf_dir, "root.json")
    os.unlink(root)
    os.symlink(other.root_file, root)
    with pytest.raises(FleetError, match="symlink"):
        fleet.install()


def test_symlinked_state_file_is_refused(fleet, tmp_path):
    fleet.install()
    target = tmp_path / "outside-state.json"
    target.write_text('{"models": {}}')
    os.unlink(fleet.device.state_path)
    os.symlink(target, fleet.device.state_path)
    with pytest.raises(FleetError, match="state"):
        fleet.install()
    assert target.read_text() == '{"models": {}}'


@pytest.mark.parametrize("kind", ["dir", "symlink"])
@pytest.mark.parametrize("which", ["model", "prev"])
def test_model_path_that_is_not_a_file_is_a_fleet_error(fleet, tmp_path, kind, which):
    dev = fleet.device
    os.makedirs(dev.dir)
    path = dev.model_path("net") if which == "model" else dev.prev_path("net")
    if kind == "dir":
        os.mkdir(path)
    else:
        outside = tmp_path / "outside.fpk"
        outside.write_bytes(b"x")
        os.symlink(outside, path)
    with pytest.raises(FleetError):
        fleet.install()
    with pytest.raises(FleetError):
        dev.status("net")
    r = CliRunner().invoke(cli, ["fleet", "status", "net", "--dir", dev.dir])
    assert r.exit_code == 1 and "Traceback" not in r.output
    if kind == "symlink":
        assert (tmp_path / "outside.fpk").read_bytes() == b"x"


def test_rollback_takes_the_device_lock(fleet, models):
    fleet.install()
    fleet.publish(models["v2"])
    fleet.install()
    fd = os.open(os.path.join(fleet.device.meta, "lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(FleetError, match="another install is running"):
            fleet.device.rollback("net")
    finally:
        os.close(fd)
    assert fleet.device.rollback("net")["release"] == 1


def test_rollback_without_installed_model_is_a_fleet_error(fleet):
    fleet.install()
    os.link(fleet.device.model_path("net"), fleet.device.prev_path("net") + ".x")
    os.replace(fleet.device.prev_path("net") + ".x", fleet.device.prev_path("net"))
    os.unlink(fleet.device.model_path("net"))
    with pytest.raises(FleetError, match="not installed"):
        fleet.device.rollback("net")


# ------------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("bad", ["det\n", "det\r", "Det", "", "a" * 65, "det.prev", "../x", "x/y", None, 7])
def test_model_names_are_matched_in_full(bad):
    with pytest.raises(FleetError, match="model name"):
        check_model_name(bad)


def test_digests_and_metadata_names_are_matched_in_full():
    for bad in ["a" * 64 + "\n", "A" * 64, "a" * 63, "0x" + "a" * 62]:
        with pytest.raises(FleetError):
            check_digest(bad)
    for bad in ["timestamp.json\n", "1.root.json\n", "0.root.json", "x.targets.json", "../timestamp.json"]:
        with pytest.raises(FleetError):
            check_meta_name(bad)
    assert check_meta_name("12.targets.json") == "12.targets.json"


def test_cli_refuses_a_name_with_a_trailing_newline(tmp_path):
    r = CliRunner().invoke(cli, ["fleet", "status", "det\n", "--dir", str(tmp_path)])
    assert r.exit_code == 1 and "model name" in r.output


# ------------------------------------------------------------------------------------------------ modes
def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_files_follow_the_umask_and_keys_stay_private(tmp_path, models):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "plain.bin", b"x")
        assert _mode(tmp_path / "plain.bin") == 0o644
        api.save(tmp_path / "saved.fpk", record())
        assert _mode(tmp_path / "saved.fpk") == 0o644
        atomic_write(tmp_path / "secret.pem", b"k", mode=0o600)
        assert _mode(tmp_path / "secret.pem") == 0o600
        f = Fleet(tmp_path / "pub")
        f.publish(models["v1"])
        f.install()
        repo_files = [os.path.join(d, n) for d, _, ns in os.walk(f.repo) for n in ns]
        assert repo_files and all(_mode(p) == 0o644 for p in repo_files)     # another user can serve it
        keys = os.listdir(f.keys)
        assert keys and all(_mode(os.path.join(f.keys, k)) == 0o600 for k in keys)
        assert _mode(f.device.model_path("net")) == 0o644
        os.umask(0)
        atomic_write(tmp_path / "secret2.pem", b"k", mode=0o600)            # no umask: still owner-only
        assert _mode(tmp_path / "secret2.pem") == 0o600
        os.umask(0o077)
        atomic_write(tmp_path / "tight.bin", b"x")
        assert _mode(tmp_path / "tight.bin") == 0o600                       # a stricter umask is respected
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------ stale temps
def _old(path):
    t = time.time() - STALE_TEMP_AGE - 60
    os.utime(path, (t, t), follow_symlinks=False)


def test_atomic_write_removes_only_its_own_stale_temps(tmp_path):
    v = victim_dir(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    stale = d / ".tmp-0123456789abcdef-m.fpk"
    young = d / ".tmp-fedcba9876543210-m.fpk"
    other_target = d / ".tmp-0123456789abcdef-other.fpk"
    foreign = d / ".tmp-notours-m.fpk"
    link = d / ".tmp-00000000000000aa-m.fpk"
    for p in (stale, young, other_target, foreign):
        p.write_bytes(b"junk")
    os.symlink(v / "precious-0", link)
    for p in (stale, other_target, foreign, link):
        _old(p)
    atomic_write(d / "m.fpk", b"new")
    left = set(os.listdir(d))
    assert stale.name not in left                                   # ours, old: removed
    assert {young.name, other_target.name, foreign.name, link.name, "m.fpk"} == left
    assert_untouched(v)


def test_install_cleans_temps_a_killed_run_left(fleet, tmp_path):
    fleet.install()
    dev = fleet.device
    stage = dev.staging("net")
    os.makedirs(stage, exist_ok=True)
    leftovers = [os.path.join(stage, ".tmp-0123456789abcdef-" + "cd" * 32),
                 os.path.join(dev.meta, ".tmp-0123456789abcdef-state.json"),
                 os.path.join(dev.tuf_dir, "tmpabc_1234")]
    young = os.path.join(stage, ".tmp-1123456789abcdef-" + "cd" * 32)
    for p in leftovers + [young]:
        with open(p, "wb") as f:
            f.write(b"half written")
    for p in leftovers:
        _old(p)
    fleet.publish(record_file := write_fpk(tmp_path / "v3.fpk", record(value_seed=3)))
    assert fleet.install().status == "installed"
    assert not any(os.path.exists(p) for p in leftovers)
    assert os.path.exists(young) or not os.path.exists(stage)       # a young one may be a live writer's
    assert api.verify(dev.model_path("net"))["ok"] and record_file


# ------------------------------------------------------------------------------------------------ slow mirrors
def _trickle_server(fleet, *, delay, chunk=1):
    """Serves the repository, but every byte of a blob body comes ``delay`` s after the previous one."""
    def behaviour(h):
        path = os.path.join(fleet.repo, h.path.lstrip("/"))
        if not os.path.isfile(path):
            return send_body(h, 404, [b"no"], length=2)
        data = open(path, "rb").read()
        if "/blobs/" not in h.path:
            return send_body(h, 200, [data], length=len(data))

        def slow():
            for i in range(0, len(data), chunk):
                time.sleep(delay)
                yield data[i:i + chunk]
        send_body(h, 200, slow(), length=len(data))
    return HostileServer(behaviour)


def test_trickling_mirror_is_cut_off_and_the_lock_released(fleet):
    srv = _trickle_server(fleet, delay=0.02)
    limits = NetLimits(connect_timeout=2, read_timeout=2, min_rate=2000, rate_window=0.5)
    try:
        with pytest.raises(FleetError, match="too slow"):
            fleet.install(source=srv.url, limits=limits)
        # the lock went with the failure: the next install (a good mirror) runs at once
        good = StaticServer(fleet.repo)
        try:
            assert fleet.install(source=good.url).status == "installed"
        finally:
            good.close()
    finally:
        srv.close()


def test_stalled_mirror_hits_the_read_timeout(fleet):
    def stall(h):
        time.sleep(3)
    srv = HostileServer(stall)
    try:
        with pytest.raises(FleetError, match="timed out|timeout"):
            fleet.install(source=srv.url, limits=NetLimits(read_timeout=0.5, rate_window=10))
    finally:
        srv.close()


def test_trickled_headers_are_cut_off_too():
    def headers(h):
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(10_000):
            h.wfile.write(b"X-A: b\r\n")
            h.wfile.flush()
            time.sleep(0.01)
    srv = HostileServer(headers)
    store = HttpStore(srv.url, NetLimits(read_timeout=1, min_rate=10_000, rate_window=0.3))
    try:
        with pytest.raises(FleetError, match="too slow|headers"):
            store.get_metadata("timestamp.json", 16384)
    finally:
        store.close()
        srv.close()


def test_cli_network_options_reach_the_install(fleet):
    srv = _trickle_server(fleet, delay=0.02)
    try:
        r = CliRunner().invoke(cli, ["fleet", "install", srv.url, "net", "--dir", fleet.device.dir, "--root",
                                     fleet.root_file, "--min-rate", "2000", "--rate-window", "0.5",
                                     "--read-timeout", "2", "--connect-timeout", "2"])
        assert r.exit_code == 1 and "too slow" in r.output and "Traceback" not in r.output
        r = CliRunner().invoke(cli, ["fleet", "install", srv.url, "net", "--dir", fleet.device.dir,
                                     "--read-timeout", "-1"])
        assert r.exit_code == 1 and "read_timeout" in r.output
    finally:
        srv.close()


# ------------------------------------------------------------------------------------------------ memory
PROBE_CASES = ["http-metadata-1gib-announced", "http-metadata-1gib-unannounced", "http-metadata-endless-chunked",
               "http-blob-1gib-for-4kib", "http-error-page-1gib", "http-1m-headers", "http-1gib-header-line",
               "http-1gib-status-line", "oci-manifest-1gib", "oci-manifest-endless-chunked",
               "oci-manifest-350k-objects", "oci-token-1gib", "oci-blob-1gib-for-4kib", "oci-blob-endless-for-4kib",
               "json-deep-5mb", "json-5mb-empty-objects", "json-5mb-empty-arrays", "json-5mb-floats",
               "json-5mb-short-strings", "json-5mb-one-int", "json-5mb-object-keys", "json-at-limits-containers",
               "json-at-limits-values", "json-at-limits-object-keys"]


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_hostile_responses_are_refused_within_the_memory_bound():
    """Peak RSS growth while handling each hostile answer <= 2x the bytes the client may read of it + 64 MiB
    (every 1 GiB or endless body is cut at its cap, so that is at most ~2 x 5 MB + 64 MiB)."""
    pytest.importorskip("oras")
    out = subprocess.run([sys.executable, "-m", "freezepack.testing.fleet_memprobe", *PROBE_CASES],
                         capture_output=True, text=True, timeout=240)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == PROBE_CASES, out.stderr[-2000:]
    for r in rows:
        readable = 5_000_000 + HEADER_SLACK if r["offered"] is None else min(r["offered"], 5_000_000 + HEADER_SLACK)
        assert r["peak"] <= 2 * readable + 64 * MIB, r
        if r["case"].startswith("json-at-limits"):
            assert r["outcome"] == "accepted", r        # the limits leave room for real repositories
        else:
            assert r["outcome"].split(":")[0] in ("FleetError", "IntegrityError", "FormatError"), r
    print("\n".join(f"{r['case']:34s} peak {r['peak'] / MIB:6.1f} MiB  {r['outcome'][:90]}" for r in rows))


# ------------------------------------------------------------------------------------------------ TLS
def _self_signed(tmp_path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_https_mirror_installs_and_a_trickling_one_is_cut_off(fleet, tmp_path, monkeypatch):
    """The guarded socket sits on top of TLS too (certificate checked against the test's own CA)."""
    import ssl

    cert, key = _self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    for trickle in (False, True):
        srv = _trickle_server(fleet, delay=0.02, chunk=1) if trickle else _trickle_server(fleet, delay=0, chunk=1 << 20)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        srv.httpd.socket = ctx.wrap_socket(srv.httpd.socket, server_side=True)
        url = srv.url.replace("http://", "https://")
        try:
            if trickle:
                with pytest.raises(FleetError, match="too slow"):
                    Device(tmp_path / "dev2").install(url, "net", root_file=fleet.root_file,
                                                      limits=NetLimits(min_rate=2000, rate_window=0.5))
            else:
                assert fleet.install(source=url).status == "installed"
        finally:
            srv.close()


# ------------------------------------------------------------------------------------------------ crafted metadata
def test_deeply_nested_root_update_is_refused_before_parsing(fleet):
    """A hostile next root version of 100,000 '[': refused by the bounds check (json.loads would raise
    RecursionError from deep inside python-tuf)."""
    with open(os.path.join(fleet.repo, "metadata", "2.root.json"), "wb") as f:
        f.write(b"[" * 100_000)
    with pytest.raises(FleetError, match="nests deeper"):
        fleet.install()


def test_oversized_timestamp_over_http_is_refused_in_a_full_install(fleet):
    def answer(h):
        if h.path.endswith("/timestamp.json"):
            return send_body(h, 200, repeat(b" " * 65536, None), chunked=True)    # endless
        path = os.path.join(fleet.repo, h.path.lstrip("/"))
        data = open(path, "rb").read() if os.path.isfile(path) else b""
        send_body(h, 200 if data else 404, [data], length=len(data))
    srv = HostileServer(answer)
    try:
        with pytest.raises(FleetError, match="larger than 16384"):
            fleet.install(source=srv.url)
    finally:
        srv.close()


def test_hostile_device_state_is_only_advisory(fleet):
    fleet.install()
    with open(fleet.device.state_path, "wb") as f:
        f.write(b'{"models": ' + b"[" * 50_000 + b"}")
    assert fleet.device.status("net")["installed"]
    assert fleet.install().status == "up-to-date"         # the file's own hash is the truth
    for junk in ('{"models": {"net": 5}}', '{"models": {"net": {"current": 7, "previous": []}}}', '[1]', '\xff'):
        with open(fleet.device.state_path, "w") as f:
            f.write(junk)
        assert fleet.install().status == "up-to-date"
        assert fleet.device.status("net")["release"] == 1


def test_publisher_never_signs_metadata_devices_would_refuse(fleet, models, monkeypatch):
    from freezepack.fleet import safejson

    fleet.install()
    meta = os.path.join(fleet.repo, "metadata")
    current = max(os.path.getsize(os.path.join(meta, n)) for n in os.listdir(meta) if n.endswith(".targets.json"))
    # a device limit that fits today's targets file but not one with a second model
    monkeypatch.setitem(safejson.TUF_LIMITS, "targets", safejson.JsonLimits(current + 100))
    with pytest.raises(FleetError, match="too large for devices"):
        fleet.publish(models["v2"], name="second")
    monkeypatch.undo()
    assert fleet.install().status == "up-to-date"            # the repository still serves release 1
