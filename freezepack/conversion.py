"""Dense checkpoint -> the smallest exact .fpk: find which entries are still frozen, pruned or trained.

For each float32 tensor the initial values are regenerated from (seed, initializer, name) and compared bit for
bit: equal entries are frozen (also when all were scaled by one factor, as FreezeNet-WD leaves them), zero entries
can be stored as pruned (the ``zeros`` initializer), the rest are trained values. Checkpoints are read without ever
unpickling code (``torch.load(weights_only=True)``), and the written file is proven to reproduce the input.
"""
from __future__ import annotations

import os

import torch

from .api import load, save, tensor_bytes
from .errors import FormatError, IntegrityError
from .format import container, maskcode
from .format.init import InitSpec, generate, make_init
from .format.record import FreezeRecord, FrozenTensor
from .format.rng import check_seed


def read_dense_checkpoint(path) -> dict[str, torch.Tensor]:
    """A dense state_dict from .safetensors, .fpk, or .pt/.pth (``torch.load(weights_only=True)`` only)."""
    path = os.fspath(path)
    container._check_regular_file(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith((".pt", ".pth", ".bin")) or head[:2] == b"PK":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad archive; never unpickle anything unsafe
            raise FormatError(f"not a loadable weights-only torch checkpoint: {str(e).splitlines()[0][:200]}",
                              path=path) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()):
            raise FormatError("checkpoint is not a dict of name -> tensor", path=path)
        return obj
    try:
        return load(path)
    except FormatError as e:
        if "plain safetensors" not in e.reason:
            raise
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FormatError(f"not a readable safetensors file: {str(e)[:200]}", path=path) from None


def _init_for(name: str, shape, default, inits: dict | None):
    choice = (inits or {}).get(name, default)
    if choice is None:
        return None
    if isinstance(choice, InitSpec):
        return choice
    if isinstance(choice, (tuple, list)):
        return make_init(choice[0], shape, **dict(choice[1]))
    if len(shape) < 2 and choice in ("xavier_normal", "xavier_uniform", "kaiming_normal", "kaiming_uniform",
                                     "pm_sigma"):
        return None  # fan-based initializers need >= 2 dimensions; such tensors can still be 'pruned'
    return make_init(choice, shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.view(torch.int32) == b.view(torch.int32)


def _likely_scale(t: torch.Tensor, regen: torch.Tensor) -> float | None:
    """FreezeNet-WD shrinks every frozen entry by one f32 factor: the most common ratio dense / initial is it."""
    nz = regen != 0
    if not bool(nz.any()):
        return None
    ratio = (t[nz] / regen[nz])
    ratio = ratio[torch.isfinite(ratio)]
    if ratio.numel() == 0:
        return None
    values, counts = torch.unique(ratio, return_counts=True)
    s = float(values[int(counts.argmax())])
    return s if s not in (0.0, 1.0) and int(counts.max()) * 2 > ratio.numel() // 10 else None


def convert_record(state_dict: dict[str, torch.Tensor], seed: int, init="xavier_normal", inits=None,
                   progress=None) -> tuple[FreezeRecord, list[dict]]:
    """Find, per float32 tensor, the entries that equal the regenerated initial values (frozen; also when all of
    them were scaled by one factor, as FreezeNet-WD's weight decay does) or zero (pruned).

    Each tensor keeps the explanation that stores it smallest; one that matches nothing is stored whole.
    ``init``: initializer name used for every tensor; ``inits``: per-name override (a name, (name, params) or an
    InitSpec; ``None`` = store whole).
    """
    seed = check_seed(seed)
    rec = FreezeRecord(seed=seed)
    report = []
    for i, (name, t) in enumerate(state_dict.items()):
        t = t.detach().cpu().contiguous()
        row = {"name": name, "shape": list(t.shape), "numel": t.numel(), "stored_as": "whole", "trainable": t.numel()}
        best = None
        if t.dtype == torch.float32 and t.numel() > 0:
            candidates = []
            spec = _init_for(name, tuple(t.shape), init, inits)
            if spec is not None:
                candidates.append(("frozen", spec))
            candidates.append(("pruned", make_init("zeros", tuple(t.shape))))
            for label, spec in candidates:
                regen = generate(spec, tuple(t.shape), seed, name)
                scales = [1.0]
                if label == "frozen":
                    scales.append(_likely_scale(t, regen))
                for scale in scales:
                    if scale is None:
                        continue
                    cand = regen if scale == 1.0 else regen * scale  # one f32 multiply, as the loader does
                    same = _same_bits(t, cand)
                    k = int(t.numel() - same.sum())
                    if best is None or k < best[2]:
                        best = (label, spec, k, ~same, scale)
        if best is not None and best[2] < t.numel():
            label, spec, k, mask, scale = best
            n = t.numel()
            cost = 4 * k + maskcode.entropy_bytes(n, k) * 1.01 + 16
            if cost < 4 * n:
                rec.frozen[name] = FrozenTensor(spec, mask, t[mask].clone(), scale)
                row.update(stored_as=label, trainable=k, init=spec.name, q=1 - k / n)
                if scale != 1.0:
                    row["frozen_scale"] = scale
        if name not in rec.frozen:
            rec.whole[name] = t
        report.append(row)
        if progress is not None:
            progress(i + 1, len(state_dict))
    return rec, report


def convert_checkpoint(src, dst, seed: int, init="xavier_normal", inits=None, metadata=None,
                       progress=None) -> dict:
    """Dense checkpoint (``.safetensors``, ``.pt``/``.pth``) + seed + initializer(s) -> the smallest exact .fpk.

    The written file is re-read and verified before this returns. Returns a report of what was found.
    """
    sd = read_dense_checkpoint(src)
    rec, rows = convert_record(sd, seed, init, inits, progress)
    save(dst, rec, metadata)
    back = load(dst)  # prove the file reproduces the checkpoint bit for bit before reporting success
    for name, t in sd.items():
        if bytes(tensor_bytes(back[name])) != bytes(tensor_bytes(t.detach().cpu())):
            raise IntegrityError("converted file does not reproduce the checkpoint", path=dst, tensor=name)
    dense = sum(v.numel() * v.element_size() for v in sd.values())
    size = os.path.getsize(dst)
    return {"source": os.fspath(src), "output": os.fspath(dst), "seed": int(seed), "tensors": rows,
            "dense_bytes": dense, "file_bytes": size, "compression_factor": dense / size if size else 0.0}
