"""Dense checkpoint -> an exact .fpk, each tensor in its cheapest exact form: find which entries are still frozen,
pruned or trained.

For each float32 tensor the initial values are regenerated from (seed, initializer, name) and compared bit for
bit: equal entries are frozen (also when all were scaled by one factor, as FreezeNet-WD leaves them), zero entries
can be stored as pruned (the ``zeros`` initializer), the rest are trained values. Each tensor is then stored the
way that costs the fewest file bytes, header bytes included: frozen with a coded mask, or whole. Checkpoints are
read without ever unpickling code (``torch.load(weights_only=True)``), and the written file is read back and
proven to reproduce the input bit for bit *before* it replaces anything at the destination.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any

import numpy as np
import torch

from .api import DEFAULT_VERSION, VALUES_KEY, encode_record, load, tensor_bytes
from .api import open as fpk_open
from .checkpoint import SHARED_KEY, find_state_dict, find_ties, shared_from_metadata
from .errors import FormatError, FreezepackError, IntegrityError, UsageError
from .format.dtypes import TORCH_DTYPES
from .format.framing import sniff
from .format.init import InitSpec, generate, make_init
from .format.initializers import TABLE
from .format.io import atomic_write, check_regular_file
from .format.record import FreezeRecord, FrozenTensor
from .format.rng import check_seed
from .format.strictjson import valid_text
from .parallel import run_ordered, thread_count

# Below this share of float32 elements explained by the initializer, a conversion almost surely used the wrong
# seed or initializer: the file is still exact, but the user should hear why it is not small.
LOW_MATCH = 0.05
_FAN_INITS = tuple(name for name, ini in TABLE.items() if ini.fan)  # need >= 2 dimensions


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def _check_state_dict(obj, path, key: str | None = None) -> dict[str, torch.Tensor]:
    obj, where = find_state_dict(obj, path, key)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        at = f" at {where!r}" if where else ""
        raise FormatError(f"checkpoint{at} is not a dict of name -> tensor", path=path)
    if not obj:
        raise FormatError("checkpoint holds no tensors: nothing to convert", path=path)
    for k, v in obj.items():
        if not valid_text(k) or not k or k == "__metadata__":
            raise FormatError(f"tensor name {k!r} cannot be stored (empty, reserved or not valid Unicode)",
                              path=path)
        if v.layout != torch.strided:
            raise FormatError(f"is a {str(v.layout).replace('torch.', '')} tensor: store it dense "
                              "(t.to_dense()) before converting", path=path, tensor=k)
        if v.is_quantized or v.dtype not in _STORABLE:
            raise FormatError(f"dtype {v.dtype} cannot be stored in a .fpk", path=path, tensor=k)
    return obj


_STORABLE = set(TORCH_DTYPES.values())


def read_dense_checkpoint(path, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` from .safetensors, .fpk, or .pt/.pth (``torch.load(weights_only=True)`` only).

    ``metadata`` is the source's own string metadata (safetensors ``__metadata__``, a .fpk's metadata), kept by
    :func:`convert_checkpoint`. ``key`` names the state dict inside a nested .pt (else it is found).
    """
    return read_checkpoint(path, key)[:2]


