"""Work on every core: ordered tasks on a pool of threads (load, save, verify, convert, mask choice, the v2 writer).

The heavy parts release the GIL (the compiled generator and ANS decoder through ctypes, hashlib on big buffers,
numpy and torch kernels), so plain threads scale across cores. Tasks start costliest first, so the biggest
tensor's SHA-256 (one sequential pass: ~0.7 s per GB on one core here) is not the last work left while the other
cores idle. Results come back in the caller's order and the first failure in that order is the one raised, so what
a load returns or raises never depends on the thread count.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from .errors import UsageError

T = TypeVar("T")


def thread_count(threads: int | None) -> int:
    """The threads a parallel path uses: ``threads``, else torch's CPU threads (``torch.set_num_threads``)."""
    if threads is None:
        return max(1, torch.get_num_threads())
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a positive integer or None, got {threads!r}")
    return threads


def generator_threads(threads: int, tasks: int) -> int:
    """The generator's CPU threads inside each load task: one while the tasks alone fill the threads (a model of
    many tensors), the spare threads shared out when there are fewer tasks than threads (one huge tensor)."""
    return max(1, threads // max(1, tasks))


def run_ordered(tasks: Sequence[tuple[int, Callable[[], T]]], threads: int,
                done: Callable[[int], None] | None = None) -> list[T]:
    """Run ``tasks`` (``(cost, fn)`` pairs) on ``threads`` threads, costliest first (ties in the given order), and
    return their results in the given order. ``done(i)`` is called on the calling thread as result ``i`` is taken,
    in order. The first task (in the given order) that raised re-raises here, once every task already running has
    stopped: none is left touching the caller's file or tensors."""
    if threads <= 1 or len(tasks) <= 1:  # on the calling thread: no pool at all
        results = []
        for i, (_, fn) in enumerate(tasks):
            results.append(fn())
            if done is not None:
                done(i)
        return results
    futures: list[Future] = [Future()] * len(tasks)
    pool = ThreadPoolExecutor(max_workers=min(threads, len(tasks)), thread_name_prefix="freezepack")
    try:
        for i in sorted(range(len(tasks)), key=lambda i: -tasks[i][0]):  # sorted() is stable
            futures[i] = pool.submit(tasks[i][1])
        results = []
        for i, fut in enumerate(futures):
            results.append(fut.result())
            if done is not None:
                done(i)
        return results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
