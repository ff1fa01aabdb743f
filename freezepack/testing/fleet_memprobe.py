"""Peak-memory probe for hostile fleet inputs (run by tests/test_fleet_hostile.py in a fresh interpreter).

``python -m freezepack.testing.fleet_memprobe CASE...`` runs each case against a hostile server in this process and
prints one JSON line per case: the error it ended with, how many bytes the server offered, and the peak RSS growth
during the case (VmHWM after, minus VmRSS before, with the high-water mark reset through
/proc/self/clear_refs and freed memory returned to the OS first, so each case is measured on its own).
"""
from __future__ import annotations

import ctypes
import gc
import json
import sys
import time

from ..errors import FreezepackError
from ..fleet import safejson
from ..fleet.net import NetLimits
from ..fleet.repo import HttpStore
from ..fleet.store import Store
from .fleet import HostileServer, repeat, send_body

GIB = 1 << 30
SHA = "ab" * 32
FAST = NetLimits(connect_timeout=5, read_timeout=5, min_rate=0, rate_window=5)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure(fn) -> tuple[str, int]:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    try:
        fn()
        outcome = "accepted"
    except FreezepackError as e:
        outcome = f"{type(e).__name__}: {e}"[:300]
    peak = _status_kb("VmHWM")
    return outcome, (peak - before) * 1024


# --- hostile HTTP answers: (behaviour, bytes offered) ----------------------------------------------------------
def body_of(total, *, announce=True, chunked=False, status=200, chunk=b" " * 65536):
    def b(h):
        send_body(h, status, repeat(chunk, total), length=total if announce and not chunked else None,
                  chunked=chunked)
    return b


def many_headers(h):
    h.wfile.write(b"HTTP/1.1 200 OK\r\n")
    line = b"X-H: " + b"v" * 100 + b"\r\n"
    for _ in range(1_000_000):      # written as they go: the server itself must not hold 110 MB
        h.wfile.write(line)


def long_header_line(h):
    h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
    for chunk in repeat(b"a" * 65536, GIB):
        h.wfile.write(chunk)


def long_status_line(h):
    h.wfile.write(b"HTTP/1.1 200 ")
    for chunk in repeat(b"a" * 65536, GIB):
        h.wfile.write(chunk)


# --- OCI registry answers ----------------------------------------------------------------------------------------
def oci(manifest_behaviour, blob_behaviour=None):
    def b(h):
        if h.path.startswith("/v2/fleet/") and "/manifests/" in h.path:
            return manifest_behaviour(h)
        if blob_behaviour is not None and "/blobs/" in h.path and h.command == "GET":
            return blob_behaviour(h)
        send_body(h, 404, [b"{}"], length=2)
    return b


def token_bomb(h):
    if h.path.startswith("/token"):
        return send_body(h, 200, repeat(b" " * 65536, GIB), length=GIB)
    send_body(h, 401, [b"{}"], length=2, headers=[
        ("Www-Authenticate", f'Bearer realm="http://{h.headers["Host"]}/token",service="x",scope="y"')])


_MANIFEST_BOMB = b"[" + b",".join([b"{}"] * 349_000) + b"]"    # built before any measurement (it costs 30 MB)


def manifest_bomb_json(h):
    """A 1 MiB manifest (just under the cap) of empty objects: 350k containers."""
    send_body(h, 200, [_MANIFEST_BOMB], length=len(_MANIFEST_BOMB))