def read_checkpoint(path, key: str | None = None):
    """``(state_dict, metadata, ties)``: :func:`read_dense_checkpoint` plus ``{alias: name}`` of tied tensors (one
    storage in a .pt or a .fpk; equal bytes or ``freezepack.shared`` metadata in a safetensors file, whose
    aliases need not be in the state dict)."""
    path = os.fspath(path)
    if check_regular_file(path) == 0:
        raise FormatError("is empty (0 bytes): not a checkpoint", path=path)
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith((".pt", ".pth", ".bin")) or head[:2] == b"PK" or sniff(head):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad archive; never unpickle anything unsafe
            raise FormatError(f"not a loadable weights-only torch checkpoint: {_first_line(e)}", path=path) from None
        sd = _check_state_dict(obj, path, key)
        return sd, {}, find_ties(sd, by_bytes=False)
    try:
        with fpk_open(path) as f:
            meta = f.metadata()
        sd = _check_state_dict(load(path), path)
        return sd, meta, find_ties(sd, by_bytes=False)
    except FormatError as e:
        if "plain safetensors" not in e.reason and "without a freezepack header" not in e.reason:
            raise
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FormatError(f"not a readable safetensors file: {_first_line(e)}", path=path) from None
    sd = _check_state_dict(sd, path)
    meta = {k: v for k, v in meta.items() if isinstance(v, str)}
    ties = {**find_ties(sd, by_bytes=True), **shared_from_metadata(meta, sd, path)}
    for alias in ties:  # a name tied to an alias is tied to that alias' target (one stored tensor)
        while ties[alias] in ties and ties[alias] != alias:
            ties[alias] = ties[ties[alias]]
    meta.pop(SHARED_KEY, None)  # the output stores the ties themselves
    return sd, meta, ties


def _init_for(name: str, shape, default, inits: dict | None):
    choice = (inits or {}).get(name, default)
    if choice is None:
        return None
    if isinstance(choice, InitSpec):
        return choice
    if isinstance(choice, (tuple, list)):
        return make_init(choice[0], shape, **dict(choice[1]))
    if len(shape) < 2 and choice in _FAN_INITS:
        return None  # fan-based initializers need >= 2 dimensions; such tensors can still be 'pruned'
    return make_init(choice, shape)


_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.view(_BITS[a.dtype]) == b.view(_BITS[b.dtype])


_SCALE_SAMPLE = 1 << 16  # entries whose ratios vote for the factor (a strided sample: no sort of the whole tensor)


