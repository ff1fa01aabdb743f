"""Dense tensors as bytes: the little-endian C-order bytes a digest covers, and that digest."""
from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterator

import torch

from .dtypes import DTYPE_NAMES, DTYPE_SIZES


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a CPU tensor in C order, without a copy when already contiguous."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy().data)


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dense little-endian C-order bytes (what the header's per-tensor ``sha256`` holds)."""
    return hashlib.sha256(tensor_bytes(t.cpu())).hexdigest()


def safetensors_chunks(layout: list[tuple[str, str, tuple[int, ...]]], tensor: Callable[[str], torch.Tensor],
                       metadata: dict[str, str] | None = None) -> Iterator[bytes | memoryview]:
    """A dense .safetensors file as a stream of byte chunks: the header (computed from ``layout``, a list of
    ``(name, dtype, shape)`` in file order), then each tensor's bytes as ``tensor(name)`` makes it. Only one tensor
    is held at a time, so unpacking a model needs one tensor's memory, not the whole model twice (as
    ``safetensors.torch.save`` would: the dict, then one bytes object of it all).

    The layout is safetensors' own (its format doc): u64 little-endian header length N, N bytes of JSON (padded
    with spaces to a multiple of 8, as safetensors pads), then the tensors back to back in ``data_offsets`` order.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in layout:
        size = DTYPE_SIZES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    yield struct.pack("<Q", len(text)) + text
    for name, dtype, shape in layout:
        t = tensor(name)
        if DTYPE_NAMES.get(t.dtype) != dtype or tuple(t.shape) != tuple(shape):  # a bug, never a user error
            raise AssertionError(f"{name}: made {t.dtype} {list(t.shape)}, the header says {dtype} {list(shape)}")
        yield tensor_bytes(t.cpu())
