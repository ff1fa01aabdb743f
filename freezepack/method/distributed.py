"""FreezeNets under torch's DistributedDataParallel: all-reduce only what is trained, regenerate what is frozen.

A FreezeNet's frozen weights are *buffers* of :class:`FrozenParametrization`; the layer's only ``nn.Parameter`` is
``parametrizations.<attr>.original`` (the trainable values). DDP all-reduces parameters only, so its gradient
buckets hold the trainable values plus biases/norms, (1 - q) of a dense model's bytes, with no change to DDP.

What plain ``DDP(model)`` would still get wrong is *broadcasting*: it sends every buffer from rank 0 at
construction and, by default, again before every forward. For a FreezeNet those buffers are the frozen tensors
(float32), the masks and the trainable indices, i.e. more bytes per step than a dense model's whole all-reduce.
:func:`wrap` therefore

- puts every FrozenParametrization buffer on DDP's ignore list (``_ddp_params_and_buffers_to_ignore``): they are
  never sent, neither at construction nor at forward. Every rank regenerates them from (seed, initializer, name)
  and receives the mask once, as k indices per tensor (:func:`share_masks`); :func:`check_same` proves the ranks
  agree by comparing 32-byte digests, not by sending tensors.
- turns the per-forward buffer sync off. The remaining buffers are BatchNorm running statistics, which only
  evaluation reads; :func:`average_buffers` averages them across ranks before each evaluation/save (one small
  all-reduce per epoch instead of a broadcast per step). Training itself uses batch statistics, per rank, as
  any DDP BatchNorm model does.

FreezeNet-WD (``apply_frozen_decay``) needs nothing: its per-tensor scale is a deterministic function of the step
count and the learning-rate schedule, which every rank shares, so it stays bit-identical without communication.

Before the first step the ranks prove they run the same job on the same data (:func:`agree`, from
:mod:`freezepack.method.agreement`, re-exported here with :func:`together` and :func:`collective_errors`).
"""
from __future__ import annotations

import hashlib
import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from ..errors import DistributedError
from .agreement import (  # noqa: F401 - the data-parallel API in one place: agree, together, ... live here too
    DEFAULT_TIMEOUT_S,
    Rendezvous,
    _ranks,
    _require_group,
    _sha256,
    _verb,
    agree,
    architecture,
    collective_errors,
    describe_disagreement,
    fingerprint,
    together,
)
from .freezenet import FrozenParametrization, frozen_parametrizations


def comm_device(model: nn.Module | None = None) -> torch.device:
    """Where collectives' helper tensors live: nccl needs CUDA tensors, gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        if model is not None:
            dev = next(model.parameters()).device
            if dev.type == "cuda":
                return dev
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def frozen_buffer_names(model: nn.Module) -> list[str]:
    """Full names (as ``model.named_buffers()`` spells them) of every FrozenParametrization buffer."""
    names = []
    for mname, module in model.named_modules():
        if isinstance(module, FrozenParametrization):
            names += [f"{mname}.{b}" if mname else b for b, _ in module.named_buffers(recurse=False)]
    return names


def wrap(model: nn.Module, *, device_ids=None, **ddp_kwargs) -> DDP:
    """``DistributedDataParallel(model)`` that never sends a frozen buffer (see the module docstring).

    ``ddp_kwargs`` go to DDP unchanged (``bucket_cap_mb``, ``gradient_as_bucket_view``, ...). Per-forward buffer
    sync is off unless the caller asks for it; the frozen buffers stay excluded either way.
    """
    _require_group()
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen_buffer_names(model))
    with collective_errors("wrapping the model in DDP"):  # DDP's construction compares shapes and broadcasts
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:  # torch >= 2.13
            ddp_kwargs.setdefault("forward_sync_buffers", False)
            return DDP(model, device_ids=device_ids, **ddp_kwargs)
        # Older torch: broadcast_buffers=False also skips buffers at construction, so sync the non-frozen ones once.
        ddp_kwargs.setdefault("broadcast_buffers", False)
        ddp = DDP(model, device_ids=device_ids, **ddp_kwargs)
        ignore = set(frozen_buffer_names(model))
        bufs = [b for n, b in model.named_buffers() if n not in ignore]
        if bufs:
            # (WORLD is None only without a process group, which DDP above already required)
            dist._broadcast_coalesced(dist.group.WORLD, bufs, 250 * 1024 * 1024, 0)  # type: ignore[arg-type]
        return ddp


def share_masks(masks: dict[str, torch.Tensor] | None, template: nn.Module, src: int = 0) -> dict[str, torch.Tensor]:
    """The trainable masks of rank ``src`` on every rank, sent as k indices per tensor (not n mask bits).

    ``src`` passes its ``{name: bool mask}`` (True = trainable), the other ranks ``None``; ``template`` is the same
    architecture on every rank (only its weight shapes are read). Computing the mask once and sharing it keeps the
    ranks identical even where saliency scores differ in the last bit between processes.
    """
    _require_group()
    dev = comm_device(template)
    mine = dist.get_rank() == src
    if mine:
        if masks is None:
            raise DistributedError(f"rank {src} must pass its masks to share_masks")
        names = list(masks)
        blob = torch.tensor(list("\n".join(names).encode()), dtype=torch.uint8)
        idx = [m.detach().reshape(-1).nonzero().squeeze(1).to(torch.int64).cpu() for m in masks.values()]
        counts = torch.tensor([len(i) for i in idx], dtype=torch.int64)
        flat = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
        head = torch.tensor([blob.numel(), flat.numel()], dtype=torch.int64)
    else:
        head = torch.zeros(2, dtype=torch.int64)
    head = head.to(dev)
    with collective_errors("sharing the mask"):
        dist.broadcast(head, src)
        n_blob, n_flat = (int(v) for v in head.tolist())
        blob = (blob if mine else torch.zeros(n_blob, dtype=torch.uint8)).to(dev)
        dist.broadcast(blob, src)
        names = bytes(blob.cpu().tolist()).decode().split("\n") if n_blob else []
        counts = (counts if mine else torch.zeros(len(names), dtype=torch.int64)).to(dev)
        flat = (flat if mine else torch.zeros(n_flat, dtype=torch.int64)).to(dev)
        dist.broadcast(counts, src)
        dist.broadcast(flat, src)
    if mine and masks is not None:
        return masks
    out, start = {}, 0
    for name, k in zip(names, counts.cpu().tolist()):
        mod, _, attr = name.rpartition(".")
        try:
            shape = getattr(template.get_submodule(mod), attr).shape
        except AttributeError:
            raise DistributedError(f"rank {src} sent a mask for a tensor this rank's model lacks",
                                   tensor=name) from None
        i = flat[start:start + k].cpu()
        start += k
        numel = int(torch.Size(shape).numel())
        if k and (int(i.min()) < 0 or int(i.max()) >= numel):
            raise DistributedError(f"rank {src} sent a trainable index outside 0..{numel - 1}", tensor=name)
        m = torch.zeros(numel, dtype=torch.bool)
        m[i] = True
        out[name] = m.view(shape)
    return out


def frozen_digest(model: nn.Module) -> str:
    """One hex digest of every frozen tensor's generator values, mask, scale and FreezeNet-WD state."""
    h = hashlib.sha256()
    for name, p in sorted(frozen_parametrizations(model).items()):
        h.update(name.encode() + b"\0")
        for _, buf in sorted(p.named_buffers(recurse=False)):
            h.update(_sha256(buf))
    return h.hexdigest()