def _likely_scale(t: torch.Tensor, regen: torch.Tensor, matched: int) -> float | None:
    """FreezeNet-WD shrinks every frozen entry by one f32 factor: the most common ratio dense / initial is it.

    ``matched``: entries already equal at factor 1. When they are half the tensor or more, no other factor can
    explain more (an entry equals ``regen * s`` for two factors only where ``regen`` is 0), so none is sought.
    The vote runs on an evenly strided sample; whatever factor wins is then checked on every entry by the caller,
    so a poor sample costs file bytes, never exactness."""
    n = t.numel()
    if 2 * matched >= n:
        return None
    step = max(1, n // _SCALE_SAMPLE)
    ts, rs = t.reshape(-1)[::step], regen.reshape(-1)[::step]
    nz = rs != 0
    if not bool(nz.any()):
        return None
    ratio = ts[nz] / rs[nz]
    ratio = ratio[torch.isfinite(ratio)]
    if ratio.numel() == 0:
        return None
    values, counts = torch.unique(ratio, return_counts=True)
    s = float(values[int(counts.argmax())])
    return s if s not in (0.0, 1.0) and int(counts.max()) * 2 > ratio.numel() // 10 else None


def _whole_bytes_floor(t: torch.Tensor) -> float:
    """A lower bound of the bytes any writer stores ``t`` in as a whole tensor, from one cheap histogram.

    Every whole coding (v1 raw; v2 planes, cast, codebook) stores at least the order-0 entropy of the values:
    per-plane static models add up to at least the joint entropy, a codebook's indices carry it, raw bytes exceed
    it. The values' entropy is at least that of any function of them, here their top byte (sign and exponent).
    rANS with a static model emits at least the empirical entropy less under 0.006 bits a symbol (state >= 2^32,
    frequencies < 2^24: each step loses at most -log2(1 - 2^-8)) and a final state; the margins cover both."""
    n, elem = t.numel(), t.element_size()
    if n == 0:
        return 0.0
    raw = np.frombuffer(tensor_bytes(t), np.uint8)
    counts = np.zeros(256, np.int64)
    step = 1 << 22
    for lo in range(0, n, step):  # chunks: bincount copies its input to intp
        counts += np.bincount(raw[lo * elem + elem - 1:min(n, lo + step) * elem:elem], minlength=256)
    p = counts[counts > 0] / n
    bits = float(-(p * np.log2(p)).sum())
    return n * (0.99 * bits - 0.006) / 8 - 512


def _cheaper_frozen(name: str, ft: FrozenTensor, t: torch.Tensor, seed: int, version: int | None) -> bool:
    """Is ``ft`` (frozen) smaller in a file than ``t`` (whole)? Both forms are encoded for real by the version's
    writer (one-tensor files: the fixed overhead cancels out), so no version's cost model is restated here; the
    whole form only when the frozen one is not already below :func:`_whole_bytes_floor` (same answer, cheaper)."""
    version = DEFAULT_VERSION if version is None else version
    as_frozen = sum(map(len, encode_record(FreezeRecord(seed=seed, frozen={name: ft}), version=version)))
    if as_frozen < _whole_bytes_floor(t):
        return True
    as_whole = sum(map(len, encode_record(FreezeRecord(seed=seed, whole={name: t}), version=version)))
    return as_frozen < as_whole


def _stream_names(sd: dict[str, torch.Tensor], ties: dict[str, str], seed: int, init, inits) -> dict[str, str]:
    """Re-root tied groups on the name whose generator stream explains the tensor best: a FreezeNet froze a tied
    tensor under one of its names (``transformer.wte.weight``), which need not be the first in the file (a
    safetensors file sorts ``lm_head.weight`` first)."""
    groups: dict[str, list[str]] = {}
    for alias, root in ties.items():
        groups.setdefault(root, [root]).append(alias)
    out = {}
    for root, names in groups.items():
        t = sd[root].detach().cpu().contiguous()
        best, best_count = root, -1
        if t.dtype in _BITS and t.numel():
            for name in names:
                spec = _init_for(name, tuple(t.shape), init, inits)
                if spec is not None:
                    count = int(_same_bits(t, generate(spec, tuple(t.shape), seed, name).to(t.dtype)).sum())
                    if count > best_count:
                        best, best_count = name, count
        out.update({n: best for n in names if n != best})
    return out


def convert_record(state_dict: dict[str, torch.Tensor], seed: int, init="xavier_normal", inits=None,
                   progress=None, version: int | None = None,
                   ties: dict[str, str] | None = None, threads: int | None = None) -> tuple[FreezeRecord, list[dict]]:
    """Find, per float tensor, the entries that equal the regenerated initial values (frozen; also when all of
    them were scaled by one factor, as FreezeNet-WD's weight decay does) or zero (pruned). In a float16 or
    bfloat16 tensor the initial values are the generator's float32 values rounded to it (spec/FORMAT.md), as a
    reduced-precision FreezeNet holds them. ``ties`` (``{alias: name}``): names stored once, as an alias.

    Each tensor is stored in whichever exact form costs the fewest file bytes (header included): frozen with the
    explanation that leaves the fewest trained values, or whole. ``init``: initializer name used for every
    tensor; ``inits``: per-name override (a name, (name, params) or an InitSpec; ``None`` = store whole). A name
    in ``inits`` that is not in ``state_dict`` is a UsageError (a typo would otherwise silently do nothing).
    ``threads``: tensors converted at once (default torch's CPU threads); the record is the same for any count.
    """
    seed = check_seed(seed)
    unknown = sorted(set(inits or {}) - set(state_dict))
    if unknown:
        known = ", ".join(list(state_dict)[:8]) + (", ..." if len(state_dict) > 8 else "")
        raise UsageError(f"--init-for names tensors the checkpoint does not have: {', '.join(unknown)} "
                         f"(it has: {known})")
    rec = FreezeRecord(seed=seed, aliases=_stream_names(state_dict, ties or {}, seed, init, inits))

    def one(name: str, t: torch.Tensor) -> tuple[dict, FrozenTensor | None, torch.Tensor | None]:
        """(report row, the frozen form or None, the whole tensor or None) of one tensor."""
        if name in rec.aliases:  # one tensor under two names: stored (and coded) once
            return ({"name": name, "shape": list(t.shape), "numel": t.numel(), "stored_as": "alias",
                     "of": rec.aliases[name], "trainable": 0, "matched": None}, None, None)
        t = t.detach().cpu().contiguous()
        # "matched": entries equal to the regenerated initializer; None: no initializer was tried
        row: dict[str, Any] = {"name": name, "shape": list(t.shape), "numel": t.numel(), "stored_as": "whole",
                               "trainable": t.numel(), "matched": None}
        best = None
        if t.dtype in _BITS and t.numel() > 0:
            candidates = []
            spec = _init_for(name, tuple(t.shape), init, inits)
            if spec is not None:
                candidates.append(("frozen", spec))
            candidates.append(("pruned", make_init("zeros", tuple(t.shape))))
            for label, spec in candidates:
                # rounded as a reader rounds; one generator thread: the tensors are converted in parallel
                regen = generate(spec, tuple(t.shape), seed, name, threads=1 if nthreads > 1 else None).to(t.dtype)
                scale: float | None = 1.0
                while scale is not None:
                    cand = regen if scale == 1.0 else regen * scale  # one f32 multiply, as the loader does
                    same = _same_bits(t, cand)
                    k = int(t.numel() - same.sum())
                    if best is None or k < best[2]:
                        best = (label, spec, k, ~same, scale)
                    if label == "frozen":
                        row["matched"] = max(row["matched"] or 0, t.numel() - k)
                    # then the one other factor worth a try (FreezeNet-WD trains float32 models)
                    scale = _likely_scale(t, regen, t.numel() - k) if (
                        scale == 1.0 and label == "frozen" and t.dtype == torch.float32) else None
        if best is not None and best[2] < t.numel():
            label, spec, k, mask, scale = best
            ft = FrozenTensor(spec, mask, t[mask].clone(), scale)
            if _cheaper_frozen(name, ft, t, seed, version):
                row.update(stored_as=label, trainable=k, init=spec.name, q=1 - k / t.numel())
                if scale != 1.0:
                    row["frozen_scale"] = scale
                return row, ft, None
        return row, None, t

    # One task per tensor on every core (generating, comparing and trial-encoding release the GIL); results and
    # the first error in file order, so the record never depends on the thread count.
    nthreads = thread_count(threads)
    names = list(state_dict)
    done = None if progress is None else (lambda i: progress(i + 1, len(names)))
    results = run_ordered([(state_dict[n].numel(), partial(one, n, state_dict[n])) for n in names], nthreads, done)
    report = []
    for name, (row, ft, whole) in zip(names, results):
        if ft is not None:
            rec.frozen[name] = ft
        elif whole is not None:
            rec.whole[name] = whole
        report.append(row)
    return rec, report


def _hints(rows: list[dict], state_dict, seed, init, file_bytes: int, dense: int) -> list[str]:
    """What a user should hear when a conversion is exact but not what they hoped for."""
    hints = []
    candidates = [r for r in rows if r["matched"] is not None]
    total = sum(r["numel"] for r in candidates)
    matched = sum(r["matched"] for r in candidates)
    if total and matched < LOW_MATCH * total:
        hints.append(f"only {matched} of {total} float32 entries ({matched / total:.1%}) equal the initial values "
                     f"regenerated from seed {seed} and --init {init}: the seed or the initializer is probably "
                     "wrong (or the model was not trained by freezing); the file is exact but barely smaller")
    if file_bytes >= dense:
        hints.append(f"the .fpk is larger than the dense tensors ({file_bytes} vs {dense} bytes): little or nothing "
                     "was frozen")
    return hints


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included), compared in place without copies."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.array_equal(np.asarray(tensor_bytes(a)), np.asarray(tensor_bytes(b)))


