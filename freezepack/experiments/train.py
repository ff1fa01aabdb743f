"""Training and evaluation as in the paper: SGD lr 0.1 momentum 0.9, 9/1 train/validation split, early stopping.

``run(TrainConfig(model="lenet5", method="freezenet", q=0.99, seed=7))`` builds, freezes, trains and tests one
network and returns a :class:`RunResult` holding the accuracy and the trained model. Methods:

    dense         the baseline: every weight trained
    freezenet     SNIP mask, frozen weights kept at their generator values (the paper's FreezeNet)
    freezenet-wd  FreezeNet with weight decay on the frozen weights too (exact per-tensor scale)
    random        FreezeNet with a random mask
    snip          SNIP pruning: frozen weights are zero
    grasp         GraSP pruning: frozen weights are zero

Weight decay applies to trainable numbers only (values, biases, BatchNorm), except frozen weights for
``freezenet-wd``. Early stopping keeps the weights of the epoch with the best validation accuracy.

Data-parallel: ``run(..., distributed=True)`` inside an initialised torch.distributed group (torchrun,
``freezepack train --nproc``) first proves that every rank has the same configuration and data (one error line on
every rank otherwise, before anything is trained), computes the mask on rank 0, shares it, regenerates the frozen
weights on every rank and trains under DistributedDataParallel (:mod:`freezepack.method.distributed`), each rank
on its shard of every global batch. ``shards=N`` in one process takes the same step from N shards: for N = 2 it
is the 2-rank run bit for bit (docs/DISTRIBUTED.md).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..method.freezenet import (
    apply_frozen_decay,
    freeze,
    init_weights,
    make_freezenet,
    parameter_count,
    rates,
    trainable_count,
    trainable_masks,
)
from .data import Dataset, load_mnist, split_train_val
from .models import INPUT_SHAPES, make_model

METHODS = ("dense", "freezenet", "freezenet-wd", "random", "snip", "grasp")
SNIP_BATCH = 100  # images in the one batch that scores the weights (as in SNIP for MNIST)
# Dense LeNet-5-Caffe diverges to NaN within the first epoch at lr 0.1 / momentum 0.9 for most seeds; clipping the
# gradient norm at 1 keeps every method stable and is inactive for most FreezeNet steps (few, small gradients).
MAX_GRAD_NORM = 1.0


@dataclass
class RunResult:
    model_name: str
    method: str
    q: float
    q_beta: float
    seed: int
    test_acc: float
    val_acc: float
    best_epoch: int
    epochs: int
    trainable: int           # numbers the optimizer updates (trainable weights + biases + BN)
    parameters: int          # parameters of the plain model
    seconds: float
    model: nn.Module = field(repr=False)
    history: list = field(default_factory=list, repr=False)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 1000) -> float:
    """Accuracy in [0, 1] (model put in eval mode, then restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(data), batch_size):
        x = data.images[i:i + batch_size].to(device)
        y = data.labels[i:i + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / max(len(data), 1)


class _Progress:
    """One line per epoch; on a terminal also a live bar inside the epoch."""

    def __init__(self, enabled: bool, label: str, stream=None):
        self.enabled, self.label, self.stream = enabled, label, stream or sys.stderr
        self.live = enabled and self.stream.isatty()

    def step(self, epoch, epochs, i, n, loss):
        if self.live and (i % 10 == 0 or i == n):
            done = int(20 * i / n)
            self.stream.write(f"\r{self.label} epoch {epoch}/{epochs} [{'#' * done}{'.' * (20 - done)}] "
                              f"loss {loss:.3f}")
            self.stream.flush()

    def epoch(self, epoch, epochs, loss, val, best):
        if self.enabled:
            lead = "\r\x1b[K" if self.live else ""  # clear the live bar before the epoch line
            self.stream.write(f"{lead}{self.label} epoch {epoch}/{epochs} loss {loss:.4f} "
                              f"val {100 * val:.2f}% (best {100 * best:.2f}%)\n")
            self.stream.flush()


def _shard_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, parts: int, params: list) -> torch.Tensor:
    """One step's gradient of the batch mean from ``parts`` shards, summed as a ``parts``-rank DDP all-reduce does.

    Each shard's loss is its summed cross-entropy x parts / batch, so the mean over shards (DDP's average) is the
    global batch mean even when shards differ in size. Each shard gradient is scaled by 1/parts and added in rank
    order: exactly the reducer's arithmetic, so for parts = 2 (where a + b = b + a) the result is bit-identical.
    """
    total = 0.0
    acc: list[torch.Tensor] = []  # the shard gradients added so far, in rank order
    for i, (xs, ys) in enumerate(zip(x.tensor_split(parts), y.tensor_split(parts))):
        for p in params:
            p.grad = None
        loss = F.cross_entropy(model(xs), ys, reduction="sum") * (parts / len(y))
        loss.backward()
        g = [p.grad * (1.0 / parts) for p in params]
        acc = g if i == 0 else [a + b for a, b in zip(acc, g)]
        total += float(loss.detach())
    for p, a in zip(params, acc):
        p.grad = a
    return torch.tensor(total / parts)


