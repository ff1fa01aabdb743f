"""Start N data-parallel workers on this machine with torch's own launcher (the machinery behind ``torchrun``).

``launch(n, fn, arg)`` runs ``fn(arg)`` on ranks 0..n-1 (``torch.distributed.launcher.api.elastic_launch``,
c10d rendezvous on 127.0.0.1, port chosen free, like ``torchrun --standalone``) and returns ``{rank: result}``.
Inside a worker, :func:`init_worker` joins the process group from the environment torchrun sets: gloo on CPU,
nccl when the worker trains on a GPU. Several machines: start the same command under ``torchrun --nnodes ...``
on each (docs/DISTRIBUTED.md); :func:`under_torchrun` tells a command it is already one of those workers.
"""
from __future__ import annotations

import datetime
import logging
import os
import uuid

import torch

from ..errors import DistributedError


def under_torchrun() -> bool:
    """True inside a worker started by torchrun / torch.distributed.run (its environment names the rendezvous)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def worker_device(device: str | None) -> torch.device:
    """This worker's device: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` (one GPU per local rank), else as given."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and dev.index is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not torch.cuda.is_available():
            raise DistributedError("device cuda asked for, but this machine has no CUDA GPU")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world > torch.cuda.device_count():  # nccl refuses two ranks on one GPU
            raise DistributedError(f"{local_world} ranks on this machine but only {torch.cuda.device_count()} "
                                   f"CUDA GPU(s): one GPU per rank")
        dev = torch.device("cuda", local)
    return dev


def init_worker(device: str | None = None, threads: int | None = None,
                timeout: float | None = None) -> torch.device:
    """Join the process group of a torchrun worker (env:// rendezvous); returns this rank's device.

    gloo for CPU training, nccl for CUDA. ``threads``: torch intra-op threads of this rank (default: this
    machine's cores shared evenly among its local ranks, so N ranks do not oversubscribe the CPU). ``timeout``:
    seconds any collective (and the rendezvous itself) may wait for the other ranks before the run ends with a
    DistributedError (default 300; torch's own default is 30 minutes). On gloo the error is one line; on nccl
    torch's watchdog ends the process.
    """
    import torch.distributed as dist

    from ..method.agreement import DEFAULT_TIMEOUT_S

    if not under_torchrun():
        raise DistributedError("not a torchrun worker: RANK/WORLD_SIZE/MASTER_ADDR/... are not set")
    timeout = DEFAULT_TIMEOUT_S if timeout is None else float(timeout)
    if not timeout > 0:
        raise DistributedError(f"the collective timeout must be a positive number of seconds, got {timeout}")
    dev = worker_device(device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        try:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                    timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as e:  # DistStoreError / DistNetworkError: the others never came, or no rendezvous
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DistributedError(f"rank {os.environ['RANK']} could not join the process group at "
                                   f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout:g} s: "
                                   f"{reason}") from None
    return dev


def launch(nproc: int, fn, arg, *, quiet: bool = True) -> dict:
    """Run ``fn(arg)`` on ``nproc`` local ranks; ``{rank: return value}``. ``fn`` must be importable (spawned).

    A worker that dies raises :class:`DistributedError` naming the rank and its error.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise DistributedError(f"nproc must be at least 1, got {nproc}")
    if quiet:  # the elastic agent logs every rendezvous step at INFO/WARNING; keep the user's terminal clean
        logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1",
                          max_restarts=0, monitor_interval=0.1, start_method="spawn")
    try:
        return elastic_launch(config, fn)(arg)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        msg = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        raise DistributedError(f"worker rank {rank} failed (exit code {failure.exitcode}): "
                               f"{(msg or 'see its stderr above').strip().splitlines()[-1]}") from None