HTTP_CASES = {
    "http-metadata-1gib-announced": (body_of(GIB), GIB, lambda s: s.get_metadata("timestamp.json", 16384)),
    "http-metadata-1gib-unannounced": (body_of(GIB, announce=False), GIB,
                                       lambda s: s.get_metadata("timestamp.json", 16384)),
    "http-metadata-endless-chunked": (body_of(None, chunked=True), None,
                                      lambda s: s.get_metadata("5.targets.json", 5_000_000)),
    "http-blob-1gib-for-4kib": (body_of(GIB), GIB, lambda s: s.get_blob(SHA, 4096)),
    "http-error-page-1gib": (body_of(GIB, status=500), GIB, lambda s: s.get_metadata("timestamp.json", 16384)),
    "http-1m-headers": (many_headers, 1_000_000 * 110, lambda s: s.get_metadata("timestamp.json", 16384)),
    "http-1gib-header-line": (long_header_line, GIB, lambda s: s.get_metadata("timestamp.json", 16384)),
    "http-1gib-status-line": (long_status_line, GIB, lambda s: s.get_metadata("timestamp.json", 16384)),
}
OCI_CASES = {
    "oci-manifest-1gib": (oci(body_of(GIB)), GIB, lambda s: s.get_metadata("timestamp.json", 16384)),
    "oci-manifest-endless-chunked": (oci(body_of(None, chunked=True)), None,
                                     lambda s: s.get_metadata("timestamp.json", 16384)),
    "oci-manifest-350k-objects": (oci(manifest_bomb_json), 1 << 20,
                                  lambda s: s.get_metadata("timestamp.json", 16384)),
    "oci-token-1gib": (token_bomb, GIB, lambda s: s.get_metadata("timestamp.json", 16384)),
    "oci-blob-1gib-for-4kib": (oci(body_of(GIB), body_of(GIB)), GIB, lambda s: s.get_blob(SHA, 4096)),
    "oci-blob-endless-for-4kib": (oci(body_of(GIB), body_of(None, chunked=True)), None,
                                  lambda s: s.get_blob(SHA, 4096)),
}


def _json_case(name: str) -> bytes:
    t = safejson.TUF_LIMITS["targets"]
    n = t.max_bytes
    build = {
        "json-deep-5mb": lambda: b"[" * n,
        "json-5mb-empty-objects": lambda: b"[" + b",".join([b"{}"] * (n // 3 - 1)) + b"]",
        "json-5mb-empty-arrays": lambda: b"[" + b",".join([b"[]"] * (n // 3 - 1)) + b"]",
        "json-5mb-floats": lambda: b"[" + b",".join([b"0.5"] * (n // 4 - 1)) + b"]",
        "json-5mb-short-strings": lambda: b"[" + b",".join([b'"ab"'] * (n // 5 - 1)) + b"]",
        "json-5mb-one-int": lambda: b"9" * (n - 1),
        "json-5mb-object-keys": lambda: b"{" + b",".join(b'"%d":0' % i for i in range(n // 12)) + b"}",
        # the largest inputs the limits accept, parsed: what an accepted parse may cost
        "json-at-limits-containers": lambda: b"[" + b",".join([b"{}"] * (t.max_containers - 1)) + b"]",
        "json-at-limits-values": lambda: b"[" + b",".join([b'"abcdef"'] * (t.max_values - 2)) + b"]",
        "json-at-limits-object-keys": lambda: b"{" + b",".join(b'"%d":0' % i for i in range(t.max_values // 2 - 1))
        + b"}",
    }
    return build[name]()


def main(names):
    servers = {}
    for name in names:
        t0 = time.monotonic()
        if name in HTTP_CASES or name in OCI_CASES:
            behaviour, offered, action = (HTTP_CASES | OCI_CASES)[name]
            srv = HostileServer(behaviour)
            servers[name] = srv
            store: Store
            if name in HTTP_CASES:
                store = HttpStore(srv.url, FAST)
            else:
                from ..fleet.oci import OciStore

                store = OciStore(f"oci+http://{srv.host}/fleet/models", FAST)
            try:      # warm-up: lazy imports and connection setup are not the case's cost
                store.has_blob(SHA)
            except FreezepackError:
                pass
            outcome, peak = measure(lambda action=action, store=store: action(store))
            store.close()
            srv.close()
        else:
            data = _json_case(name)
            offered = len(data)
            limits = safejson.TUF_LIMITS["targets"]
            outcome, peak = measure(lambda data=data, name=name, limits=limits: safejson.loads(data, limits, what=name))
            del data
        print(json.dumps({"case": name, "outcome": outcome, "offered": offered, "peak": peak,
                          "seconds": round(time.monotonic() - t0, 2)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
