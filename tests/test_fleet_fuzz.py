"""Property tests of every fleet surface that takes outside input: JSON (TUF metadata, manifests, layouts),
TUF metadata files, HTTP responses and headers, OCI manifests and blobs, CLI arguments. Each input must end in
a FreezepackError or a correct result, within bounded time, touching nothing outside the device directory.
(Memory under the largest hostile inputs is measured in test_fleet_hostile.py.)"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

pytest.importorskip("tuf")
hypothesis = pytest.importorskip("hypothesis")

from click.testing import CliRunner  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from freezepack.cli import cli  # noqa: E402
from freezepack.errors import FleetError, FormatError, FreezepackError  # noqa: E402
from freezepack.fleet import NetLimits, safejson  # noqa: E402
from freezepack.fleet.client import trusted_release  # noqa: E402
from freezepack.fleet.delta import MAX_BLOB, layout_from_json  # noqa: E402
from freezepack.fleet.repo import DirStore, HttpStore  # noqa: E402
from freezepack.testing.fleet import Fleet, HostileServer, record, write_fpk  # noqa: E402

FUZZ = settings(max_examples=40, deadline=2000, suppress_health_check=list(HealthCheck))
NET_FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
LIMITS = NetLimits(connect_timeout=2, read_timeout=0.5, min_rate=0, rate_window=5)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=40)


def depth(o) -> int:
    if isinstance(o, (list, dict)):
        vals = list(o.values()) if isinstance(o, dict) else o
        return 1 + max((depth(v) for v in vals), default=0)
    return 0


# ------------------------------------------------------------------------------------------------ JSON
@FUZZ
@given(st.binary(max_size=300))
def test_safejson_on_arbitrary_bytes_is_an_error_or_json(data):
    lim = safejson.JsonLimits(200)
    try:
        got = safejson.loads(data, lim, what="x")
    except FleetError:
        return
    assert got == json.loads(data) or got != got      # (NaN is not equal to itself)


@FUZZ
@given(json_values, st.integers(0, 6), st.booleans(), st.integers(0, 70_000))
def test_safejson_depth_limit_is_exact(value, max_depth, ascii_only, pad):
    text = b" " * pad + json.dumps(value, ensure_ascii=ascii_only).encode()    # pad: strings cross scan windows
    lim = safejson.JsonLimits(1 << 20, max_depth=max_depth, max_containers=10**6, max_values=10**6)
    try:
        assert safejson.loads(text, lim, what="x") == json.loads(text)
        assert depth(value) <= max_depth
    except FleetError as e:
        assert depth(value) > max_depth, e


@FUZZ
@given(json_values)
def test_layout_validation(obj):
    try:
        out = layout_from_json(obj)
    except FormatError:
        return
    assert out and all(len(s) == 64 and 0 <= n <= MAX_BLOB and isinstance(lab, str) for s, n, lab in out)


@FUZZ
@given(st.lists(st.tuples(st.text("0123456789abcdefABCDEF\n x", min_size=60, max_size=66),
                          st.integers(-5, MAX_BLOB + 5), st.text(max_size=3)), min_size=1, max_size=5))
def test_layout_validation_near_valid(items):
    obj = [list(t) for t in items]
    try:
        out = layout_from_json(obj)
    except FormatError:
        return
    for (s, n, _), (s2, n2, _) in zip(obj, out):
        assert s.lower() == s2 and len(s) == 64 and set(s2) <= set("0123456789abcdef") and n == n2


# ------------------------------------------------------------------------------------------------ TUF metadata
@pytest.fixture(scope="module")
def published(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz-repo")
    f = Fleet(base)
    f.publish(write_fpk(base / "v1.fpk", record()))
    expected = trusted_release(f.store, str(base / "probe-tuf"), "net", root_file=f.root_file)
    return f, expected


def _mutate(data: bytes, how: str, pos: int, value) -> bytes:
    if how == "flip":
        i = pos % len(data)
        return data[:i] + bytes([data[i] ^ (1 + pos % 255)]) + data[i + 1:]
    if how == "truncate":
        return data[:pos % len(data)]
    if how == "nest":
        return b"[" * (pos % 5000) + data
    md = json.loads(data)
    signed = md["signed"]
    keys = sorted(signed)
    signed[keys[pos % len(keys)]] = value           # any field replaced by any JSON value
    return json.dumps(md).encode()


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["timestamp", "snapshot", "targets", "root"]),
       st.sampled_from(["flip", "truncate", "nest", "field"]), st.integers(0, 10**6), json_values)
def test_mutated_tuf_metadata_is_refused_or_correct(published, tmp_path_factory, role, how, pos, value):
    f, expected = published
    meta = os.path.join(f.repo, "metadata")
    names = {"timestamp": "timestamp.json", "root": "1.root.json"}
    name = names.get(role) or sorted(n for n in os.listdir(meta) if n.endswith(f".{role}.json"))[-1]
    original = open(os.path.join(meta, name), "rb").read()
    # a hostile root arrives as the next root version (version 1 is the device's pinned file)
    path = os.path.join(meta, "2.root.json" if role == "root" else name)
    work = tmp_path_factory.mktemp("dev")
    device_tuf = os.path.join(work, "device", ".fleet", "tuf")
    try:
        with open(path, "wb") as fh:
            fh.write(_mutate(original, how, pos, value))
        try:
            info = trusted_release(DirStore(f.repo), device_tuf, "net", root_file=f.root_file)
            assert info == expected          # a mutation TUF ignores (e.g. whitespace) changes nothing
        except FreezepackError:
            pass
    finally:
        if role == "root":
            os.unlink(path)
        else:
            with open(path, "wb") as fh:
                fh.write(original)
    # nothing written beside the device directory
    assert sorted(os.listdir(work)) == ["device"]


# ------------------------------------------------------------------------------------------------ HTTP
class Scripted:
    """A server whose next answer is raw bytes chosen by the test (status line, headers, body, all of it)."""

    def __init__(self):
        self.raw = b""
        self.srv = HostileServer(self._answer)

    def _answer(self, h):
        h.close_connection = True
        h.wfile.write(self.raw)
        h.wfile.flush()


@pytest.fixture(scope="module")
def scripted():
    s = Scripted()
    yield s
    s.srv.close()


header_names = st.sampled_from(["Content-Length", "Transfer-Encoding", "Content-Encoding", "Location",
                                "Connection", "X-Junk", "Content-Type", "\x00Bad", "Content-Length "])
header_values = st.sampled_from(["0", "5", "-1", "99999999999999999999", "chunked", "gzip", "deflate", "close",
                                 "http://127.0.0.1:1/", "/metadata/timestamp.json", "", "\r\nX: y", "br"]) \
    | st.text(max_size=12)
responses = st.builds(
    lambda status, headers, body, chunked: (b"HTTP/1.1 %s\r\n" % status.encode("latin-1", "replace")
                                            + b"".join(f"{k}: {v}\r\n".encode("utf-8", "replace") for k, v in headers)
                                            + b"\r\n" + (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
                                                         if chunked else body)),
    st.sampled_from(["200 OK", "404 Not Found", "500 X", "301 Moved", "302 F", "200", "999 Odd", "abc", "",
                     "200 OK\r\nHTTP/1.1 200 OK"]),
    st.lists(st.tuples(header_names, header_values), max_size=6),
    st.binary(max_size=2000), st.booleans())


@NET_FUZZ
@given(responses | st.binary(max_size=500))
def test_any_http_response_is_an_error_or_the_exact_bytes(scripted, raw):
    scripted.raw = raw
    store = HttpStore(scripted.srv.url, LIMITS)
    sha = hashlib.sha256(b"").hexdigest()
    try:
        try:
            data = store.get_metadata("timestamp.json", 1000)
            assert data is None or (isinstance(data, bytes) and len(data) <= 1000)
        except FreezepackError:
            pass
        try:
            assert store.get_blob(sha, 0) == b""       # only an empty body can match this digest
        except FreezepackError:
            pass
    finally:
        store.close()


def test_http_body_is_returned_exactly(scripted):
    body = b'{"signed": 1}'
    scripted.raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    store = HttpStore(scripted.srv.url, LIMITS)
    try:
        assert store.get_metadata("timestamp.json", 1000) == body
    finally:
        store.close()


# ------------------------------------------------------------------------------------------------ OCI
@pytest.fixture(scope="module")
def registry_script():
    pytest.importorskip("oras")
    state = {"manifest": b"{}", "blob": b""}

    def answer(h):
        body = state["manifest"] if "/manifests/" in h.path else state["blob"] if "/blobs/" in h.path else b"{}"
        h.send_response(200 if "/v2/" in h.path else 404)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    srv = HostileServer(answer)
    yield srv, state
    srv.close()


layer = st.fixed_dictionaries({}, optional={
    "digest": st.sampled_from(["sha256:" + hashlib.sha256(b"meta").hexdigest(), "sha256:zz", "md5:00", 5, None,
                               "sha256:" + "a" * 64 + "\n"]),
    "size": st.sampled_from([4, 0, -1, 10**12, "4", True, None, 4.0]),
    "mediaType": st.text(max_size=5)})
manifests = st.one_of(
    st.fixed_dictionaries({"layers": st.lists(layer, max_size=3)}, optional={"schemaVersion": st.integers()}),
    json_values)


@NET_FUZZ
@given(manifests, st.sampled_from([b"meta", b"metaX", b"", b"met"]), st.booleans())
def test_any_oci_manifest_is_an_error_or_the_verified_blob(registry_script, manifest, blob, raw_text):
    from freezepack.fleet.oci import OciStore

    srv, state = registry_script
    state["manifest"] = json.dumps(manifest).encode() if not raw_text else json.dumps(manifest).encode()[:-1]
    state["blob"] = blob
    store = OciStore(f"oci+http://{srv.host}/fleet/models", LIMITS)
    try:
        try:
            data = store.get_metadata("timestamp.json", 1000)
            assert data == b"meta"                   # the only bytes that match any digest offered
        except FreezepackError:
            pass
    finally:
        store.close()


# ------------------------------------------------------------------------------------------------ CLI
cli_words = st.sampled_from(["net", "det\n", "NET", "", "-", "--json", "a" * 70, "x.prev", "../x", "\x00", "1e9",
                             "-1", "nan", "inf", "0"]) | st.text(max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["install", "pull", "status", "rollback"]), cli_words,
       st.lists(st.tuples(st.sampled_from(["--min-rate", "--read-timeout", "--connect-timeout", "--rate-window",
                                           "--root"]), cli_words), max_size=2))
def test_cli_arguments_never_crash(published, tmp_path_factory, command, name, options):
    f, _ = published
    work = tmp_path_factory.mktemp("cli")
    dev = os.path.join(work, "device")
    args = ["fleet", command] + ([f.repo] if command in ("install", "pull") else []) + [name, "--dir", dev]
    for opt, val in options:
        if command in ("install", "pull") or opt == "--root":
            args += [opt, val]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code in (0, 1, 2), (args, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    assert "Traceback" not in r.output
    assert sorted(os.listdir(work)) in ([], ["device"])


# ------------------------------------------------------------------------------------------------ blobs
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=3000), st.sampled_from(["exact", "short", "long", "garbage-status"]))
def test_install_from_a_server_with_hostile_blobs_keeps_the_device_clean(published, tmp_path_factory, body, mode):
    f, expected = published

    def answer(h):
        path = os.path.join(f.repo, h.path.lstrip("/"))
        if "/blobs/" in h.path:
            data = body
            if mode == "garbage-status":
                h.wfile.write(b"HTTP/1.1 2OO OK\r\n\r\n" + data)
                return
            announced = len(data) + (5 if mode == "short" else -1 if mode == "long" and data else 0)
            h.send_response(200)
            h.send_header("Content-Length", str(max(announced, 0)))
            h.end_headers()
            h.wfile.write(data)
            return
        data = open(path, "rb").read() if os.path.isfile(path) else b""
        h.send_response(200 if data else 404)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    srv = HostileServer(answer)
    work = tmp_path_factory.mktemp("blobdev")
    try:
        from freezepack.fleet import Device

        dev = Device(os.path.join(work, "device"))
        with pytest.raises(FreezepackError):
            dev.install(srv.url, "net", root_file=f.root_file, limits=LIMITS)
        assert not os.path.exists(dev.model_path("net"))
        assert sorted(os.listdir(work)) == ["device"]
        leftovers = [n for n in os.listdir(dev.staging("net"))] if os.path.isdir(dev.staging("net")) else []
        assert all(len(n) == 64 for n in leftovers)      # only verified pieces, no half-written temp files
    finally:
        srv.close()
        shutil.rmtree(work, ignore_errors=True)

