"""Where a fleet repository lives: a plain directory (embedded default), a static HTTP server, or an OCI registry
(``oci``). The interface and the digest checks are in ``store``.

Directory layout (servable as-is by any static HTTP server or object store)::

    repo/metadata/<name>            repo/blobs/sha256/<hex>
"""
from __future__ import annotations

import hashlib
import os

from ..atomic import atomic_write, remove_stale_temps
from ..errors import FleetError
from .names import check_digest, check_meta_name
from .net import DEFAULT_LIMITS, NetLimits, pool_manager, transfer
from .store import Store, read_file_capped, verified_blob  # noqa: F401  (verified_blob: public helper)

_CHUNK = 1 << 16


class DirStore(Store):
    """A plain directory: ``metadata/<name>`` and ``blobs/sha256/<hex>``. Files are written with the umask's
    mode (0644 under umask 022), so another user (the web server) can serve the directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))
        self.location = self.root
        self._cleaned = False

    def _meta(self, name):
        return os.path.join(self.root, "metadata", check_meta_name(name))

    def _blob(self, sha256):
        return os.path.join(self.root, "blobs", "sha256", check_digest(sha256))

    def get_metadata(self, name, max_length):
        return read_file_capped(self._meta(name), max_length, f"metadata file {name}")

    def put_metadata(self, name, data):
        atomic_write(self._meta(name), data, make_parents=True)

    def has_blob(self, sha256):
        return os.path.isfile(self._blob(sha256))

    def put_blob(self, data, *, media_type=""):
        sha = hashlib.sha256(data).hexdigest()
        if not self._cleaned:     # leftovers of a killed publish, once per store (the directory may be large)
            remove_stale_temps(os.path.dirname(self._blob(sha)))
            self._cleaned = True
        if not self.has_blob(sha):
            atomic_write(self._blob(sha), data, fsync=False, clean_stale=False, make_parents=True)
        return sha

    def _blob_chunks(self, sha256, max_length):
        try:
            fd = os.open(self._blob(sha256), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise FleetError(f"repository has no blob sha256:{sha256}", path=self.root) from None
        except OSError as e:
            raise FleetError(f"cannot read blob sha256:{sha256}: {e.strerror}", path=self.root) from None
        with os.fdopen(fd, "rb") as f:
            left = max_length
            while left > 0 and (chunk := f.read(min(_CHUNK, left))):
                left -= len(chunk)
                yield chunk


class HttpStore(Store):
    """A directory repository served by any static HTTP server (read-only: publish into the directory).
    Every request runs under ``limits`` (timeouts, minimum rate) and a byte cap (see ``net``)."""


    def __init__(self, url: str, limits: NetLimits = DEFAULT_LIMITS):
        import urllib3  # a dependency of tuf's client

        self._errors = (urllib3.exceptions.HTTPError, OSError)
        self.base = url.rstrip("/")
        self.location = self.base
        self.limits = limits
        self._http = pool_manager(limits)

    def _chunks(self, url: str, max_length: int, *, missing_ok: bool):
        """Yield the body in chunks (None first when 404/403 and ``missing_ok``)."""
        with transfer(self.limits, max_length, where=url, errors=self._errors):
            r = self._http.request("GET", url, preload_content=False, redirect=True)
            complete = False
            try:
                if r.status in (403, 404):
                    if missing_ok:
                        yield None
                        return
                    raise FleetError(f"repository has no such file (HTTP {r.status})", path=url)
                if r.status != 200:
                    raise FleetError(f"HTTP {r.status}", path=url)
                declared = r.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > max_length:
                    raise FleetError(f"server announces {declared} bytes, more than the limit of {max_length}",
                                     path=url)
                n = 0
                for chunk in r.stream(_CHUNK):
                    n += len(chunk)
                    yield chunk
                    if n >= max_length:
                        return
                complete = True
            finally:
                if not complete:
                    r.close()         # never reuse (or drain) a connection whose body was cut off
                r.release_conn()

    def get_metadata(self, name, max_length):
        url = f"{self.base}/metadata/{check_meta_name(name)}"
        it = self._chunks(url, max_length + 1, missing_ok=True)
        first = next(it, b"")
        if first is None:
            it.close()
            return None
        buf = bytearray(first)
        for chunk in it:
            buf += chunk
        if len(buf) > max_length:
            raise FleetError(f"metadata file is larger than {max_length} bytes", path=url)
        return bytes(buf)

    def has_blob(self, sha256):
        url = f"{self.base}/blobs/sha256/{check_digest(sha256)}"
        with transfer(self.limits, 0, where=url, errors=self._errors):
            r = self._http.request("HEAD", url)
        return r.status == 200

    def _blob_chunks(self, sha256, max_length):
        return self._chunks(f"{self.base}/blobs/sha256/{sha256}", max_length, missing_ok=False)

    def _read_only(self):
        return FleetError("an http:// repository is read-only: publish into its directory, then serve that",
                          path=self.base)

    def put_metadata(self, name, data):
        raise self._read_only()

    def put_blob(self, data, *, media_type=""):
        raise self._read_only()

    def close(self):
        self._http.clear()


def open_store(location: str | os.PathLike, *, limits: NetLimits | None = None) -> Store:
    """``oci://host/repo`` (``oci+http://`` for a plain-HTTP registry), ``http(s)://`` or a directory path.
    ``limits`` (timeouts, minimum rate) apply to the network back ends."""
    loc = os.fspath(location)
    limits = limits or DEFAULT_LIMITS
    if loc.startswith(("oci://", "oci+http://", "oci+https://")):
        from .oci import OciStore

        return OciStore(loc, limits)
    if loc.startswith(("http://", "https://")):
        return HttpStore(loc, limits)
    if loc.startswith("file://"):
        loc = loc[len("file://"):]
    return DirStore(loc)
