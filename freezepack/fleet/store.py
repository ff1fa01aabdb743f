"""The interface every repository back end implements (directory, static HTTP, OCI registry; see ``repo`` and
``oci``), and the digest checks no back end can skip.

A store holds two kinds of things and nothing else:

* **metadata** files by name (``1.root.json``, ``timestamp.json``, ``3.snapshot.json``, ``3.targets.json``), the
  signed TUF metadata; their authenticity is checked by TUF, never by the store;
* **blobs** by SHA-256: the pieces of model files (see ``delta``). A store hands out bytes in chunks; the caller
  checks each blob against the digest it asked for (``get_blob``/``fetch_blob`` do it here).

Bytes from a store are streamed with a cap: a hostile server can make a device read at most the signed length
of a blob (+1 byte to notice more) or a role's metadata limit, never buffer an arbitrary body.
"""
from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator

from ..errors import FleetError, IntegrityError
from .names import check_digest
from .net import DEFAULT_LIMITS, NetLimits


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
    limits: NetLimits = DEFAULT_LIMITS

    def get_metadata(self, name: str, max_length: int) -> bytes | None:
        """The metadata file's bytes (at most ``max_length``, else FleetError), or None when it is missing."""
        raise NotImplementedError

    def put_metadata(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def has_blob(self, sha256: str) -> bool:
        raise NotImplementedError

    def put_blob(self, data: bytes, *, media_type: str = "") -> str:
        raise NotImplementedError

    def _blob_chunks(self, sha256: str, max_length: int) -> Iterator[bytes]:
        """The blob's bytes in chunks; may stop after ``max_length`` bytes (the caller refuses more anyway)."""
        raise NotImplementedError

    def _checked_chunks(self, sha256: str, length: int | None) -> Iterator[bytes]:
        check_digest(sha256)
        where = f"{self.location} blob sha256:{sha256}"
        limit = (length if length is not None else 1 << 40)
        h, n = hashlib.sha256(), 0
        for chunk in self._blob_chunks(sha256, limit + 1):
            n += len(chunk)
            if n > limit:
                raise IntegrityError(f"blob sha256:{sha256} has more than the {limit} bytes the signed release "
                                     f"says", path=where)
            h.update(chunk)
            yield chunk
        if length is not None and n != length:
            raise IntegrityError(f"blob sha256:{sha256} has {n} bytes, the signed release says {length}",
                                 path=where)
        if h.hexdigest() != sha256:
            raise IntegrityError(f"blob content does not match its digest (expected sha256:{sha256}, got "
                                 f"sha256:{h.hexdigest()}): tampered or corrupted", path=where)

    def get_blob(self, sha256: str, length: int | None = None) -> bytes:
        """The blob's bytes, verified against ``sha256`` (and ``length`` when given)."""
        return b"".join(self._checked_chunks(sha256, length))

    def fetch_blob(self, sha256: str, length: int, out) -> None:
        """Stream the blob into the binary file ``out`` (memory stays one chunk), verified; on any error the
        caller discards ``out``."""
        for chunk in self._checked_chunks(sha256, length):
            out.write(chunk)

    def publish_release(self, name: str, release: int, layout: list, config: dict) -> None:
        """Hook for back ends that index a release on their own (OCI: a tagged artifact manifest)."""

    def close(self) -> None:
        pass


def read_file_capped(path: str, max_length: int, what: str) -> bytes | None:
    """A local file's bytes, None when missing, FleetError when larger than ``max_length`` or not a file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FleetError(f"cannot read {what}: {e.strerror}", path=path) from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise FleetError(f"{what} is not a regular file", path=path)
        data = f.read(max_length + 1)
    if len(data) > max_length:
        raise FleetError(f"{what} is larger than {max_length} bytes", path=path)
    return data