def train(model: nn.Module, train_data: Dataset, val_data: Dataset, *, epochs: int = 15, lr: float = 0.1,
          momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 100, cosine: bool = True,
          seed: int = 0, frozen_decay: bool = False, patience: int | None = None,
          max_grad_norm: float | None = MAX_GRAD_NORM, progress: bool = False, label: str = "train",
          distributed: bool = False, shards: int = 1, timeout: float | None = None) -> list[dict]:
    """SGD training with early stopping on ``val_data``; leaves the best-validation weights in ``model``.

    Returns the per-epoch history. ``frozen_decay`` = FreezeNet-WD. ``max_grad_norm`` clips the gradient norm
    (None: off). ``distributed``: train under DistributedDataParallel in the current process group, each rank on
    its shard of every global batch of ``batch_size``; before the first step the ranks prove they share these
    arguments, the data and the model (:func:`freezepack.method.distributed.agree`, ``timeout`` seconds to wait
    for each other, default 300; the collectives of training are bounded by the process group's own timeout, see
    ``init_worker(timeout=...)``). ``shards``: in one process, take each step from that many shards the way
    ``shards`` ranks would.
    """
    if epochs < 1 or batch_size < 1 or shards < 1:
        raise UsageError(f"epochs, batch_size and shards must be positive, got {epochs}, {batch_size}, {shards}")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    guard: contextlib.AbstractContextManager = contextlib.nullcontext()
    rank, parts, net = 0, shards, model
    if distributed:
        import torch.distributed as dist

        from ..method.distributed import (
            agree,
            average_buffers,
            check_same,
            collective_errors,
            comm_device,
            wrap,
        )

        if shards != 1:
            raise UsageError("shards emulates ranks in one process; use it without distributed")
        # everything below that decides how many steps and collectives a rank takes derives from these values
        agree(dict(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
                   cosine=cosine, seed=seed, frozen_decay=frozen_decay, patience=patience,
                   max_grad_norm=max_grad_norm),
              {"training data": _parts(train_data), "validation data": _parts(val_data)}, timeout=timeout)
        check_same(model, before_training=True)  # frozen weights, masks and initial values, as 32-byte digests
        net = wrap(model)  # DDP without a single frozen buffer on the wire
        rank, parts = dist.get_rank(), dist.get_world_size()
        guard = collective_errors("training")
    if batch_size < parts:
        raise UsageError(f"batch_size {batch_size} is smaller than the {parts} ranks/shards it is split across")
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_data) / batch_size)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch) if cosine else None)
    order_rng = torch.Generator().manual_seed((int(seed) + 1) % 2**64)
    x_all, y_all = train_data.images.to(device), train_data.labels.to(device)
    best_val, best_state, best_epoch, history = -1.0, None, 0, []
    bar = _Progress(progress and rank == 0, label)
    model.train()
    with guard:  # distributed: a collective that fails or times out ends the run as one DistributedError
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(len(train_data), generator=order_rng).to(device)
            total_loss = 0.0
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                if len(idx) < parts:  # a last batch too small to give every rank a sample: skipped by all alike
                    continue
                if distributed:
                    n = len(idx)
                    idx = idx.tensor_split(parts)[rank]  # this rank's shard of the global batch
                    opt.zero_grad(set_to_none=True)
                    # summed loss x world / global batch: DDP's average over ranks is then the global batch mean
                    loss = F.cross_entropy(net(x_all[idx]), y_all[idx], reduction="sum") * (parts / n)
                    loss.backward()  # DDP all-reduces the trainable values' gradients (only those) here
                elif parts > 1:
                    loss = _shard_step(model, x_all[idx], y_all[idx], parts, params)
                else:
                    loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                step_lr = opt.param_groups[0]["lr"]
                opt.step()
                if frozen_decay:
                    apply_frozen_decay(model, step_lr, weight_decay, momentum)  # deterministic: same on every rank
                if sched is not None:
                    sched.step()
                total_loss += float(loss.detach())
                bar.step(epoch, epochs, i + 1, steps_per_epoch, total_loss / (i + 1))
            if distributed:
                t = torch.tensor([total_loss], dtype=torch.float64, device=comm_device(model))
                dist.all_reduce(t)
                total_loss = float(t) / parts
                average_buffers(model)  # BatchNorm running statistics: the ranks' mean, so every rank evaluates alike
            val = evaluate(model, val_data) if rank == 0 else 0.0
            if distributed:
                # rank 0's accuracy decides best epoch and early stop on every rank (the others need not evaluate):
                # the models and data are identical, but no rank may stop on a last-bit difference of its own
                v = torch.tensor([val], dtype=torch.float64, device=comm_device(model))
                dist.broadcast(v, 0)
                val = float(v)
            if val > best_val:
                best_val, best_epoch = val, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            history.append({"epoch": epoch, "loss": total_loss / steps_per_epoch, "val_acc": val})
            bar.epoch(epoch, epochs, total_loss / steps_per_epoch, val, best_val)
            if patience is not None and epoch - best_epoch >= patience:
                break
        if best_state is not None:  # (None only when no epoch ran)
            model.load_state_dict(best_state)
        if distributed:
            check_same(model)  # 32-byte digests per rank: frozen weights, masks and trained values all agree
    return history