def state_digest(model: nn.Module) -> str:
    """One hex digest of the whole model: every parameter and buffer, by name."""
    h = hashlib.sha256()
    for name, t in sorted(list(model.named_parameters()) + list(model.named_buffers())):
        h.update(name.encode() + b"\0" + _sha256(t))
    return h.hexdigest()


def check_same(model: nn.Module, *, before_training: bool = False) -> str:
    """Raise unless every rank holds bit-identical frozen tensors and parameters; returns this rank's digest.

    Each rank hashes its own model and only the 32-byte digests travel (an all-gather), so a rank whose
    regenerated weights differ is caught without ever broadcasting them. ``before_training``: the check before
    the first step (the message then says the ranks built different models).
    """
    _require_group()
    dev = comm_device(model)
    mine = bytes.fromhex(state_digest(model))
    local = torch.tensor(list(mine), dtype=torch.uint8, device=dev)
    gathered = [torch.zeros(32, dtype=torch.uint8, device=dev) for _ in range(dist.get_world_size())]
    with collective_errors("comparing the model digests"):
        dist.all_gather(gathered, local)
    digests = [bytes(g.cpu().tolist()) for g in gathered]
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        if before_training:
            raise DistributedError(f"{_ranks(odd)} {_verb(odd, 'holds', 'hold')} a model that differs from rank 0's "
                                   f"before training (architecture, frozen weights, mask or initial values): the "
                                   f"ranks did not build the same model")
        raise DistributedError(f"{_ranks(odd)} {_verb(odd, 'holds', 'hold')} a model that differs from rank 0's after "
                               f"training (frozen weights, mask or trained values): regeneration or the gradient "
                               f"all-reduce is not identical")
    return mine.hex()


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Average the floating-point non-frozen buffers (BatchNorm running statistics) over all ranks.

    Integer buffers (``num_batches_tracked``) already agree: every rank takes the same number of steps.
    """
    _require_group()
    ignore = set(frozen_buffer_names(model))
    bufs = [b for n, b in model.named_buffers() if n not in ignore and b.is_floating_point()]
    if not bufs:
        return
    world = dist.get_world_size()
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in bufs])
    with collective_errors("averaging the BatchNorm statistics"):
        dist.all_reduce(flat)
    flat /= world
    start = 0
    for b in bufs:
        b.copy_(flat[start:start + b.numel()].view_as(b))
        start += b.numel()


class CommCounter:
    """A DDP communication hook that counts what it all-reduces, then does exactly DDP's default (mean).

    ``counter = CommCounter.register(ddp)``; after the steps, ``counter.bytes`` / ``counter.calls``. The count is
    of the bucket tensors handed to the all-reduce, i.e. the bytes each rank contributes per step.
    """

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.bytes = 0
        self.calls = 0
        self.numel = 0

    @classmethod
    def register(cls, ddp: DDP, process_group=None) -> CommCounter:
        counter = cls(process_group)
        ddp.register_comm_hook(counter, _counting_allreduce)
        return counter

    def reset(self) -> None:
        self.bytes = self.calls = self.numel = 0


def _counting_allreduce(counter, bucket):  # no annotations: DDP compares them as objects, not strings
    buf = bucket.buffer()
    counter.bytes += buf.numel() * buf.element_size()
    counter.numel += buf.numel()
    counter.calls += 1
    return allreduce_hook(counter.process_group, bucket)
