"""The torch generator path: fill a float32 tensor with torch kernels only (spec/RNG.md). A machine without the
compiled kernel (freezepack/format/native.py) runs it on the CPU, and every GPU runs it.

Elements are made in batches of whole Philox blocks (rng.PhiloxTorch: 39 kernels a batch, then about a dozen for
the conversion and the store). A batch's words, conversions and temporaries live in one preallocated workspace (24
bytes per element) that every kernel writes with ``out=`` or in place, through views made once: a kernel's
dispatch costs about a microsecond whatever its size, so nothing per batch allocates or slices more than it must.

Threads (CPU). Batches are independent (counter-based generator), so with ``threads`` > 1 that many Python threads
take batches from one queue, each with its own workspace and torch's intra-op threads set to one for itself (torch
releases the GIL inside kernels). Their batches are large (131072 elements), so the GIL changes hands rarely. In
one thread, batches stay small (32768 or 65536 elements: in L2, and no kernel bigger than torch's intra-op grain,
so torch never wakes its own threads): split by torch, every kernel is a parallel region that waits for all its
threads, and on a loaded machine that wait costs more than the kernel (tools/bench_rng.py measures the result).
Every element is a pure function of (seed, stream, index) computed by elementwise kernels: neither the batch size
nor the thread count can change a bit.
"""
from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import rng

# Blocks (4 elements) per batch on a CPU: serial batches keep every kernel at or under torch's grain of 32768
# elements (at::internal::GRAIN_SIZE; the conversions run on 4 elements a block, Philox on 2), threaded ones are
# larger and set torch's threads to one in their thread.
CPU_BATCH_BLOCKS = 1 << 13
CPU_BATCH_BLOCKS_ONE_TORCH_THREAD = 1 << 14
CPU_BATCH_BLOCKS_THREADED = 1 << 15
# On a GPU each kernel is a launch: large batches amortise them (2M elements, ~50 MB of workspace).
ACCELERATOR_BATCH_BLOCKS = 1 << 19

_U24 = 2.0**-24


