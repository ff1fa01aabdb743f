"""Files, once: open a regular file once (its size from the open file) and read exactly what was bounded first. Writes
go through the package's one crash-safe ``atomic_write`` (freezepack.atomic), re-exported here for the format's
writers and their callers."""
from __future__ import annotations

import os
import stat
import threading

from ..atomic import atomic_write
from ..errors import FormatError

__all__ = ["atomic_write", "check_regular_file", "open_regular", "read_at", "read_exact"]


def check_regular_file(path) -> int:
    """The size of ``path`` if it is a regular file, else a FormatError naming it (missing, a directory, a FIFO,
    unreadable). For a quick check before expensive work; readers open once and take the size from the open file
    (:func:`open_regular`), so a file replaced in between cannot be judged by the old one's size."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError("no such file", path=path) from None
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror}", path=path) from None
    return _regular_size(st, path)


def _regular_size(st: os.stat_result, path) -> int:
    if not stat.S_ISREG(st.st_mode):
        raise FormatError("not a regular file (a directory)" if stat.S_ISDIR(st.st_mode) else "not a regular file",
                          path=path)
    return st.st_size


def open_regular(path):
    """Open ``path`` for reading once and return ``(binary file, size)`` with the size from the open file (fstat).

    O_NONBLOCK so a FIFO cannot block the open; anything but a regular file is a FormatError naming the path.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise FormatError("no such file", path=path) from None
    except IsADirectoryError:
        raise FormatError("not a regular file (a directory)", path=path) from None
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror}", path=path) from None
    try:
        size = _regular_size(os.fstat(fd), path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), size
    except BaseException:
        os.close(fd)
        raise


def read_exact(f, n: int, path) -> bytes:
    """``n`` bytes from ``f`` (a caller bounded ``n`` first), or a FormatError: the file shrank under us."""
    raw = f.read(n)
    if len(raw) != n:
        raise FormatError("file shrank while being read", path=path)
    return raw


_seek_lock = threading.Lock()  # where there is no positional read, seek + read must not interleave across threads


def read_at(f, buf: bytearray, offset: int) -> int:
    """Read into ``buf`` from byte ``offset`` of the open file ``f``; returns the bytes read (fewer only at the end
    of the file). Positional (``os.preadv``), so threads decoding tensors from one open file at once never race
    over a shared file position; where the OS has no positional read, a lock makes seek + read one step."""
    if not hasattr(os, "preadv"):
        with _seek_lock:
            f.seek(offset)
            return f.readinto(buf)
    view, got, fd = memoryview(buf), 0, f.fileno()
    while got < len(buf):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got
