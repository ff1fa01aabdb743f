"""The freeze record: what a FreezeNet *is*, independent of any module or file layout.

The method (freezepack.method.freezenet) produces it from a trained model; the api/container store it; a loader
turns it back into dense tensors with :func:`reconstruct` (the one implementation of spec/FORMAT.md §5.3).
Mask convention everywhere: ``True`` = trainable (value stored), ``False`` = frozen (regenerated from seed +
initializer + stream, times ``frozen_scale``).
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .dtypes import FROZEN_TORCH_DTYPES  # noqa: F401  (the frozen dtypes; the method imports them from here)
from .init import InitSpec, generate
from .memory import prefault
from .rng import SPEC_VERSION


def reconstruct(init: InitSpec, shape, seed: int, stream: str, dtype: torch.dtype, frozen_scale: float,
                index: torch.Tensor | None, values: torch.Tensor | None, *, device=None,
                out: torch.Tensor | None = None, generated: torch.Tensor | None = None,
                threads: int | None = None) -> torch.Tensor:
    """A frozen tensor's dense value (FORMAT.md §5.3): regenerate, round to ``dtype``, scale, scatter the values.

    ``G`` = generator float32 output for (seed, stream); ``dense = round_dtype(G)``; if ``frozen_scale != 1``:
    ``dense = round_dtype(dense x frozen_scale)`` (one correctly rounded multiply: for F16/BF16 the product of two
    such numbers is exact in float32, so computing it there and rounding once is the same); then
    ``dense[index] = values``. ``out`` (float32 only) receives the result in place. ``generated``: ``G`` when
    the caller already regenerated it (a v2 ``ans-ctx`` mask is decoded from it); it is then overwritten.
    ``threads``: the generator's CPU threads (default torch's); the result never depends on it.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    k = 0 if index is None else int(index.numel())
    if k == numel and numel:  # nothing frozen: nothing to regenerate
        t = out if out is not None else torch.empty(tuple(shape), dtype=dtype, device=device)
    else:
        t = generated if generated is not None else generate(
            init, shape, seed, stream, device=device if out is None else None,
            out=out if dtype == torch.float32 else None, threads=threads)
        if dtype != torch.float32:
            t = t.to(dtype)
        if frozen_scale != 1.0:
            t.mul_(frozen_scale)
    if k and values is not None and index is not None:
        vals = values.to(device=t.device, dtype=dtype).reshape(-1)
        if k == numel:
            t.view(-1).copy_(vals)
        elif t.device.type == "cpu" and t.is_contiguous():
            _scatter_cpu(t.view(-1), index, vals)
        else:
            t.view(-1).index_copy_(0, index.to(t.device), vals)
    return t