def _parts(data: Dataset) -> dict:
    """A data set as :func:`freezepack.method.distributed.agree` fingerprints it (contents, not paths)."""
    return {"images": data.images, "labels": data.labels}


def build(model_name: str, method: str, q: float, seed: int, batch: tuple[torch.Tensor, torch.Tensor], *,
          init: str = "xavier_normal", init_params: dict | None = None, reinit: str | None = None,
          device=None, masks: dict[str, torch.Tensor] | None = None, widths: dict | None = None) -> nn.Module:
    """A fresh model for ``method`` at freezing rate ``q`` (``q`` ignored for dense), weights from the generator.

    ``masks`` (``{name: trainable}``, e.g. computed on another rank) skips the scoring and freezes with those.
    ``widths``: the model's layer-width arguments (a narrow baseline, :mod:`.narrow`); default its full widths.
    """
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    model = make_model(model_name, **(widths or {})).to(device)
    if method == "dense":
        return init_weights(model, seed, init, init_params)
    if masks is not None:  # make_freezenet's freeze step with a given mask
        init_weights(model, seed, init, init_params)
        return freeze(model, {k: m.to(device) for k, m in masks.items()}, seed, reinit or init,
                      None if reinit else init_params, frozen_init="zeros" if method in ("snip", "grasp") else None)
    x, y = batch[0].to(device), batch[1].to(device)
    mask_method = {"freezenet": "snip", "freezenet-wd": "snip", "random": "random", "snip": "snip",
                   "grasp": "grasp"}[method]
    return make_freezenet(model, (x, y), q, seed, mask_method, init, init_params, reinit=reinit,
                          prune=method in ("snip", "grasp"), biases="zeros")


@dataclass(frozen=True)
class TrainConfig:
    """What one run of the paper's experiment is: network, method, freezing rate, seed and hyperparameters.

    Where the data comes from and where the run executes (device, progress) are arguments of :func:`run`, not
    part of the experiment.
    """

    model: str = "lenet5"
    method: str = "freezenet"
    q: float = 0.99
    seed: int = 0
    epochs: int = 15
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 100
    cosine: bool = True
    patience: int | None = None
    max_grad_norm: float | None = MAX_GRAD_NORM
    init: str = "xavier_normal"
    init_params: dict | None = None
    reinit: str | None = None
    widths: dict | None = None  # layer-width constructor arguments (narrow baselines, .narrow); None: full width

    @property
    def label(self) -> str:
        return f"{self.model} {self.method}" + ("" if self.method == "dense" else f" q={self.q}") + \
            f" seed={self.seed}"


