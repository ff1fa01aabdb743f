"""Data-parallel benchmark, one run: bytes DistributedDataParallel moves per step, dense vs FreezeNet.

Two gloo ranks on 127.0.0.1 (started with freezepack's launcher, i.e. torch's elastic agent). For LeNet-5-Caffe and
VGG16-D (freezepack.experiments.models), dense and FreezeNet at q = 0.9 / 0.99 / 0.999:

  * allreduce B/step: bytes each rank hands to the gradient all-reduce per step, *counted* by a DDP communication
    hook (register_comm_hook, freezepack.method.distributed.CommCounter), not estimated; "x dense" is the ratio
    to the dense model's, "x trainable" the ratio to 4 bytes x (trainable values + biases/norms) (goal <= 1.05);
  * bcast B/step, init bcast B: bytes DDP broadcasts before each forward and once at construction, counted by
    wrapping torch.distributed._broadcast_coalesced (what DDP calls for both);
  * plain-DDP bcast B/step: the same FreezeNet under a plain ``DDP(model)``: it broadcasts the frozen buffers
    every step, which freezepack's wrap() never does;
  * step ms: median wall time of forward + backward (+ all-reduce) + SGD step on rank 0;
  * agreement ms: what every run pays once before its first step to prove the ranks share configuration and
    data (freezepack.method.distributed.agree on the shipped MNIST subset: SHA-256 of the 31 MB of tensors on each
    rank, compared through the store), also as a number of LeNet-5 q = 0.99 steps.

Dense uses plain ``DDP(model)`` with DDP's defaults (what a user would otherwise run); FreezeNets use
``freezepack.method.distributed.wrap``. The mask is scored once (SNIP, rank 0) and shared as indices.

    PYTHONPATH=. .venv/bin/python tools/bench_dist.py [--steps 6] [--vgg-steps 3] [--batch 32] [--vgg-batch 2]
                                                     [--models lenet5,vgg16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from freezepack.experiments.launch import init_worker, launch
from freezepack.experiments.models import INPUT_SHAPES, make_model
from freezepack.experiments.train import build
from freezepack.method.distributed import CommCounter, share_masks, wrap
from freezepack.method.freezenet import trainable_count, trainable_masks

QS = (0.9, 0.99, 0.999)


class _BroadcastCounter:
    """Counts the bytes of every coalesced broadcast DDP issues (construction sync and per-forward buffer sync)."""

    def __init__(self):
        self.bytes = 0
        self._orig = dist._broadcast_coalesced

    def __enter__(self):
        def counting(pg, tensors, *args, **kwargs):
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            return self._orig(pg, tensors, *args, **kwargs)

        dist._broadcast_coalesced = counting
        return self

    def __exit__(self, *exc):
        dist._broadcast_coalesced = self._orig


def _model(name: str, q: float | None, batch):
    if q is None:
        return build(name, "dense", 0.0, 0, batch)
    net = build(name, "freezenet", q, 0, batch) if dist.get_rank() == 0 else None
    masks = share_masks(trainable_masks(net) if net is not None else None, make_model(name))
    return net if net is not None else build(name, "freezenet", q, 0, batch, masks=masks)


def _measure(model, make, steps: int, batch: int, shape) -> dict:
    g = torch.Generator().manual_seed(1 + dist.get_rank())  # each rank its own shard
    with _BroadcastCounter() as init_b:
        ddp = make(model)
    counter = CommCounter.register(ddp)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    times = []
    with _BroadcastCounter() as step_b:
        for _ in range(steps):
            x = torch.randn(batch, *shape, generator=g)
            y = torch.randint(0, 10, (batch,), generator=g)
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    return {"allreduce_bytes_per_step": counter.bytes / steps, "allreduce_calls_per_step": counter.calls / steps,
            "bcast_bytes_per_step": step_b.bytes / steps, "init_bcast_bytes": init_b.bytes,
            "step_ms": 1e3 * statistics.median(times[1:] if steps > 1 else times)}


def _agreement_ms() -> float:
    from freezepack.experiments.data import load_mnist
    from freezepack.method.distributed import agree

    train, test = load_mnist()
    t = time.perf_counter()
    agree({"model": "lenet5", "method": "freezenet", "q": 0.99, "seed": 0, "epochs": 15, "lr": 0.1},
          {"train set": {"images": train.images, "labels": train.labels},
           "test set": {"images": test.images, "labels": test.labels}})
    return 1e3 * (time.perf_counter() - t)


def _worker(cfg: dict) -> list[dict]:
    init_worker(threads=1)
    rows = [{"agreement_ms": _agreement_ms()}]
    for name in cfg["models"]:
        shape = INPUT_SHAPES[name]
        steps, batch = (cfg["vgg_steps"], cfg["vgg_batch"]) if name == "vgg16" else (cfg["steps"], cfg["batch"])
        g = torch.Generator().manual_seed(0)
        score_batch = (torch.randn(max(batch, 4), *shape, generator=g), torch.arange(max(batch, 4)) % 10)
        for q in (None,) + QS:
            model = _model(name, q, score_batch)
            row = {"model": name, "q": q, "trainable": trainable_count(model), "batch_per_rank": batch,
                   "steps": steps, **_measure(model, DDP if q is None else wrap, steps, batch, shape)}
            if q is not None:  # the pitfall: the same FreezeNet under plain DDP(model)
                plain = _measure(_model(name, q, score_batch), DDP, 2, batch, shape)
                row["plain_ddp_bcast_bytes_per_step"] = plain["bcast_bytes_per_step"]
                row["plain_ddp_init_bcast_bytes"] = plain["init_bcast_bytes"]
            rows.append(row)
            del model
    dist.destroy_process_group()
    return rows


def _fmt(n: float) -> str:
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="lenet5,vgg16")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32, help="LeNet-5 images per rank per step")
    ap.add_argument("--vgg-steps", type=int, default=3)
    ap.add_argument("--vgg-batch", type=int, default=2, help="VGG16 images per rank per step")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    cfg = {"models": a.models.split(","), "steps": a.steps, "batch": a.batch, "vgg_steps": a.vgg_steps,
           "vgg_batch": a.vgg_batch}
    t0 = time.perf_counter()
    agreement, *rows = launch(2, _worker, cfg)[0]
    print(f"2 gloo ranks, 1 thread each, {time.perf_counter() - t0:.0f} s in all")
    hdr = (f"{'model':7} {'q':>6} {'trainable':>10} {'allreduce/step':>15} {'x dense':>8} {'x trainable':>11} "
           f"{'bcast/step':>11} {'init bcast':>11} {'plain-DDP bcast/step':>21} {'step ms':>8}")
    print(hdr)
    dense = {}
    for r in rows:
        if r["q"] is None:
            dense[r["model"]] = r
        d = dense[r["model"]]
        r["x_dense"] = r["allreduce_bytes_per_step"] / d["allreduce_bytes_per_step"]
        r["x_trainable"] = r["allreduce_bytes_per_step"] / (4 * r["trainable"])
        r["step_x_dense"] = r["step_ms"] / d["step_ms"]
        plain = _fmt(r["plain_ddp_bcast_bytes_per_step"]) if "plain_ddp_bcast_bytes_per_step" in r else "-"
        print(f"{r['model']:7} {'dense' if r['q'] is None else r['q']:>6} {r['trainable']:>10,} "
              f"{_fmt(r['allreduce_bytes_per_step']):>15} {r['x_dense']:>8.4f} {r['x_trainable']:>11.3f} "
              f"{_fmt(r['bcast_bytes_per_step']):>11} {_fmt(r['init_bcast_bytes']):>11} {plain:>21} "
              f"{r['step_ms']:>8.1f}")
    step = next((r["step_ms"] for r in rows if r["model"] == "lenet5" and r["q"] == 0.99), None)
    per_step = f" = {agreement['agreement_ms'] / step:.1f} LeNet-5 q=0.99 steps" if step else ""
    print(f"agreement check before training (config + shipped MNIST subset): {agreement['agreement_ms']:.0f} ms"
          f"{per_step}, once per run")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([agreement, *rows], f, indent=1)


if __name__ == "__main__":
    main()