def convert_checkpoint(src, dst, seed: int, init="xavier_normal", inits=None, metadata=None,
                       progress=None, *, make_parents: bool = False, version: int | None = None,
                       values: str | None = None, key: str | None = None, lossy_whole: bool = False,
                       threads: int | None = None) -> dict:
    """Dense checkpoint (``.safetensors``, ``.pt``/``.pth``, ``.fpk``) + seed + initializer(s) -> an exact .fpk.

    The source's own metadata is kept (``metadata`` entries override it). The file is written to a temporary
    file, read back and compared with the checkpoint bit for bit, and only then renamed over ``dst``: a failed
    proof publishes nothing. Returns a report: per tensor what was found and how its values are coded, the sizes,
    and ``hints`` (e.g. when almost nothing matched: a wrong seed or initializer). Tied tensors (one storage in a
    .pt or .fpk, equal bytes in a safetensors file) are stored once. ``key``: the state dict's entry in a nested
    .pt (else found). ``values``: opt-in lossy coding of the trained values of frozen tensors (as
    :func:`freezepack.save`); a tensor that is mostly trained (a dense tensor, or one whose zeros only looked
    pruned) stays exact unless ``lossy_whole``, which codes every float tensor of >= 2 dimensions, whole ones
    too. The proof then compares with the checkpoint holding exactly those quantized values.
    """
    from .method.quantize import ValueCoding

    coding = ValueCoding.parse(values) if values is not None else None
    coding = None if coding is None or coding.lossless else coding
    if coding is not None and (DEFAULT_VERSION if version is None else version) != 2:
        raise UsageError(f"lossy values ({coding}) need format version 2 (its value coders store them compactly)")
    sd, source_meta, ties = read_checkpoint(src, key)
    meta = {**source_meta, **(metadata or {})}
    for k, v in meta.items():
        if not (isinstance(k, str) and isinstance(v, str) and valid_text(k) and valid_text(v)):
            raise UsageError(f"metadata {k!r}={v!r} is not valid Unicode text")
    # progress: every tensor converted, then coded, then proven (total = 3x the tensors)
    steps = len(sd)
    phase = (lambda k: None) if progress is None else (lambda k: lambda done, _: progress(k * steps + done, 3 * steps))
    rec, rows = convert_record(sd, seed, init, inits, phase(0), version, ties, threads)
    expected = dict(sd)
    if coding is not None:  # quantize once; the file must reproduce the checkpoint with these values
        _quantize_record(rec, rows, sd, expected, coding, lossy_whole)
        before = meta.get(VALUES_KEY)  # as save() records it: a re-coding is a second step
        last = before.rpartition(", then ")[2] if before else None
        meta[VALUES_KEY] = str(coding) if before is None else \
            before if last == str(coding) else f"{before}, then {coding}"
    order = [n for n in sd if n not in rec.aliases] + [n for n in sd if n in rec.aliases]  # targets first
    order += [a for a in rec.aliases if a not in sd]
    for alias, target in rec.aliases.items():  # a tied name holds its target's (possibly quantized) tensor
        expected[alias] = expected[target]
    chunks = encode_record(rec, order, meta, version=version, progress=phase(1))
    size = sum(len(c) for c in chunks)

    def prove(tmp):  # tensor by tensor: never a second dense copy of the model
        proven = phase(2) or (lambda done, total: None)
        try:
            with fpk_open(tmp) as back:
                for i, (name, t) in enumerate(expected.items()):
                    if name not in back or not _identical(back.get_tensor(name), t.detach().cpu()):
                        raise IntegrityError("not written: the converted file does not reproduce the checkpoint",
                                             path=dst, tensor=name)
                    proven(min(i + 1, steps), steps)
        except IntegrityError:
            raise
        except FreezepackError as e:
            raise IntegrityError(f"not written: the converted file would be refused by its reader: {e.reason}",
                                 path=dst, tensor=e.tensor) from None

    atomic_write(dst, chunks, validate=prove, make_parents=make_parents)
    dense = sum(v.numel() * v.element_size() for n, v in sd.items() if n not in rec.aliases)
    return {"source": os.fspath(src), "output": os.fspath(dst), "seed": int(seed), "tensors": rows,
            "dense_bytes": dense, "file_bytes": size, "compression_factor": dense / size if size else 0.0,
            "metadata": meta, "hints": _hints(rows, sd, seed, init, size, dense) + _values_hint(rows, coding),
            "values": None if coding is None else str(coding), "ties": dict(rec.aliases)}


