"""Crash-safe file writes, shared by the container, the CLI and the fleet: a reader sees the old file or the new
one, never a torn one. Temp file in the target directory (so ``os.replace`` is a same-filesystem rename), fsync,
``os.replace``, then fsync the directory so the rename itself survives a power cut.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable; a no-op where directories cannot be opened (e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data: bytes | Iterable[bytes], *, fsync: bool = True, validate=None,
                 make_parents: bool = True) -> None:
    """Write ``data`` (bytes, or an iterable of byte chunks) to ``path`` atomically.

    ``fsync=False`` skips the flushes for content-addressed scratch files whose readers re-check them anyway.
    ``validate(tmp_path)`` is called on the complete temp file before the rename (a writer proves what it
    publishes); if it raises, the temp file is removed and ``path`` is untouched.
    ``make_parents``: create missing parent directories (else a missing one is an OSError from the temp file).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if make_parents:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
                f.write(chunk)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if validate is not None:
            validate(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(directory)
