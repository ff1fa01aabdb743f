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
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..method.freezenet import apply_frozen_decay, init_weights, make_freezenet, parameter_count, rates, trainable_count
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


def train(model: nn.Module, train_data: Dataset, val_data: Dataset, *, epochs: int = 15, lr: float = 0.1,
          momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 100, cosine: bool = True,
          seed: int = 0, frozen_decay: bool = False, patience: int | None = None,
          max_grad_norm: float | None = MAX_GRAD_NORM, progress: bool = False, label: str = "train") -> list[dict]:
    """SGD training with early stopping on ``val_data``; leaves the best-validation weights in ``model``.

    Returns the per-epoch history. ``frozen_decay`` = FreezeNet-WD. ``max_grad_norm`` clips the gradient norm
    (None: off).
    """
    if epochs < 1 or batch_size < 1:
        raise UsageError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_data) / batch_size)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch) if cosine else None)
    order_rng = torch.Generator().manual_seed((int(seed) + 1) % 2**64)
    x_all, y_all = train_data.images.to(device), train_data.labels.to(device)
    best_val, best_state, best_epoch, history = -1.0, None, 0, []
    bar = _Progress(progress, label)
    model.train()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(train_data), generator=order_rng).to(device)
        total_loss = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            step_lr = opt.param_groups[0]["lr"]
            opt.step()
            if frozen_decay:
                apply_frozen_decay(model, step_lr, weight_decay, momentum)
            if sched is not None:
                sched.step()
            total_loss += float(loss.detach())
            bar.step(epoch, epochs, i + 1, steps_per_epoch, total_loss / (i + 1))
        val = evaluate(model, val_data)
        if val > best_val:
            best_val, best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append({"epoch": epoch, "loss": total_loss / steps_per_epoch, "val_acc": val})
        bar.epoch(epoch, epochs, total_loss / steps_per_epoch, val, best_val)
        if patience is not None and epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return history


def build(model_name: str, method: str, q: float, seed: int, batch: tuple[torch.Tensor, torch.Tensor], *,
          init: str = "xavier_normal", init_params: dict | None = None, reinit: str | None = None,
          device=None) -> nn.Module:
    """A fresh model for ``method`` at freezing rate ``q`` (``q`` ignored for dense), weights from the generator."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    model = make_model(model_name).to(device)
    if method == "dense":
        return init_weights(model, seed, init, init_params)
    x, y = batch[0].to(device), batch[1].to(device)
    mask_method = {"freezenet": "snip", "freezenet-wd": "snip", "random": "random", "snip": "snip",
                   "grasp": "grasp"}[method]
    return make_freezenet(model, (x, y), q, seed, mask_method, init, init_params, reinit=reinit,
                          prune=method in ("snip", "grasp"))


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

    @property
    def label(self) -> str:
        return f"{self.model} {self.method}" + ("" if self.method == "dense" else f" q={self.q}") + \
            f" seed={self.seed}"


def run(config: TrainConfig | None = None, *, data=None, datasets: tuple[Dataset, Dataset] | None = None,
        device=None, progress: bool = False) -> RunResult:
    """Build, freeze, train and test one network on MNIST (``data`` = IDX directory, default the shipped subset).

    Pass ``datasets=(train, test)`` to reuse data already loaded across many runs.
    """
    c = config if config is not None else TrainConfig()
    if INPUT_SHAPES.get(c.model) not in (None, (1, 28, 28)):
        raise UsageError(f"model {c.model!r} takes {INPUT_SHAPES[c.model]} images; run() trains on MNIST "
                         f"(1, 28, 28): use lenet5 or lenet300, or train() with your own data")
    t0 = time.perf_counter()
    train_full, test = datasets if datasets is not None else load_mnist(data)
    tr, va = split_train_val(train_full, c.seed)
    net = build(c.model, c.method, c.q, c.seed, (tr.images[:SNIP_BATCH], tr.labels[:SNIP_BATCH]), init=c.init,
                init_params=c.init_params, reinit=c.reinit, device=device)
    history = train(net, tr, va, epochs=c.epochs, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                    batch_size=c.batch_size, cosine=c.cosine, seed=c.seed, frozen_decay=c.method == "freezenet-wd",
                    patience=c.patience, max_grad_norm=c.max_grad_norm, progress=progress, label=c.label)
    best = max(history, key=lambda h: h["val_acc"])
    q_real, q_beta = rates(net)
    return RunResult(model_name=c.model, method=c.method, q=q_real, q_beta=q_beta, seed=c.seed,
                     test_acc=evaluate(net, test), val_acc=best["val_acc"], best_epoch=best["epoch"],
                     epochs=len(history), trainable=trainable_count(net), parameters=parameter_count(net),
                     seconds=time.perf_counter() - t0, model=net, history=history)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), as the paper reports over seeds."""
    values = [float(v) for v in values]
    if not values:
        raise UsageError("mean_std of no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
