"""What a dense checkpoint holds, as users' tools write it: the state dict inside a training checkpoint, and which
names are one tied tensor.

A ``.pt`` from a training loop is often ``{"model": state_dict, "optimizer": ..., "step": 3}``: the state dict is
found (or named with ``key``). Tied tensors (an LM head and its embedding) are one storage in a ``.pt`` (torch
keeps the sharing) and in a loaded ``.fpk``; a safetensors file cannot share, so equal bytes there mark a tie, or
the ``freezepack.shared`` metadata that ``freezepack unpack`` writes names them.
"""
from __future__ import annotations

import hashlib
import json

import torch

from .errors import FormatError
from .format.dense import tensor_bytes

SHARED_KEY = "freezepack.shared"  # safetensors metadata: JSON {tied name: the name it is stored under}


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def _keys(obj) -> str:
    names = [repr(k) for k in list(obj)[:8]] if isinstance(obj, dict) else []
    return ", ".join(names) + (", ..." if isinstance(obj, dict) and len(obj) > 8 else "")


def find_state_dict(obj, path, key: str | None = None) -> tuple[dict, str | None]:
    """``(state dict, where)`` inside a loaded checkpoint: ``obj`` itself, the one dict of tensors among its values
    (or their values), or the entry ``key`` names (dotted: ``"model.ema"``). ``where`` is the key path used."""
    if key is not None:
        cur = obj
        for part in key.split("."):
            if not isinstance(cur, dict) or part not in cur:
                raise FormatError(f"--key {key!r}: no entry {part!r} (entries there: {_keys(cur) or 'none'})",
                                  path=path)
            cur = cur[part]
        if not isinstance(cur, dict):
            raise FormatError(f"--key {key!r} is a {type(cur).__name__}, not a dict of name -> tensor", path=path)
        return cur, key
    if is_state_dict(obj) or not isinstance(obj, dict) or not obj:
        return obj, None
    if "state_dict" in obj and is_state_dict(obj["state_dict"]):  # Lightning's layout: the model's own weights
        return obj["state_dict"], "state_dict"
    found = [(k, v) for k, v in obj.items() if isinstance(k, str) and is_state_dict(v)]
    if not found:
        found = [(f"{k}.{k2}", v2) for k, v in obj.items() if isinstance(k, str) and isinstance(v, dict)
                 for k2, v2 in v.items() if isinstance(k2, str) and is_state_dict(v2)]
    if len(found) == 1:
        return found[0][1], found[0][0]
    if found:
        raise FormatError(f"checkpoint holds several dicts of tensors ({', '.join(k for k, _ in found)}): pass "
                          "--key NAME to choose one", path=path)
    raise FormatError(f"checkpoint is not a dict of name -> tensor and holds none (entries: {_keys(obj)}): pass "
                      "--key NAME for the entry that is the model's state dict", path=path)


def _constant(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    return bool((flat == flat[0]).all()) if flat.numel() else True


def find_ties(sd: dict[str, torch.Tensor], *, by_bytes: bool) -> dict[str, str]:
    """``{alias: first name}`` for names that are one tensor: the same storage, offset, shape and strides, or (with
    ``by_bytes``, for formats that cannot share) the same dtype, shape and bytes of a non-constant tensor of >= 2
    dimensions (two zero biases or all-ones norms are equal without being tied)."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in sd.items():
        if t.numel() == 0 or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    if by_bytes:
        seen: dict[tuple, str] = {}
        for name, t in sd.items():
            if name in aliases or t.dim() < 2 or t.numel() < 2 or _constant(t):
                continue
            same = (t.dtype, tuple(t.shape), hashlib.sha256(tensor_bytes(t.cpu())).digest())  # hashed in place
            if same in seen:
                aliases[name] = seen[same]
            else:
                seen[same] = name
    return aliases


def shared_from_metadata(meta: dict[str, str], sd: dict[str, torch.Tensor], path) -> dict[str, str]:
    """``{alias: target}`` that a ``freezepack.shared`` entry names, for aliases the file does not hold."""
    text = meta.get(SHARED_KEY)
    if text is None:
        return {}
    try:
        shared = json.loads(text)
    except ValueError:
        shared = None
    if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise FormatError(f"metadata {SHARED_KEY} is not a JSON object of name -> name", path=path)
    bad = [v for v in shared.values() if v not in sd]
    if bad:
        raise FormatError(f"metadata {SHARED_KEY} ties names to {bad[0]!r}, which the file does not hold", path=path)
    return {k: v for k, v in shared.items() if k not in sd}
