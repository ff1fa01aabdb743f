"""The torch generator path: fill a float32 tensor with torch kernels only (spec/RNG.md). A machine without the
compiled kernel (freezepack/format/native.py) runs it on the CPU, and every GPU runs it.

Elements are made in batches of whole Philox blocks. A batch's words, conversions and temporaries live in one
preallocated workspace (about 24 bytes per element) that every kernel writes into with ``out=`` or in place: on a CPU
a batch of 32768 elements keeps the workspace in L2 and each kernel under torch's intra-op grain, so the ~110
kernels of a batch run without allocating or waking torch's own threads. Batches are independent (counter-based
generator), so on a CPU ``threads`` Python threads take batches from a shared queue, each with its own workspace;
torch releases the GIL inside its kernels. Every element is a pure function of (seed, stream, index) computed by
elementwise kernels, so neither the batch size nor the thread count can change a bit.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import rng

# Blocks (4 elements) per batch. CPU: 8192 blocks = 32768 elements, torch's grain (at::internal::GRAIN_SIZE): no
# kernel is split over torch's threads, so batches on our threads never nest parallel regions.
CPU_BATCH_BLOCKS = 1 << 13
# On a GPU each kernel is a launch: large batches amortise them (2M elements, ~50 MB of workspace).
ACCELERATOR_BATCH_BLOCKS = 1 << 19

_U24 = 2.0**-24


class _Workspace:
    """Preallocated buffers for batches of up to ``nb`` blocks: the Philox lanes, six scratch rows (reused by the
    conversions as float64/int32 scratch) and a float32 row of converted values."""

    def __init__(self, nb: int, device: torch.device):
        self.lanes = torch.empty((4, nb), dtype=torch.int64, device=device)
        self.scratch = torch.empty((6, nb), dtype=torch.int64, device=device)
        self.values = torch.empty(4 * nb, dtype=torch.float32, device=device)

    def batch(self, nb: int):
        n = 4 * nb
        flat = self.scratch.view(-1)
        return (self.lanes[:, :nb], self.scratch[:, :nb], self.values[:n],
                flat[:n].view(torch.float64), flat[4 * self.scratch.shape[1]:].view(torch.int32)[:n], flat[:n])


def _exact_uniform_scale(b: float) -> float | None:
    """b * 2**-24 when it is an exact float32 (then f32(U * that) == f32(f32(U * 2**-24) * b): the same real product,
    rounded once), else None (b so small that b * 2**-24 would be subnormal)."""
    scaled = np.float32(b) * np.float32(_U24)
    return float(scaled) if scaled * np.float32(2.0**24) == np.float32(b) else None


def fill(out: torch.Tensor, dist: str, a: float, b: float, seed: int, stream: int, *, start: int = 0,
         chunk: int | None = None, threads: int | None = None) -> torch.Tensor:
    """Write elements ``[start, start + out.numel())`` of ``stream`` into ``out`` (float32, contiguous, any device):
    ``a + b*z`` (normal), ``a + b*u`` (uniform) or ``a*s`` (sign), each operation one float32 rounding (spec §6).

    ``chunk``: at most this many elements per batch (rounded down to whole blocks, at least one). ``threads``: CPU
    threads (default torch's thread count; accelerators use one). Neither changes a bit."""
    n = out.numel()
    if n == 0:
        return out
    flat = out.view(-1)
    device = out.device
    rng.check_torch_integers(device)
    rng._torch_tables(device)  # built once, before any worker thread reads them
    cpu = device.type == "cpu"
    size = CPU_BATCH_BLOCKS if cpu else ACCELERATOR_BATCH_BLOCKS
    if chunk is not None:
        size = min(size, max(1, chunk >> 2)) if cpu else max(1, chunk >> 2)
    first, stop = start >> 2, ((start + n - 1) >> 2) + 1
    batches = list(rng.block_batches(first, stop, size))
    scale = _exact_uniform_scale(b) if dist == "uniform" else None

    def run(ws: _Workspace, b0: int, nb: int) -> None:
        lanes, scratch, values, f64, idx, i64 = ws.batch(nb)
        rng.philox_torch(seed, stream, b0, lanes, scratch)
        words, low = lanes.t(), rng.low_words(lanes, nb)  # (nb, 4): element order
        lo, hi = max(start, 4 * b0), min(start + n, 4 * (b0 + nb))
        off, dst = lo - 4 * b0, flat[lo - start:hi - start]
        if dist == "normal":
            z = rng.normal_into(words, low, values, f64, idx)
            torch.mul(z[off:off + hi - lo], b, out=dst)
            dst.add_(a)
        elif dist == "uniform":
            u = rng.uniform_odd_into(words, values, i64)[off:off + hi - lo]  # 2k + 1; u = that * 2**-24
            if scale is not None:
                torch.mul(u, scale, out=dst)
            else:
                torch.mul(u, _U24, out=dst).mul_(b)
            dst.add_(a)
        elif dist == "sign":
            neg = torch.lt(low, 0, out=values.view(torch.bool)[:4 * nb].view(nb, 4)).view(-1)
            dst.fill_(a).masked_fill_(neg[off:off + hi - lo], -a)  # a * s: a or -a exactly
        else:
            raise ValueError(f"dist must be normal, uniform or sign, got {dist!r}")

    workers = min(len(batches), 1 if not cpu else (torch.get_num_threads() if threads is None else int(threads)))
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
    failed = threading.Event()

    def worker():
        ws = workspace()
        while not failed.is_set():
            with lock:
                item = next(todo, None)
            if item is None:
                return
            try:
                run(ws, *item)
            except BaseException:
                failed.set()
                raise

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="freezepack-rng") as pool:
        futures = [pool.submit(worker) for _ in range(workers)]
        for f in futures:
            f.result()