def _scatter_cpu(flat: torch.Tensor, index: torch.Tensor, vals: torch.Tensor) -> None:
    """``flat[index] = vals`` on one thread (numpy, on the bits: bfloat16 has no numpy type). Loads run one tensor
    per core; torch's index_copy_ would start its own thread team inside each, whose idle spinning costs more CPU
    than the scatter itself."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    flat.view(bits).numpy()[index.cpu().numpy()] = vals.contiguous().view(bits).numpy()


STREAM_CHUNK = 1 << 22  # elements regenerated at a time when a reconstruction is only hashed (verify, save's proof)


def reconstruct_digest(init: InitSpec, shape, seed: int, stream: str, dtype: torch.dtype, frozen_scale: float,
                       index: torch.Tensor | None, values: torch.Tensor | None, *, device=None,
                       threads: int | None = None) -> str:
    """SHA-256 of :func:`reconstruct`'s bytes, made :data:`STREAM_CHUNK` elements at a time (§5.3 is elementwise:
    generate, round, scale, then the stored values at their positions), never the whole tensor in memory.
    ``index``: ascending positions of ``values``. Chunk i is hashed on a worker thread while chunk i + 1 is made
    (by ``threads`` generator threads, default torch's)."""
    n = 1
    for s in shape:
        n *= int(s)
    k = 0 if index is None else int(index.numel())
    h = hashlib.sha256()
    # two buffers: the one being hashed is never the one being regenerated
    bufs = [torch.empty(min(STREAM_CHUNK, n), dtype=torch.float32, device=device) for _ in range(2)]
    pos = index.numpy() if index is not None and k else None
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = None
        for i, s in enumerate(range(0, n, STREAM_CHUNK)):
            c = min(STREAM_CHUNK, n - s)
            if k == n:  # nothing frozen: the values are the tensor
                assert values is not None
                t = values.reshape(-1)[s:s + c].to(device=bufs[0].device, dtype=dtype)
            else:
                t = generate(init, (c,), seed, stream, out=bufs[i % 2][:c], start=s, threads=threads)
                t = t if dtype == torch.float32 else t.to(dtype)
                if frozen_scale != 1.0:
                    t.mul_(frozen_scale)
                if pos is not None and index is not None and values is not None:
                    lo, hi = (int(v) for v in np.searchsorted(pos, [s, s + c]))
                    if hi > lo:
                        t.index_copy_(0, (index[lo:hi] - s).to(t.device),
                                      values.reshape(-1)[lo:hi].to(device=t.device, dtype=dtype))
            t = t.detach().cpu().contiguous()
            if hashing is not None:
                hashing.result()  # in order; and the buffer it read is the one regenerated next
            hashing = pool.submit(h.update, t.view(torch.uint8).numpy().data if t.numel() else b"")
        if hashing is not None:
            hashing.result()
    return h.hexdigest()


CACHE_CHUNK = 1 << 18  # elements made and hashed at a time by reconstruct_hashed: 1 MB of float32 stays in L2


def reconstruct_hashed(init: InitSpec, shape, seed: int, stream: str, dtype: torch.dtype, frozen_scale: float,
                       index: torch.Tensor | None, values: torch.Tensor | None, *,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """:func:`reconstruct` on the CPU, on the calling thread alone, and the SHA-256 of its bytes, in one pass: each
    :data:`CACHE_CHUNK` elements are regenerated, rounded, scaled, given their stored values and hashed while they
    are still in the core's cache (hashing them there is about a quarter faster than a second pass over memory).
    For loads that run one such task per core. ``out``: a contiguous CPU tensor of ``dtype`` to fill (else a new
    one); ``index``: ascending positions of ``values``."""
    n = 1
    for s in shape:
        n *= int(s)
    t = torch.empty(tuple(shape), dtype=dtype) if out is None else out
    if out is None:
        prefault(t)
    flat = t.view(-1)
    k = 0 if index is None else int(index.numel())
    vals = None if values is None else values.reshape(-1).to(dtype)
    pos = index.numpy() if index is not None and k else None
    wide = None if dtype == torch.float32 else torch.empty(min(CACHE_CHUNK, n), dtype=torch.float32)
    h = hashlib.sha256()
    for s in range(0, n, CACHE_CHUNK):
        c = min(CACHE_CHUNK, n - s)
        piece = flat[s:s + c]
        if k == n:  # nothing frozen: the values are the tensor
            assert vals is not None
            piece.copy_(vals[s:s + c])
        else:
            g = generate(init, (c,), seed, stream, out=piece if wide is None else wide[:c], start=s, threads=1)
            if wide is not None:
                piece.copy_(g)  # round to nearest even, as reconstruct's .to(dtype)
            if frozen_scale != 1.0:
                piece.mul_(frozen_scale)
            if pos is not None and index is not None and vals is not None:
                lo, hi = (int(v) for v in np.searchsorted(pos, [s, s + c]))
                if hi > lo:
                    _scatter_cpu(piece, index[lo:hi] - s, vals[lo:hi])
        h.update(piece.view(torch.uint8).numpy().data)
    return t, h.hexdigest()


@dataclass
class FrozenTensor:
    """One partly frozen tensor. ``values`` = dense[mask] in row-major (C) order, 1-D, in the tensor's dtype
    (float32, float16 or bfloat16)."""

    init: InitSpec
    mask: torch.Tensor          # bool, the tensor's shape
    values: torch.Tensor        # shape (mask.sum(),), dtype = the dense tensor's dtype
    frozen_scale: float = 1.0   # FreezeNet-WD: frozen = generator output * frozen_scale
    stream: str | None = None   # generator stream key fixed when frozen; None = the tensor's name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def dense(self, seed: int, name: str, device=None) -> torch.Tensor:
        """Regenerate the frozen part on ``device`` and scatter the trained values in."""
        index = self.mask.reshape(-1).nonzero().squeeze(1)
        return reconstruct(self.init, self.shape, seed, self.stream or name, self.dtype, self.frozen_scale, index,
                           self.values, device=device)


@dataclass
class FreezeRecord:
    """A whole model: per-tensor frozen entries plus tensors stored whole (biases, BatchNorm, anything else).

    Tensor names are the model's ``state_dict`` keys. A frozen tensor's generator stream is its ``stream`` (fixed
    when it was frozen), else its name. ``aliases`` maps a tied name to the name whose storage it shares.
    """

    seed: int
    frozen: dict[str, FrozenTensor] = field(default_factory=dict)
    whole: dict[str, torch.Tensor] = field(default_factory=dict)
    spec_version: str = SPEC_VERSION
    aliases: dict[str, str] = field(default_factory=dict)

    def state_dict(self, device=None) -> dict[str, torch.Tensor]:
        sd = {k: v.to(device) for k, v in self.whole.items()}
        for name, ft in self.frozen.items():
            sd[name] = ft.dense(self.seed, name, device=device)
        for alias, target in self.aliases.items():
            sd[alias] = sd[target]
        return sd