MOSTLY_TRAINED = 0.5  # above this share of trained entries a tensor is a dense one: lossy only when asked


def _quantize_record(rec: FreezeRecord, rows: list[dict], sd, expected: dict, coding, lossy_whole: bool) -> None:
    """Quantize the trained values of frozen tensors (and, with ``lossy_whole``, whole float tensors of >= 2
    dims) in place; each report row gets ``values``: the coding applied, or ``exact`` and why."""
    from .method.quantize import quantize

    for row in rows:
        name = row["name"]
        if row["stored_as"] == "alias":
            row["values"] = f"as {row['of']}"
            continue
        ft, t = rec.frozen.get(name), rec.whole.get(name)
        if ft is not None and ft.values.numel():
            share = ft.values.numel() / ft.mask.numel()
            if share > MOSTLY_TRAINED and not lossy_whole:
                row.update(values="exact", why=f"{share:.0%} of its entries are trained values: a dense tensor "
                           "(lossy only with --lossy-whole)")
                continue
            ft.values = quantize(ft.values, coding, name)[0]
            dense = sd[name].detach().cpu().clone()
            dense.view(-1)[ft.mask.reshape(-1)] = ft.values.to(dense.dtype)
            expected[name] = dense
            row["values"] = str(coding)
        elif t is not None and lossy_whole and t.is_floating_point() and t.dim() >= 2 and t.numel():
            rec.whole[name] = expected[name] = quantize(t.reshape(-1), coding, name)[0].reshape(t.shape)
            row["values"] = str(coding)
        else:
            row.update(values="exact", why="stored whole (lossy only with --lossy-whole, for tensors of >= 2 dims)"
                       if ft is None else "no trained values")


