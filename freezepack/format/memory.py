"""Memory: what a load may allocate, checked before it does.

A .fpk legitimately regenerates gigabytes from a few bytes, so the file size cannot bound a load: each tensor's
dense bytes and its decoder's working arrays are estimated from the header and compared with the reader's
``max_dense_bytes`` (default: half the memory available now) before anything is allocated.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
from typing import TYPE_CHECKING, Any

from ..errors import FormatError
from .model import DEFAULT_LIMITS, Entry, FrozenEntry, Limits, dense_bytes

if TYPE_CHECKING:
    import torch

__all__ = ["available_bytes", "check_memory", "dense_bytes", "human_bytes", "prefault", "work_bytes"]


def available_bytes(device=None) -> int | None:
    """Memory a load may still allocate on ``device`` now, or None when unknown: for a CPU the smaller of half the
    system's available memory and what the process's address-space/data limits (RLIMIT_AS, RLIMIT_DATA) leave;
    for a GPU its free memory."""
    kind = getattr(device, "type", None) or (str(device).split(":")[0] if device is not None else "cpu")
    if kind == "meta":
        return None
    if kind == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    if kind != "cpu":
        return None
    best = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    # half: a file of a few bytes must not be able to push a shared machine into swap or the
                    # OOM killer; a trusted big model raises the limit explicitly
                    best = int(line.split()[1]) * 1024 // 2
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        for lim in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
            soft = resource.getrlimit(lim)[0]
            if soft != resource.RLIM_INFINITY:
                room = max(soft - vm, 0)
                best = room if best is None else min(best, room)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return best


def work_bytes(e: Entry) -> int:
    """Upper estimate of what reconstructing ``e`` allocates besides the dense tensor: the stored parts read from
    the file and the decoder's working arrays (maskcode.decode_indices)."""
    if not isinstance(e, FrozenEntry):
        return dense_bytes(e)  # whole: the bytes read, then viewed in place; alias: nothing
    n, k = e.numel, e.trainable
    stored = 4 * k  # values; the mask's words are counted by the coder below
    if e.coder in ("const",) or k in (0, n):
        return stored + 8 * (k if k == n else 0)
    if e.coder == "ans-bernoulli":
        return stored + 6 * n + 8 * k  # n int32 symbols + n bools + k int64 indices
    if e.coder == "ans-gaps" and not e.mask_words:  # empty stream: the positions are a prefix, nothing to decode
        return stored + 8 * k
    m = k if e.coder_params.get("value") == 1 else n - k
    return stored + 16 * m + 8 * k + (0 if e.coder_params.get("value") == 1 else n)


_ALWAYS_ALLOWED = 4 << 20  # a materialization this small is never refused for lack of system memory


def check_memory(nbytes: int, what: str, limits: Limits = DEFAULT_LIMITS, device=None, path=None,
                 tensor=None) -> None:
    """Refuse, before allocating, to materialize more than ``limits.max_dense_bytes`` (default: the memory
    available now on ``device``). A .fpk legitimately regenerates gigabytes from a few bytes, so the file size
    cannot bound this; a FormatError naming the limit is better than an out-of-memory kill."""
    if limits.max_dense_bytes is None and nbytes <= _ALWAYS_ALLOWED:
        return  # asking the system costs ~0.2 ms (a /proc read): not worth it for a small tensor
    limit = limits.max_dense_bytes if limits.max_dense_bytes is not None else available_bytes(device)
    if limit is None or nbytes <= limit:
        return
    source = "" if limits.max_dense_bytes is not None else " (default: half the memory available now)"
    raise FormatError(f"{what} needs {human_bytes(nbytes)} of memory, over the reader limit max_dense_bytes="
                      f"{limit}{source}; free memory, or if you trust this file pass "
                      "limits=freezepack.format.model.Limits(max_dense_bytes=...)", path=path, tensor=tensor)


def human_bytes(nbytes: int) -> str:
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{nbytes} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"



_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault the range in now, writable
_PREFAULT_MIN = 1 << 20     # below this the call costs about what it saves
_madvise: Any = None        # libc's madvise once looked up; False where there is none


def prefault(t: torch.Tensor) -> bool:
    """Map the pages of a new CPU tensor about to be written whole in one system call (Linux's
    ``MADV_POPULATE_WRITE``) instead of one page fault per 4 KiB as they are first written: the same zeroed pages,
    for about a quarter less kernel time (a load regenerating 475 MB spends ~0.15 CPU-seconds in page faults).
    Nothing else changes (pages already mapped keep their bytes); a no-op off Linux, on older kernels and for small
    tensors. True when the pages were mapped."""
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError, TypeError):
                pass
    if not _madvise or t.device.type != "cpu":
        return False
    page = mmap.PAGESIZE
    start = (t.data_ptr() + page - 1) & ~(page - 1)  # whole pages inside the tensor only
    end = (t.data_ptr() + t.numel() * t.element_size()) & ~(page - 1)
    # refused (EINVAL on old kernels): the pages fault in as before
    return end - start >= _PREFAULT_MIN and _madvise(start, end - start, _MADV_POPULATE_WRITE) == 0


_malloc_trim: list = []  # glibc's malloc_trim once looked up; [None] where there is none


def release_freed_heap() -> None:
    """Hand the heap memory freed so far back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed blocks below its mmap threshold (which grows up to 32 MB: a layer's gradient, activation or
    weight) inside the process. A pass that frees one tensor-sized block as it allocates the next (SNIP's backward,
    load_freezenet swapping a module's weights) would otherwise count those blocks again in its peak."""
    if not _malloc_trim:
        try:
            _malloc_trim.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):  # not glibc
            _malloc_trim.append(None)
    if _malloc_trim[0] is not None:
        _malloc_trim[0](0)
