"""Network limits for every byte a fleet store reads: connect and read timeouts, a minimum transfer rate, and a
byte cap per request, enforced under the HTTP libraries (urllib3 for ``http(s)://``, requests for oras-py's OCI
client, including its token requests).

Why under them: a read timeout alone does not stop a mirror that trickles one byte per second (each ``recv``
succeeds), and a library reading ``amt`` bytes keeps waiting for all of them, headers included. So each
connection's socket is wrapped: every ``recv`` is counted, and a response whose rate over any ``rate_window``
falls below ``min_rate`` bytes/s, or whose bytes exceed the cap of the request in flight, is cut off at once.
The library wraps that error in its own; ``transfer`` turns it back into a ``FleetError`` that says what
happened. Nothing is retried here: a device retries on its next update cycle.
"""
from __future__ import annotations

import contextlib
import io
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import FleetError


@dataclass(frozen=True)
class NetLimits:
    """Timeouts in seconds; ``min_rate`` in bytes/s, checked over each ``rate_window`` seconds of a response."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    min_rate: float = 1024.0
    rate_window: float = 30.0

    def __post_init__(self):
        for k in ("connect_timeout", "read_timeout", "rate_window"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not 0 < v < 1e6:
                raise FleetError(f"{k} must be a positive number of seconds, not {v!r}")
        if not isinstance(self.min_rate, (int, float)) or not 0 <= self.min_rate < 1e12:
            raise FleetError(f"min_rate must be a number of bytes per second >= 0, not {self.min_rate!r}")


DEFAULT_LIMITS = NetLimits()
HEADER_SLACK = 256 << 10        # status line + headers a response may add to its body's cap
_UNCAPPED = 1 << 62


class _Transfer:
    """One logical request (with its redirects and token requests): byte cap and the reason it was cut off."""

    def __init__(self, limits: NetLimits, cap: int):
        self.limits = limits
        self.cap = cap
        self.received = 0
        self.violation: str | None = None


_current = threading.local()


class _Cut(OSError):
    pass


class _GuardedRaw(io.RawIOBase):
    """The byte source of one HTTP response: enforces the cap and the minimum rate on every ``recv``."""

    def __init__(self, sock, limits: NetLimits):
        self.sock = sock
        self.limits = limits
        self.t0 = time.monotonic()
        self.window_start, self.window_bytes = self.t0, 0

    def readable(self):
        return True

    def close(self):
        # like socket.SocketIO: the socket's real close waits until its last reader is closed (http.client
        # closes the connection while a "will close" response is still being read)
        if not self.closed and hasattr(self.sock, "_decref_socketios"):
            self.sock._decref_socketios()
        super().close()

    def readinto(self, b) -> int:
        tr = getattr(_current, "transfer", None)
        n = self.sock.recv_into(b)
        now = time.monotonic()
        lim = tr.limits if tr is not None else self.limits
        if tr is not None:
            tr.received += n
            if tr.received > tr.cap:
                tr.violation = f"the server sent more than {tr.cap} bytes"
                raise _Cut(tr.violation)
        self.window_bytes += n
        elapsed = now - self.window_start
        if elapsed >= lim.rate_window:
            if self.window_bytes < lim.min_rate * elapsed:
                msg = (f"transfer too slow: {self.window_bytes} bytes in {elapsed:.1f} s, below the minimum "
                       f"rate of {lim.min_rate:g} bytes/s")
                if tr is not None:
                    tr.violation = msg
                raise _Cut(msg)
            self.window_start, self.window_bytes = now, 0
        return n


class _GuardedSocket:
    """A socket whose ``makefile('rb')`` (what http.client reads responses from) is guarded."""

    def __init__(self, sock, limits: NetLimits):
        self._sock = sock
        self._limits = limits

    def makefile(self, mode="r", buffering=None, **kw):
        if "b" not in mode or "w" in mode:
            return self._sock.makefile(mode, buffering, **kw)
        raw = _GuardedRaw(self._sock, self._limits)
        if hasattr(self._sock, "_io_refs"):
            self._sock._io_refs += 1
        return io.BufferedReader(raw, 1 << 16)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _guarded_connection(base: Any, limits):
    class Guarded(base):
        sock: Any

        def connect(self):
            super().connect()
            self.sock = _GuardedSocket(self.sock, limits)
    return Guarded


def pool_manager(limits: NetLimits):
    """A urllib3 PoolManager whose connections are guarded, with the limits' timeouts, no retries."""
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection

    pm = urllib3.PoolManager(retries=urllib3.Retry(total=0, connect=0, read=0, redirect=3, status=0,
                                                   raise_on_redirect=False),
                             timeout=urllib3.Timeout(connect=limits.connect_timeout, read=limits.read_timeout))
    pm.pool_classes_by_scheme = {
        "http": type("GuardedPool", (urllib3.HTTPConnectionPool,),
                     {"ConnectionCls": _guarded_connection(HTTPConnection, limits)}),
        "https": type("GuardedSPool", (urllib3.HTTPSConnectionPool,),
                      {"ConnectionCls": _guarded_connection(HTTPSConnection, limits)}),
    }
    return pm


def guard_session(session, limits: NetLimits) -> None:
    """Mount guarded adapters with default timeouts on a requests session (oras-py's)."""
    from requests.adapters import HTTPAdapter

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *a, **kw):
            super().init_poolmanager(*a, **kw)
            self.poolmanager.pool_classes_by_scheme = pool_manager(limits).pool_classes_by_scheme

        def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
            if timeout is None:
                timeout = (limits.connect_timeout, limits.read_timeout)
            return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)

    for prefix in ("http://", "https://"):
        session.mount(prefix, GuardedAdapter())


@contextlib.contextmanager
def transfer(limits: NetLimits, cap: int | None, *, where: str, errors=()):
    """Run one logical request under ``limits`` and a byte cap (body + ``HEADER_SLACK``). Library errors listed
    in ``errors`` become a ``FleetError`` naming ``where``; a cut-off says why it was cut."""
    tr = _Transfer(limits, _UNCAPPED if cap is None else cap + HEADER_SLACK)
    outer = getattr(_current, "transfer", None)
    _current.transfer = tr
    try:
        yield tr
    except FleetError:
        raise
    except (_Cut, *errors) as e:
        if tr.violation:
            raise FleetError(tr.violation, path=where) from None
        raise FleetError(f"network error: {_reason(e)}", path=where) from None
    finally:
        _current.transfer = outer


def _reason(e: BaseException) -> str:
    """The innermost useful message of a wrapped urllib3/requests error."""
    seen = e
    for _ in range(6):
        nxt = getattr(seen, "reason", None) or seen.__cause__ or (seen.args[0] if seen.args else None)
        if not isinstance(nxt, BaseException):
            break
        seen = nxt
    text = str(seen) or type(seen).__name__
    return text if seen is e else f"{text} ({type(e).__name__})"


def read_capped(chunks, cap: int, *, what: str, where: str) -> bytes:
    """Join ``chunks`` but refuse more than ``cap`` bytes (before holding more than cap + one chunk)."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        if len(buf) > cap:
            raise FleetError(f"{what}: the server sent more than {cap} bytes", path=where)
    return bytes(buf)