def _values_hint(rows: list[dict], coding) -> list[str]:
    """Say what --values did: which tensors it coded, and when it coded none (a wrongly seeded or dense
    checkpoint), rather than let a mostly lossless file look quantized."""
    if coding is None:
        return []
    coded = [r["name"] for r in rows if r.get("values") == str(coding)]
    kept = [r["name"] for r in rows if r.get("values") == "exact" and "dense tensor" in r.get("why", "")]
    hints = []
    if not coded:
        hints.append(f"--values {coding} changed nothing: it quantizes the trained values of frozen tensors, and no "
                     "tensor was found frozen (only tensors whose other entries equal the regenerated initial values "
                     "are)")
    if kept:
        hints.append(f"{len(kept)} mostly trained tensor(s) kept exact ({', '.join(kept[:3])}"
                     f"{', ...' if len(kept) > 3 else ''}): --lossy-whole codes them too")
    return hints


def convert(src, dst, seed: int, init: str = "xavier_normal", inits: dict[str, str] | None = None,
            metadata: dict[str, str] | None = None, progress=None, *, version: int | None = None,
            values: str | None = None, key: str | None = None, lossy_whole: bool = False,
            threads: int | None = None) -> dict:
    """Dense checkpoint + seed + initializer(s) -> the smallest exact .fpk, proven before it is published.

    ``freezepack.convert``; see :func:`convert_checkpoint` for the report it returns. ``threads``: tensors
    converted at once (default torch's CPU threads); the file is byte-identical for any count.
    """
    return convert_checkpoint(src, dst, seed, init, inits, metadata, progress, version=version, values=values,
                              key=key, lossy_whole=lossy_whole, threads=threads)