def run(config: TrainConfig | None = None, *, data=None, datasets: tuple[Dataset, Dataset] | None = None,
        device=None, progress: bool = False, distributed: bool = False, shards: int = 1,
        shared: dict | None = None, timeout: float | None = None) -> RunResult:
    """Build, freeze, train and test one network on MNIST (``data`` = IDX directory, default the shipped subset).

    Pass ``datasets=(train, test)`` to reuse data already loaded across many runs. ``distributed``: one rank of
    a data-parallel run (the process group must be initialised). Before anything is built the ranks prove they
    share the config, the model's architecture, ``shared`` (more settings that change the result, e.g. the CLI's
    ``--values``) and the data's contents; a difference, or a failure on any rank, is one DistributedError on
    every rank. ``timeout``: seconds a rank waits for the others at each such step (default 300; collectives are
    bounded by the process group's timeout). ``shards``: see :func:`train`.
    """
    c = config if config is not None else TrainConfig()
    t0 = time.perf_counter()

    def prepare():
        if INPUT_SHAPES.get(c.model) not in (None, (1, 28, 28)):
            raise UsageError(f"model {c.model!r} takes {INPUT_SHAPES[c.model]} images; run() trains on MNIST "
                             f"(1, 28, 28): use lenet5 or lenet300, or train() with your own data")
        return datasets if datasets is not None else load_mnist(data)

    kw = dict(init=c.init, init_params=c.init_params, reinit=c.reinit, device=device, widths=c.widths)
    if distributed:
        import dataclasses

        import torch.distributed as dist

        from ..method.distributed import agree, architecture, share_masks, together

        # each step that could fail on one rank only runs under together(): every rank learns of it at once
        (train_full, test), template = together(
            "loading the data and the model", lambda: (prepare(), make_model(c.model, **(c.widths or {}))),
            timeout=timeout)
        agree({**dataclasses.asdict(c), "model parameters": architecture(template),
               "device type": torch.device(device or "cpu").type, **(shared or {})},
              {"train set": _parts(train_full), "test set": _parts(test)}, timeout=timeout)
        tr, va = split_train_val(train_full, c.seed)
        batch = (tr.images[:SNIP_BATCH], tr.labels[:SNIP_BATCH])
        if c.method == "dense":
            net = together("building the model", lambda: build(c.model, c.method, c.q, c.seed, batch, **kw),
                           timeout=timeout)
        else:  # the mask is scored once, on rank 0; the others get k indices per tensor and regenerate the rest
            first = dist.get_rank() == 0
            scored = together("scoring the mask on rank 0", lambda: build(c.model, c.method, c.q, c.seed, batch,
                                                                          **kw) if first else None, timeout=timeout)

            def regenerate():  # every rank takes share_masks' broadcasts; a failure after them reaches all ranks
                masks = share_masks(trainable_masks(scored) if first else None, template)
                return scored if first else build(c.model, c.method, c.q, c.seed, batch, masks=masks, **kw)

            net = together("receiving the mask and regenerating the frozen weights", regenerate, timeout=timeout)
    else:
        train_full, test = prepare()
        tr, va = split_train_val(train_full, c.seed)
        net = build(c.model, c.method, c.q, c.seed, (tr.images[:SNIP_BATCH], tr.labels[:SNIP_BATCH]), **kw)
    history = train(net, tr, va, epochs=c.epochs, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                    batch_size=c.batch_size, cosine=c.cosine, seed=c.seed, frozen_decay=c.method == "freezenet-wd",
                    patience=c.patience, max_grad_norm=c.max_grad_norm, progress=progress, label=c.label,
                    distributed=distributed, shards=shards, timeout=timeout)
    best = max(history, key=lambda h: h["val_acc"])
    q_real, q_beta = rates(net)
    return RunResult(model_name=c.model, method=c.method, q=q_real, q_beta=q_beta, seed=c.seed,
                     test_acc=evaluate(net, test), val_acc=best["val_acc"], best_epoch=best["epoch"],
                     epochs=len(history), trainable=trainable_count(net), parameters=parameter_count(net),
                     seconds=time.perf_counter() - t0, model=net, history=history)


def finetune_quantized(model: nn.Module, coding: str, data: Dataset, *, epochs: int = 1, seed: int = 0,
                       lr: float = 0.01, batch_size: int = 100) -> nn.Module:
    """Quantize ``model``'s trained values in place (``coding``, e.g. ``kmeans:4``), then fine-tune the shared
    values for ``epochs`` over shuffled batches of ``data`` (Deep Compression; freezepack.method.quantize)."""
    from ..method.quantize import finetune_clusters, quantize_model

    clusters = quantize_model(model, coding)
    g = torch.Generator().manual_seed(int(seed))

    def batches():
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=g)
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                yield data.images[idx], data.labels[idx]

    return finetune_clusters(model, clusters, batches(), lr=lr)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), as the paper reports over seeds."""
    values = [float(v) for v in values]
    if not values:
        raise UsageError("mean_std of no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
