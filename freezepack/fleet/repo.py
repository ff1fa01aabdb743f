"""Where a fleet repository lives: a plain directory (embedded default), a static HTTP server, or an OCI registry.

Every back end stores two kinds of things and nothing else:

* **metadata** files by name (``1.root.json``, ``timestamp.json``, ``3.snapshot.json``, ``3.targets.json``), the
  signed TUF metadata; their authenticity is checked by TUF, never by the store;
* **blobs** by SHA-256: the pieces of model files (see ``delta``). A store hands out bytes; the caller checks
  each blob against the digest it asked for (``get_blob`` does it here too, so no back end can skip it).

Directory layout (servable as-is by any static HTTP server or object store)::

    repo/metadata/<name>            repo/blobs/sha256/<hex>
"""
from __future__ import annotations

import hashlib
import os
import re

from ..atomic import atomic_write
from ..errors import FleetError, IntegrityError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_META_NAME = re.compile(r"^(?:[0-9]{1,12}\.)?(?:root|timestamp|snapshot|targets)\.json$")


def check_digest(sha256: str) -> str:
    if not isinstance(sha256, str) or not _HEX64.match(sha256):
        raise FleetError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


def check_meta_name(name: str) -> str:
    if not _META_NAME.match(name):
        raise FleetError(f"not a TUF metadata file name: {name!r}")
    return name


def verified_blob(data: bytes, sha256: str, length: int | None, where: str) -> bytes:
    """Return ``data`` only if it has exactly the expected length and digest."""
    if length is not None and len(data) != length:
        raise IntegrityError(f"blob sha256:{sha256} has {len(data)} bytes, the signed release says {length}",
                             path=where)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise IntegrityError(f"blob content does not match its digest (expected sha256:{sha256}, got "
                             f"sha256:{got}): tampered or corrupted", path=where)
    return data

class Store:
    """Interface of a repository back end. ``location`` names it in messages."""

    location: str = ""
    writable: bool = True

    def get_metadata(self, name: str, max_length: int) -> bytes | None:
        """The metadata file's bytes, or None when the repository does not have it."""
        raise NotImplementedError

    def put_metadata(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def has_blob(self, sha256: str) -> bool:
        raise NotImplementedError

    def put_blob(self, data: bytes, *, media_type: str = "") -> str:
        raise NotImplementedError

    def _get_blob(self, sha256: str, max_length: int) -> bytes:
        raise NotImplementedError

    def get_blob(self, sha256: str, length: int | None = None) -> bytes:
        """The blob's bytes, verified against ``sha256`` (and ``length`` when given)."""
        check_digest(sha256)
        data = self._get_blob(sha256, (length if length is not None else 1 << 40) + 1)
        return verified_blob(data, sha256, length, f"{self.location} blob sha256:{sha256}")

    def publish_release(self, name: str, release: int, layout: list, config: dict) -> None:
        """Hook for back ends that index a release on their own (OCI: a tagged artifact manifest)."""

    def close(self) -> None:
        pass


class DirStore(Store):
    """A plain directory: ``metadata/<name>`` and ``blobs/sha256/<hex>``."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))
        self.location = self.root

    def _meta(self, name):
        return os.path.join(self.root, "metadata", check_meta_name(name))

    def _blob(self, sha256):
        return os.path.join(self.root, "blobs", "sha256", check_digest(sha256))

    def get_metadata(self, name, max_length):
        try:
            with open(self._meta(name), "rb") as f:
                data = f.read(max_length + 1)
        except FileNotFoundError:
            return None
        if len(data) > max_length:
            raise FleetError(f"metadata file is larger than {max_length} bytes", path=self._meta(name))
        return data

    def put_metadata(self, name, data):
        atomic_write(self._meta(name), data)

    def has_blob(self, sha256):
        return os.path.exists(self._blob(sha256))

    def put_blob(self, data, *, media_type=""):
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha):
            atomic_write(self._blob(sha), data, fsync=False)
        return sha

    def _get_blob(self, sha256, max_length):
        try:
            with open(self._blob(sha256), "rb") as f:
                return f.read(max_length)
        except FileNotFoundError:
            raise FleetError(f"repository has no blob sha256:{sha256}", path=self.root) from None


class HttpStore(Store):
    """A directory repository served by any static HTTP server (read-only: publish into the directory)."""

    writable = False

    def __init__(self, url: str):
        import urllib3  # a dependency of tuf's client

        self.base = url.rstrip("/")
        self.location = self.base
        self._http = urllib3.PoolManager(retries=urllib3.Retry(total=3, redirect=2, backoff_factor=0.1),
                                         timeout=urllib3.Timeout(connect=10, read=60))

    def _get(self, url: str, max_length: int) -> bytes | None:
        import urllib3

        try:
            r = self._http.request("GET", url, preload_content=False)
        except urllib3.exceptions.HTTPError as e:
            raise FleetError(f"cannot reach repository: {e}", path=url) from None
        try:
            if r.status in (403, 404):
                return None
            if r.status != 200:
                raise FleetError(f"HTTP {r.status}", path=url)
            buf = bytearray()
            for chunk in r.stream(1 << 16):
                buf += chunk
                if len(buf) > max_length:
                    raise FleetError(f"server sent more than {max_length} bytes", path=url)
            return bytes(buf)
        finally:
            r.release_conn()

    def get_metadata(self, name, max_length):
        return self._get(f"{self.base}/metadata/{check_meta_name(name)}", max_length)

    def has_blob(self, sha256):
        r = self._http.request("HEAD", f"{self.base}/blobs/sha256/{check_digest(sha256)}")
        return r.status == 200

    def _get_blob(self, sha256, max_length):
        url = f"{self.base}/blobs/sha256/{sha256}"
        data = self._get(url, max_length)
        if data is None:
            raise FleetError(f"repository has no blob sha256:{sha256}", path=url)
        return data

    def _read_only(self):
        return FleetError("an http:// repository is read-only: publish into its directory, then serve that",
                          path=self.base)

    def put_metadata(self, name, data):
        raise self._read_only()

    def put_blob(self, data, *, media_type=""):
        raise self._read_only()

    def close(self):
        self._http.clear()


def open_store(location: str | os.PathLike) -> Store:
    """``oci://host/repo`` (``oci+http://`` for a plain-HTTP registry), ``http(s)://`` or a directory path."""
    loc = os.fspath(location)
    if loc.startswith(("oci://", "oci+http://", "oci+https://")):
        from .oci import OciStore

        return OciStore(loc)
    if loc.startswith(("http://", "https://")):
        return HttpStore(loc)
    if loc.startswith("file://"):
        loc = loc[len("file://"):]
    return DirStore(loc)
