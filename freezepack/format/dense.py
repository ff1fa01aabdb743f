"""Dense tensors as bytes: the little-endian C-order bytes a digest covers, and that digest."""
from __future__ import annotations

import hashlib

import torch


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a CPU tensor in C order, without a copy when already contiguous."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy().data)


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dense little-endian C-order bytes (what the header's per-tensor ``sha256`` holds)."""
    return hashlib.sha256(tensor_bytes(t.cpu())).hexdigest()
