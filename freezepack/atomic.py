"""Crash-safe file writes, the one ``atomic_write`` of the package (the api, the CLI and the fleet use it): a reader
sees the old file or the new one, never a torn one. Temp file in the target directory (so ``os.replace`` is a
same-filesystem rename), fsync, ``os.replace``, then fsync the directory so the rename itself survives a power cut.

The temp file is created with the final mode (``0o666`` masked by the umask, like ``open()``; ``0o600`` for
secrets), so what other users may read is decided before any byte is written. A SIGKILL between create and
rename leaves a ``.tmp-<random>-<name>`` file; the next write of the same name removes such leftovers once they
are older than ``STALE_TEMP_AGE`` (a younger one may belong to a writer that is still running).
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterable

from .errors import FormatError, FreezepackError

TEMP_PREFIX = ".tmp-"
STALE_TEMP_AGE = 3600.0      # seconds; older temp files of our own pattern are leftovers of a killed writer
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"[0-9a-f]{16}-(.+)", re.DOTALL)


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


def is_own_temp(entry_name: str, target_name: str | None = None) -> bool:
    """True for names ``atomic_write`` makes: ``.tmp-<16 hex>-<target>`` (any target when ``target_name`` is None)."""
    m = _TEMP_NAME.fullmatch(entry_name)
    return m is not None and (target_name is None or m.group(1) == target_name)


def remove_stale_temps(directory: str, target_name: str | None = None, *, max_age: float | None = None,
                       dir_fd: int | None = None) -> list[str]:
    """Delete leftover temp files of ``atomic_write`` in ``directory`` (only our own name pattern, only regular
    files, never through a symlink, only those older than ``max_age``). Returns the names removed."""
    max_age = STALE_TEMP_AGE if max_age is None else max_age
    now = time.time()
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory if dir_fd is None else dir_fd))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for e in entries:
        if not is_own_temp(e.name, target_name):
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < max_age:
                continue
            if dir_fd is None:
                os.unlink(os.path.join(directory, e.name))
            else:
                os.unlink(e.name, dir_fd=dir_fd)
            removed.append(e.name)
        except FileNotFoundError:
            pass                  # another cleaner got there first
    return removed


def atomic_write(path, data: bytes | bytearray | memoryview | Iterable[bytes | memoryview], *, fsync: bool = True,
                 mode: int = 0o666, clean_stale: bool = True, validate: Callable[[str], object] | None = None,
                 make_parents: bool = False) -> None:
    """Write ``data`` (bytes, or an iterable of byte chunks) to ``path`` atomically.

    ``mode`` is the file's permission before the umask, as for ``open()`` (so 0o644 under umask 022); pass
    ``0o600`` for secrets such as private keys (the umask cannot widen it). ``fsync=False`` skips the flushes for
    content-addressed scratch files whose readers re-check them anyway. ``clean_stale`` removes old leftover temp
    files of this same target (see the module docstring); callers writing many files into one large directory
    turn it off and clean once per operation. ``validate(tmp_path)`` is called on the complete temp file before
    the rename (a writer proves what it publishes); if it raises, the temp file is removed and ``path`` untouched.
    ``make_parents``: create missing parent directories (else a missing one is refused, naming it).

    Refused clearly (a FreezepackError naming the path; nothing is replaced): a directory at ``path``, a missing
    parent, a full disk, a quota or a file-size limit, a permission or read-only filesystem.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise FormatError("is a directory, cannot write a file there", path=path)
    if not make_parents and not os.path.isdir(directory):
        raise FreezepackError(f"directory {directory} does not exist: create it first (or pass make_parents=True / "
                              "--parents)", path=path)
    try:
        _write_replace(path, directory, data, fsync, mode, clean_stale, validate, make_parents)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
            raise FreezepackError(f"cannot write: {e.strerror} (disk full, quota, or a file-size limit such as "
                                  "ulimit -f); nothing was replaced: free space or write elsewhere",
                                  path=path) from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR):
            raise FreezepackError(f"cannot write: {e.strerror}", path=path) from None
        raise


def _write_replace(path: str, directory: str, data, fsync: bool, mode: int, clean_stale: bool, validate,
                   make_parents: bool) -> None:
    base = os.path.basename(path)
    if make_parents:
        os.makedirs(directory, exist_ok=True)
    if clean_stale:
        remove_stale_temps(directory, base)
    tmp = os.path.join(directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}-{base}")
    # O_EXCL never follows a symlink planted at the temp name; the umask applies to ``mode`` as for open()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_BINARY", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode & 0o077 == 0 and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)     # a secret: exactly owner-only whatever the umask
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