class _Workspace:
    """Preallocated buffers for batches of up to ``nb`` blocks: the words (int32, lane-major), Philox's scratch rows
    (reused by the conversions as float64, int64 and int32 scratch) and a float32 row of converted values, with the
    views of each batch size made once."""

    def __init__(self, nb: int, device: torch.device):
        self.nb = nb
        self.lanes = torch.empty(4 * nb, dtype=torch.int32, device=device)
        self.scratch = torch.empty((rng.PhiloxBuffers.ROWS, nb), dtype=torch.int64, device=device)
        self.values = torch.empty(4 * nb, dtype=torch.float32, device=device)
        self._views: dict = {}

    def views(self, nb: int):
        if nb not in self._views:
            n, cap, flat = 4 * nb, self.nb, self.scratch.view(-1)
            lanes = self.lanes[:n].view(4, nb)
            # the conversions borrow Philox's free rows 2-7: float64 scratch in rows 2-5, int32 indices in 6-7
            self._views[nb] = (rng.PhiloxBuffers(lanes, self.scratch), lanes.view(-1), self.values[:n],
                               flat[2 * cap:2 * cap + n].view(torch.float64),
                               flat[6 * cap:6 * cap + n // 2].view(torch.int32),
                               flat[2 * cap:2 * cap + n // 2].view(torch.int32), self.values.view(torch.bool)[:n])
        return self._views[nb]


def _exact_uniform_scale(b: float) -> float | None:
    """b * 2**-24 when it is an exact float32 (then f32(U * that) == f32(f32(U * 2**-24) * b): the same real product,
    rounded once), else None (b so small that b * 2**-24 would be a subnormal missing some of b's bits)."""
    scaled = np.float32(b) * np.float32(_U24)
    return float(scaled) if scaled * np.float32(2.0**24) == np.float32(b) else None


def fill(out: torch.Tensor, dist: str, a: float, b: float, seed: int, stream: int, *, start: int = 0,
         chunk: int | None = None, threads: int | None = None) -> torch.Tensor:
    """Write elements ``[start, start + out.numel())`` of ``stream`` into ``out`` (float32, contiguous, any device):
    ``a + b*z`` (normal), ``a + b*u`` (uniform) or ``a*s`` (sign), each operation one float32 rounding (spec §6).

    ``chunk``: at most this many elements per batch (rounded down to whole blocks, at least one). ``threads``: CPU
    threads (default torch's thread count; accelerators use one). Neither changes a bit. Raises ValueError for an
    unknown ``dist`` or an ``a``/``b`` that is not a float32 value."""
    n = out.numel()
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 tensor")
    if dist not in ("normal", "uniform", "sign"):
        raise ValueError(f"dist must be normal, uniform or sign, got {dist!r}")
    for v in (a, b):
        if float(np.float32(v)) != float(v):
            raise ValueError(f"{v!r} is not a float32 value")
    if n == 0:
        return out
    flat = out.view(-1)
    device = out.device
    rng.check_torch_integers(device)
    rng._torch_tables(device), rng._constants(device)  # built once, before any worker thread reads them
    first, stop = start >> 2, ((start + n - 1) >> 2) + 1
    workers = 1
    if device.type != "cpu":
        size = ACCELERATOR_BATCH_BLOCKS
    else:
        threads = torch.get_num_threads() if threads is None else max(1, int(threads))
        workers = min(threads, -(-(stop - first) // CPU_BATCH_BLOCKS_THREADED))
        if workers > 1 and torch.backends.openmp.is_available():
            size = CPU_BATCH_BLOCKS_THREADED
        else:
            workers = 1
            size = CPU_BATCH_BLOCKS_ONE_TORCH_THREAD if torch.get_num_threads() == 1 else CPU_BATCH_BLOCKS
    if chunk is not None:
        size = max(1, min(size, chunk >> 2))
    batches = list(rng.block_batches(first, stop, size))
    workers = min(workers, len(batches))
    f32 = functools.partial(torch.tensor, dtype=torch.float32, device=device)
    a_t, b_t = f32(a), f32(b)  # exact: float32 values (a tensor operand is cheaper than a number per kernel)
    exact = _exact_uniform_scale(b) if dist == "uniform" else None
    scale = None if exact is None else f32(exact)

    gen = rng.PhiloxTorch(seed, stream, device)

    def run(ws: _Workspace, b0: int, nb: int) -> None:
        buf, w, values, f64, idx, i32, neg = ws.views(nb)
        gen.words(b0, buf)  # lane-major: element 4 i + r is w[r * nb + i]
        lo, hi = max(start, 4 * b0), min(start + n, 4 * (b0 + nb))
        mul: torch.Tensor | None = None
        if dist == "normal":
            x, mul = rng.normal_into(w, values, f64, idx), b_t
        elif dist == "uniform":  # 2k + 1; the uniform is that times 2**-24
            x, mul = rng.uniform_odd_into(w, values, i32), scale
        else:  # sign
            x = torch.lt(w, 0, out=neg)
        # back to element order: the stores below read the lanes transposed
        for off, piece in rng.element_pieces(x.view(4, nb), lo - 4 * b0, hi - 4 * b0):
            dst = flat[lo - start + off:lo - start + off + piece.numel()].view(piece.shape)
            if dist == "sign":
                dst.fill_(a).masked_fill_(piece, -a)  # a * s: a or -a exactly
                continue
            if mul is not None:
                torch.mul(piece, mul, out=dst)
            else:  # uniform whose b * 2**-24 is not a float32: u first, then times b
                torch.mul(piece, _U24, out=dst).mul_(b_t)
            dst.add_(a_t)

    with torch.no_grad():
        if workers <= 1:
            ws = _Workspace(min(size, stop - first), device)
            for b0, nb in batches:
                run(ws, b0, nb)
        else:
            _run_threads(run, batches, workers, lambda: _Workspace(size, device))
    return out


def _run_threads(run, batches, workers: int, workspace) -> None:
    """``run(ws, *batch)`` for every batch on ``workers`` threads, each with its own workspace, taking batches from
    one queue (a thread slowed down by other load just takes fewer). The first error is re-raised."""
    todo = iter(batches)
    lock = threading.Lock()
    process_threads = torch.get_num_threads()  # this thread's: workers may start after another one changed it
    failed = threading.Event()

    def worker():
        torch.set_num_threads(1)  # this thread's kernels stay on it: no OpenMP team per worker
        try:
            ws = workspace()
            while not failed.is_set():
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                run(ws, *item)
        except BaseException:
            failed.set()
            raise
        finally:
            torch.set_num_threads(process_threads)  # torch's process-wide setting, for threads started later

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="freezepack-rng") as pool:
        futures = [pool.submit(worker) for _ in range(workers)]
        for f in futures:
            f.result()
