"""Helpers of the fleet tests: real .fpk releases, a publisher + device pair, static and hostile HTTP servers.

Needs the ``fleet`` extra (and pytest for :func:`start_registry_or_skip`)."""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from typing import Any

import torch

from .. import api
from ..fleet import Device, Publisher, open_store
from ..format.init import make_init
from ..format.record import FreezeRecord, FrozenTensor

SHAPES = {"fc1.weight": (300, 784), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}


def record(*, seed=7, mask_seed=0, value_seed=0, head_seed=None, density=0.05) -> FreezeRecord:
    """A LeNet-300-100-shaped FreezeNet. ``value_seed`` changes every trained value (a fine-tune),
    ``head_seed`` only the last layer's (a head fine-tune), ``mask_seed`` the masks of fc2 (a new SNIP mask)."""
    frozen = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        g = torch.Generator().manual_seed(mask_seed * 1000 + i if name == "fc2.weight" else i)
        mask = torch.rand(shape, generator=g) < density
        vs = value_seed * 1000 + i
        if name == "fc3.weight" and head_seed is not None:
            vs = head_seed * 7919 + 17
        gv = torch.Generator().manual_seed(vs)
        frozen[name] = FrozenTensor(make_init("kaiming_uniform", shape), mask,
                                    torch.randn(int(mask.sum()), generator=gv) * 0.05)
    whole = {"fc1.bias": torch.zeros(300), "fc2.bias": torch.zeros(100), "fc3.bias": torch.zeros(10)}
    return FreezeRecord(seed, frozen=frozen, whole=whole)


def write_fpk(path, rec, version=1) -> str:
    api.save(path, rec, version=version)  # v1: one piece per stored tensor; v2: one per payload (test_fleet_v2)
    return os.fspath(path)


class Fleet:
    """A publisher with its keys and repo, and a device directory, in one temp dir."""

    def __init__(self, base, repo=None, **init_kw):
        self.base = os.fspath(base)
        self.repo = repo or os.path.join(self.base, "repo")
        self.keys = os.path.join(self.base, "keys")
        self.root_file = os.path.join(self.base, "root.json")
        self.store = open_store(self.repo)
        root = Publisher(self.store, self.keys).init(**init_kw)
        with open(self.root_file, "wb") as f:
            f.write(root)
        self.device = Device(os.path.join(self.base, "device"))

    def publisher(self) -> Publisher:
        return Publisher(self.store, self.keys).load()

    def publish(self, path, name="net", **kw) -> dict:
        return self.publisher().publish(path, name, **kw)

    def install(self, name="net", source=None, **kw):
        return self.device.install(source or self.repo, name, root_file=self.root_file, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    served = 0

    def log_message(self, *a):
        pass

    def copyfile(self, source, outputfile):
        n = 0
        while chunk := source.read(1 << 16):
            outputfile.write(chunk)
            n += len(chunk)
        type(self).served += n


class StaticServer:
    """A plain static HTTP server over a directory (what an operator would put in front of the repo)."""

    def __init__(self, directory):
        handler: Any = type("Handler", (_QuietHandler,), {"served": 0})  # its own counter per server
        self.handler = handler
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(handler, directory=os.fspath(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def served(self) -> int:
        return self.handler.served

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Registry:
    """Debian's docker-registry (CNCF Distribution 2.8) on loopback with its own config and temp storage."""

    def __init__(self, binary):
        self.dir = tempfile.mkdtemp(prefix="fpk-registry-")
        self.port = free_port()
        self.storage = os.path.join(self.dir, "storage")
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n"
                    f"  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
                    f"http:\n  addr: 127.0.0.1:{self.port}\n")
        self.log = open(os.path.join(self.dir, "registry.log"), "wb")
        self.proc = subprocess.Popen([binary, "serve", cfg], stdout=self.log, stderr=subprocess.STDOUT)
        self.host = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"docker-registry did not start; log in {self.log.name}")
            time.sleep(0.05)

    def url(self, repo: str) -> str:
        return f"oci+http://{self.host}/{repo}"

    def blob_file(self, sha256: str) -> str:
        return os.path.join(self.storage, "docker", "registry", "v2", "blobs", "sha256", sha256[:2], sha256, "data")

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(0.5)        # it drains connections for seconds; its storage is a temp dir
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_registry_or_skip():
    binary = shutil.which("docker-registry")
    if binary is None:
        msg = "docker-registry (Debian package docker-registry, CNCF Distribution 2.8) is not installed"
        if os.environ.get("FREEZEPACK_REQUIRE_REGISTRY") == "1":
            import pytest

            pytest.fail(msg + " and FREEZEPACK_REQUIRE_REGISTRY=1")
        import pytest

        pytest.skip(msg)
    return Registry(binary)


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass          # a client that hangs up on a hostile answer is the expected outcome


class HostileServer:
    """An HTTP/1.1 server on 127.0.0.1 whose every answer is decided by ``behaviour(handler)`` (a test's
    function): it may send any status, headers and body, trickle them, or stall. Runs in threads."""

    def __init__(self, behaviour):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                try:
                    behaviour(self)
                except (TimeoutError, BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    self.close_connection = True      # the client cut us off: what the tests want

            do_HEAD = do_GET

        self.behaviour = behaviour
        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"http://{self.host}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def send_body(h, status: int, body_chunks, *, length: int | None = None, headers=(), chunked=False):
    """Answer with ``status`` and the given chunks (an iterable, possibly endless); ``length`` is announced as
    Content-Length when given; ``chunked`` uses chunked transfer encoding."""
    h.send_response(status)
    for k, v in headers:
        h.send_header(k, v)
    if chunked:
        h.send_header("Transfer-Encoding", "chunked")
    elif length is not None:
        h.send_header("Content-Length", str(length))
    else:
        h.close_connection = True
        h.send_header("Connection", "close")
    h.end_headers()
    if h.command == "HEAD":
        return
    for chunk in body_chunks:
        if chunked:
            h.wfile.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        else:
            h.wfile.write(chunk)
    if chunked:
        h.wfile.write(b"0\r\n\r\n")


def repeat(chunk: bytes, total: int | None):
    """``total`` bytes (endless when None) made of ``chunk`` repeated: a big body without holding it."""
    sent = 0
    while total is None or sent < total:
        piece = chunk if total is None else chunk[:total - sent]
        sent += len(piece)
        yield piece
