"""One dense tensor out of an open file, on a device: what load, load_into, safe_open and verify share."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from ..errors import IntegrityError, UsageError
from ..format import entropy, record
from ..format.base import Reader
from ..format.dense import digest
from ..format.dtypes import TORCH_DTYPES
from ..format.init import generate
from ..format.memory import check_memory, dense_bytes, prefault, work_bytes
from ..format.model import Entry, FrozenEntry, WholeEntry, digest_ok
from ..format.record import reconstruct

PathLike = str | os.PathLike[str]
Device = str | torch.device | None
Progress = Callable[[int, int], None]  # progress(done, total)


def check_device(device) -> torch.device | None:
    """A bad or absent device is the caller's input error: say so plainly instead of failing mid-load."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"{device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available here")
    return dev


_timings_lock = threading.Lock()  # loads time phases on several threads at once: no lost updates


@contextmanager
def _timed(timings: dict | None, key: str):
    """Adds the block's seconds to ``timings[key]``, from any thread (a phase's seconds are summed over threads)."""
    if timings is None:
        yield
        return
    t0 = time.perf_counter()
    yield
    with _timings_lock:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def frozen_parts(r: Reader, e: FrozenEntry, device, timings: dict | None = None, out: torch.Tensor | None = None,
                 threads: int | None = None):
    """``(idx, values, G)`` of a frozen entry: the trainable positions (None when nothing is trainable), their
    stored values, and the generator's float32 output ``G`` when decoding needed it (a v2 ``ans-ctx`` mask is
    conditioned on |G|; ``G`` lands in ``out`` when given), else None."""
    with _timed(timings, "read"):
        mask_words = r.mask_words(e)
        values = r.values_bytes(e)
    if values is None:
        return None, None, None
    vals = torch.frombuffer(values, dtype=TORCH_DTYPES[e.dtype])
    generated = keys = None
    with _timed(timings, "decode"):
        if e.trainable == e.numel:
            return torch.arange(e.numel), vals, None
        if e.coder == "ans-ctx":
            with _timed(timings, "generate"):
                generated = generate(e.init, e.shape, r.header.seed, e.stream_key, device=device, out=out,
                                     threads=threads)
            keys = entropy.context_keys(generated.detach().cpu().numpy())
        idx = torch.from_numpy(r.mask_indices(e, mask_words, keys))
    return idx, vals, generated


def check_digest(r: Reader, e: FrozenEntry, t: torch.Tensor, got: str | None = None) -> None:
    """``t`` (or the given digest ``got`` of it) must match the entry's digest."""
    if not digest_ok(e.sha256, got or digest(t)):
        raise IntegrityError("regenerated tensor does not match its digest: not bit-exact on this device "
                             f"({t.device}) or the file was written from a different generator", path=r.path,
                             tensor=e.name)


def streamed_digest(r: Reader, e: FrozenEntry, device, threads: int | None = None) -> str:
    """SHA-256 of a frozen entry's reconstruction, streamed (:func:`record.reconstruct_digest`): never the whole
    tensor in memory. Not for ``ans-ctx`` masks (decoded from all of G)."""
    # An explicit max_dense_bytes bounds what a tensor may expand to (a hostile header's work), streamed or not;
    # the default bound (the memory available now) applies to what streaming really holds.
    held = dense_bytes(e) if r.limits.max_dense_bytes is not None else 8 * min(record.STREAM_CHUNK, e.numel)
    check_memory(work_bytes(e) + held, "reconstructing this tensor", r.limits, device, r.path, e.name)
    idx, vals, _ = frozen_parts(r, e, device)
    return record.reconstruct_digest(e.init, e.shape, r.header.seed, e.stream_key, TORCH_DTYPES[e.dtype],
                                     e.frozen_scale, idx, vals, device=device, threads=threads)


def materialize(r: Reader, entry: Entry, device, check: bool, timings: dict | None = None,
                out: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """One dense tensor from an open file; with ``check``, its bytes are compared with the stored digest.
    ``threads``: the generator's CPU threads (default torch's); the result never depends on it."""
    path = r.path
    e = r.header.target(entry)  # a tied tensor: its target's values (load() returns one object for both names)
    if device is not None and device.type == "meta" and out is None:  # shapes and dtypes only: nothing is read
        return torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype], device="meta")
    check_memory(work_bytes(e) + (dense_bytes(e) if out is None else 0), "reconstructing this tensor", r.limits,
                 device if out is None else out.device, path, e.name)
    if isinstance(e, WholeEntry):
        with _timed(timings, "read"):
            dtype = TORCH_DTYPES[e.dtype]
            if e.numel == 0:
                t = torch.empty(e.shape, dtype=dtype)
            else:
                t = torch.frombuffer(r.whole_bytes(e), dtype=dtype).reshape(e.shape)
        with _timed(timings, "copy"):
            if out is not None:
                return out.copy_(t)
            return t.to(device) if device is not None else t
    dtype = TORCH_DTYPES[e.dtype]
    if out is None and dtype == torch.float32 and (device is None or device.type == "cpu"):
        out = torch.empty(e.shape, dtype=dtype)  # its pages mapped in one call, not faulted in one by one
        prefault(out)
    f32_out = out if out is not None and dtype == torch.float32 else None
    idx, vals, generated = frozen_parts(r, e, device if f32_out is None else None, timings, out=f32_out,
                                        threads=threads)
    with _timed(timings, "generate"):
        t = reconstruct(e.init, e.shape, r.header.seed, e.stream_key, dtype, e.frozen_scale, idx, vals,
                        device=device, out=f32_out, generated=generated, threads=threads)
    if out is not None and t is not out:
        t = out.copy_(t)
    if check:
        with _timed(timings, "digest"):
            check_digest(r, e, t)
    return t


def materialize_checked(r: Reader, entry: Entry, device, timings: dict | None = None, out: torch.Tensor | None = None,
                        threads: int | None = None) -> torch.Tensor:
    """:func:`materialize` with ``check``, for a load that runs one tensor per core: a frozen tensor made on the
    CPU whose mask does not need the generator's output (every coder but ``ans-ctx``) is regenerated and hashed
    chunk by chunk on this thread while each chunk is in cache (:func:`record.reconstruct_hashed`); any other as
    :func:`materialize` (``threads`` for its generator), then hashed."""
    e = r.header.target(entry)
    dtype = TORCH_DTYPES[e.dtype]
    target = out.device if out is not None else device or torch.device("cpu")
    if not isinstance(e, FrozenEntry) or target.type != "cpu" or e.coder == "ans-ctx" or (
            out is not None and (out.dtype != dtype or not out.is_contiguous())):
        t = materialize(r, entry, device, False, timings, out=out, threads=threads)
        if isinstance(e, FrozenEntry) and t.device.type != "meta":  # whole: bytes checked when read
            with _timed(timings, "digest"):
                got = digest(t)
            check_digest(r, e, t, got)
        return t
    check_memory(work_bytes(e) + (dense_bytes(e) if out is None else 0), "reconstructing this tensor", r.limits,
                 target, r.path, e.name)
    idx, vals, _ = frozen_parts(r, e, None, timings)
    with _timed(timings, "generate+digest"):
        t, got = record.reconstruct_hashed(e.init, e.shape, r.header.seed, e.stream_key, dtype, e.frozen_scale, idx,
                                           vals, out=out)
    check_digest(r, e, t, got)
    return t
