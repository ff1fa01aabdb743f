"""save / load / load_into / open / verify / inspect (and convert): the .fpk files as a user sees them.

Composes the layers below: ``init`` regenerates frozen values straight on the target device, ``maskcode`` turns
masks into bytes and back, ``container`` owns the file layout and checks every untrusted number.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch

from ._version import __version__
from .errors import FormatError, FreezepackError, IntegrityError, MethodError, SpecError, UsageError
from .format import compact, container, entropy, maskcode
from .format.container import DEFAULT_LIMITS, Entry, FpkReader, Header, Limits
from .format.init import InitSpec, generate
from .format.record import FROZEN_TORCH_DTYPES, FreezeRecord, FrozenTensor, reconstruct
from .format.rng import SPEC_VERSION, check_seed

DEFAULT_VERSION = 2  # the format save() writes (spec/FORMAT.md §12; 1: §1-11)

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
PathLike = str | os.PathLike[str]
Device = str | torch.device | None
Progress = Callable[[int, int], None]  # progress(done, total)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a CPU tensor in C order, without a copy when already contiguous."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dense little-endian C-order bytes (what the header's per-tensor ``sha256`` holds)."""
    return hashlib.sha256(tensor_bytes(t.cpu())).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------------------

def _record_of(obj) -> tuple[FreezeRecord, list[str], dict[str, torch.Tensor]]:
    """(record, tensor order, the dense tensors the file must reproduce)."""
    if isinstance(obj, FreezeRecord):
        order = list(obj.frozen) + [k for k in obj.whole if k not in obj.frozen]
        return obj, order + [k for k in obj.aliases if k not in order], {}
    if isinstance(obj, torch.nn.Module):
        from .method.freezenet import dense_state_dict, freeze_record, unwrap  # the method: only for a module

        model = unwrap(obj)
        rec = freeze_record(model)
        # What the model computes with, right now: the file is proven against these before it is published.
        truth = dense_state_dict(model)
        names = list(rec.frozen) + list(rec.whole) + list(rec.aliases)
        order = [k for k in truth if k in set(names)]
        return rec, order + [k for k in names if k not in order], truth
    raise UsageError(f"save() takes a FreezeRecord or an nn.Module, got {type(obj).__name__}")


def _check_metadata(metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in metadata.items()):
        raise UsageError("metadata must be a dict of str -> str")
    bad = [x for kv in metadata.items() for x in kv if not container._valid_text(x)]
    if bad:
        raise UsageError(f"metadata text {bad[0]!r} is not valid Unicode (a lone surrogate?): it cannot be stored")
    return dict(metadata)


def _frozen_entry(name: str, ft: FrozenTensor, seed: int, blobs: dict, truth: torch.Tensor | None,
                  coding=None) -> Entry:
    if not isinstance(ft.init, InitSpec):
        raise UsageError("init must be an InitSpec (freezepack.format.init.make_init)", tensor=name)
    values = ft.values.detach().cpu().reshape(-1)
    dtype = FROZEN_TORCH_DTYPES.get(values.dtype)
    if dtype is None:
        raise UsageError(f"values must be float32, float16 or bfloat16, got {values.dtype}", tensor=name)
    scale = float(ft.frozen_scale)
    exact = torch.tensor(scale, dtype=torch.float64).to(values.dtype).double().item() == scale
    if not math.isfinite(scale) or not exact or float(np.float32(scale)) != scale:
        raise UsageError(f"frozen_scale {ft.frozen_scale!r} is not a finite float32 number exactly representable "
                         f"in {dtype}", tensor=name)
    mask = ft.mask.detach().cpu()
    if mask.dtype != torch.bool:
        raise UsageError(f"mask must be a bool tensor, got {mask.dtype}", tensor=name)
    k = int(mask.sum())
    if values.numel() != k:
        raise UsageError(f"values must be {k} numbers (one per True in the mask), got {values.numel()}",
                         tensor=name)
    if ft.stream is not None and (not isinstance(ft.stream, str) or not ft.stream
                                  or not container._valid_text(ft.stream)):
        raise UsageError(f"stream must be a non-empty string, got {ft.stream!r}", tensor=name)
    hint = {}
    if coding is not None and k:  # lossy values: the file must reproduce the model with *these* values
        from .method.quantize import quantize

        values, hint = quantize(values, coding, name)
        ft = dataclasses.replace(ft, values=values)
        if truth is not None:
            truth = truth.detach().cpu().clone()
            truth.view(-1)[mask.reshape(-1)] = values.to(truth.dtype)
    coded = maskcode.encode(mask.numpy())
    dense = truth if truth is not None else ft.dense(seed, name, device="cpu")
    if tuple(dense.shape) != tuple(mask.shape) or dense.dtype != values.dtype:
        raise MethodError(f"the model's tensor is {dense.dtype} {list(dense.shape)} but its frozen record is "
                          f"{values.dtype} {list(mask.shape)}", tensor=name)
    e = Entry(name, "frozen", tuple(mask.shape), dtype, digest(dense), init=ft.init, frozen_scale=scale,
              trainable=k, coder=coded.coder, coder_params=dict(coded.params),
              stream=None if ft.stream in (None, name) else ft.stream)
    if coded.payload.size:
        e.mask = name + container.MASK_SUFFIX
        blobs[e.mask] = ("U32", (int(coded.payload.size),), coded.payload.astype("<u4").tobytes())
    if k:
        e.values = name + container.VALUES_SUFFIX
        blobs[e.values] = (dtype, (k,), bytes(tensor_bytes(values))) + ((hint,) if hint else ())
    return e


def _whole_entry(name: str, t: torch.Tensor, blobs: dict) -> Entry:
    if not isinstance(t, torch.Tensor):
        raise UsageError(f"whole tensors must be torch tensors, got {type(t).__name__}", tensor=name)
    if t.layout != torch.strided or t.is_quantized:
        raise UsageError(f"a {t.layout} tensor cannot be stored; convert it to a dense tensor first", tensor=name)
    t = t.detach().cpu()
    if t.dtype not in DTYPE_NAMES:
        raise UsageError(f"dtype {t.dtype} cannot be stored", tensor=name)
    data = bytes(tensor_bytes(t))
    if t.dtype == torch.bool and data and max(data) > 1:  # a reader refuses such bytes (FORMAT.md §3)
        raise UsageError("BOOL tensor holds a byte other than 0 or 1 (a bool tensor made by .view(torch.bool)?)",
                         tensor=name)
    blobs[name] = (DTYPE_NAMES[t.dtype], tuple(t.shape), data)
    return Entry(name, "whole", tuple(t.shape), DTYPE_NAMES[t.dtype], hashlib.sha256(data).hexdigest(), data=name)


VALUES_KEY = "freezepack.values"  # metadata: the lossy values coding a file was written with (absent: lossless)


def encode_record(record: FreezeRecord, order: list[str] | None = None, metadata=None,
                  truth: dict[str, torch.Tensor] | None = None, version: int | None = None,
                  values: str | None = None) -> list:
    """The byte chunks of the .fpk file for ``record`` (deterministic: same record -> same bytes).

    ``truth``: the dense tensors the file must reproduce (a module's weights as its forward pass uses them).
    Their digests go into the header, so a reader's check compares its reconstruction with *them*, not with a
    second reconstruction; without it the record's own reconstruction is hashed. ``version``: file format 1
    (spec/FORMAT.md §1-11) or 2 (§12, compact); default :data:`DEFAULT_VERSION`. ``values``: opt-in lossy coding
    of the trained values (:mod:`freezepack.method.quantize`: ``f16``, ``bf16``, ``int8``, ``kmeans:K``,
    ``uniform:K``); default lossless. It is recorded in the metadata as ``freezepack.values``.
    """
    version = DEFAULT_VERSION if version is None else version
    if version not in (1, 2):
        raise UsageError(f"format version must be 1 or 2, got {version!r}")
    coding = None
    metadata = _check_metadata(metadata)
    if values is not None:
        from .method.quantize import ValueCoding

        coding = ValueCoding.parse(values)
        if coding.lossless:
            coding = None
        elif version != 2:
            raise UsageError(f"lossy values ({coding}) need format version 2 (its value coders store them compactly)")
        else:
            # Re-coding a lossy file (convert): both steps are recorded, but the same coding again is one step (the
            # quantizers keep values they already produced, so it changes nothing).
            before = metadata.get(VALUES_KEY)
            last = before.rpartition(", then ")[2] if before else None
            metadata[VALUES_KEY] = str(coding) if before is None else \
                before if last == str(coding) else f"{before}, then {coding}"
    seed = check_seed(record.seed)
    truth = truth or {}
    if record.spec_version != SPEC_VERSION:
        raise SpecError(f"record uses generator {record.spec_version!r}; this writer knows {SPEC_VERSION!r}")
    if order is None:
        order = list(record.frozen) + [k for k in record.whole if k not in record.frozen]
        order += [k for k in record.aliases if k not in order]
    both = set(record.frozen) & set(record.whole)
    if both:
        raise UsageError(f"tensors both frozen and whole: {', '.join(sorted(both))}")
    blobs: dict = {}
    entries = []
    for name in order:
        if not isinstance(name, str) or not name or name == "__metadata__" or not container._valid_text(name):
            raise UsageError(f"invalid tensor name {name!r} (empty, reserved, or not valid Unicode text)")
        if name in record.aliases:
            target = record.aliases[name]
            first = next((e for e in entries if e.name == target), None)
            if first is None:
                raise UsageError(f"alias of {target!r}, which is not an earlier tensor", tensor=name)
            entries.append(Entry(name, "alias", first.shape, first.dtype, first.sha256, of=target))
        elif name in record.frozen:
            entries.append(_frozen_entry(name, record.frozen[name], seed, blobs, truth.get(name), coding))
        else:
            entries.append(_whole_entry(name, record.whole[name], blobs))
    keys = [e.data for e in entries if e.data] + [k for e in entries for k in (e.mask, e.values) if k]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise UsageError(f"stored tensor names collide: {', '.join(dup)} (a whole tensor named like another "
                         f"tensor's '{container.VALUES_SUFFIX}'/'{container.MASK_SUFFIX}' part)")
    header = Header(seed=seed, entries=entries, metadata=metadata,
                    producer=f"freezepack {__version__}")
    if version == 2:
        return compact.encode_file(header, blobs)
    return container.encode_file(header, blobs)


def _prove(tmp_path: str, target) -> None:
    """Read the written temp file back as any reader will, before it is published: every tensor must decode,
    and every reconstruction must match the digest of what the model holds in memory."""
    report = verify(tmp_path)
    bad = [t for t in report["tensors"] if not t["ok"]]
    if bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        why = (". The weights in memory differ from what seed + initializer + stream regenerate (frozen values "
               "changed in place, or frozen by other means)" if "digest" in first["error"] else "")
        raise MethodError(f"not saved: the file would not reproduce the model in memory: {first['error']}{more}{why}",
                          path=target, tensor=first["name"])


def _refuse_nonfinite(record: FreezeRecord, obj, path) -> None:
    """Trained numbers that are NaN or infinite are a diverged run, not a model: refuse to publish one silently.
    Checked: the trained values of frozen tensors, and the whole tensors that are a module's parameters (buffers
    such as attention masks may hold -inf by design)."""
    trained = {n: ft.values for n, ft in record.frozen.items()}
    if isinstance(obj, torch.nn.Module):
        from .method.freezenet import unwrap

        params = {n.replace("parametrizations.", "").removesuffix(".original")
                  for n, _ in unwrap(obj).named_parameters(remove_duplicate=False)}
        trained.update({n: t for n, t in record.whole.items() if n in params})
    for name, t in trained.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise MethodError(f"{bad} trained value(s) are NaN or infinite (a diverged run?): not saved; pass "
                              "allow_nonfinite=True to store them anyway", path=path, tensor=name)


def save(path: PathLike, record_or_module: FreezeRecord | torch.nn.Module,
         metadata: dict[str, str] | None = None, *, version: int | None = None, values: str | None = None,
         allow_nonfinite: bool = False) -> None:
    """Write a FreezeNet to ``path`` (.fpk) atomically, proven before it is published.

    ``record_or_module``: an ``nn.Module`` frozen by freezepack (wrappers such as DataParallel/DDP/``torch.compile``
    are looked through; tied weights are stored once) or a :class:`freezepack.format.record.FreezeRecord`.
    Before the rename the temp file is read back and every tensor regenerated and compared bit for bit with the
    model in memory; any difference is a :class:`MethodError` naming the tensor, and nothing is written.
    ``metadata``: a small str -> str map. ``version``: file format (1 or 2), default :data:`DEFAULT_VERSION`.
    ``values``: opt-in **lossy** coding of the trained values (``"bf16"``, ``"f16"``, ``"int8"``, ``"kmeans:K"``,
    ``"uniform:K"``; see :mod:`freezepack.method.quantize`), default lossless. The model in memory is not changed;
    the file holds (and is proven against) the model with quantized values, and records the coding.
    NaN or infinite trained values are refused (a :class:`MethodError`) unless ``allow_nonfinite``.
    """
    record, order, truth = _record_of(record_or_module)
    if not allow_nonfinite:
        _refuse_nonfinite(record, record_or_module, os.fspath(path))
    chunks = encode_record(record, order, metadata, truth, version, values)
    container.atomic_write(path, chunks, validate=lambda tmp: _prove(tmp, os.fspath(path)))


# ---------------------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------------------

def _check_device(device):
    """A bad or absent device is the caller's input error: say so plainly instead of failing mid-load."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"{device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available here")
    return dev


@contextmanager
def _timed(timings: dict | None, key: str):
    if timings is None:
        yield
        return
    t0 = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def _frozen_parts(r: FpkReader, e: Entry, device, timings: dict | None = None, out: torch.Tensor | None = None):
    """``(idx, values, G)`` of a frozen entry: the trainable positions (None when nothing is trainable), their
    stored values, and the generator's float32 output ``G`` when decoding needed it (a v2 ``ans-ctx`` mask is
    conditioned on |G|; ``G`` lands in ``out`` when given), else None."""
    with _timed(timings, "read"):
        mask_words = r.read_array(e.mask, "<u4", e.name) if e.mask else np.zeros(0, np.uint32)
        values = r.read_bytes(e.values, e.name) if e.values else None
    if not e.trainable:
        return None, None, None
    vals = torch.frombuffer(values, dtype=TORCH_DTYPES[e.dtype])
    generated = keys = None
    with _timed(timings, "decode"):
        if e.trainable == e.numel:
            return torch.arange(e.numel), vals, None
        if e.coder == "ans-ctx":
            with _timed(timings, "generate"):
                generated = generate(e.init, e.shape, r.header.seed, e.stream_key, device=device, out=out)
            keys = entropy.context_keys(generated.detach().cpu().numpy())
        idx = torch.from_numpy(compact.mask_indices(e, mask_words, keys, where=r.path))
    return idx, vals, generated


def _check_digest(r: FpkReader, e: Entry, t: torch.Tensor) -> None:
    if not container.digest_ok(e.sha256, digest(t)):
        raise IntegrityError("regenerated tensor does not match its digest: not bit-exact on this device "
                             f"({t.device}) or the file was written from a different generator", path=r.path,
                             tensor=e.name)


def _materialize(r: FpkReader, e: Entry, device, check: bool, timings: dict | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """One dense tensor from an open file; with ``check``, its bytes are compared with the stored digest."""
    path = r.path
    if e.kind == "alias":  # a tied tensor: its target's values (load() returns one object for both names)
        e = next(x for x in r.header.entries if x.name == e.of)
    if device is not None and device.type == "meta" and out is None:  # shapes and dtypes only: nothing is read
        return torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype], device="meta")
    container.check_memory(container.work_bytes(e) + (container.dense_bytes(e) if out is None else 0),
                           "reconstructing this tensor", r.limits, device if out is None else out.device, path,
                           e.name)
    if e.kind == "whole":
        with _timed(timings, "read"):
            dtype = TORCH_DTYPES[e.dtype]
            if e.numel == 0:
                t = torch.empty(e.shape, dtype=dtype)
            else:
                t = torch.frombuffer(r.read_bytes(e.data, e.name), dtype=dtype).reshape(e.shape)
        with _timed(timings, "copy"):
            if out is not None:
                return out.copy_(t)
            return t.to(device) if device is not None else t
    dtype = TORCH_DTYPES[e.dtype]
    f32_out = out if out is not None and dtype == torch.float32 else None
    idx, vals, generated = _frozen_parts(r, e, device if f32_out is None else None, timings, out=f32_out)
    with _timed(timings, "generate"):
        t = reconstruct(e.init, e.shape, r.header.seed, e.stream_key, dtype, e.frozen_scale, idx, vals,
                        device=device, out=f32_out, generated=generated)
    if out is not None and t is not out:
        t = out.copy_(t)
    if check:
        with _timed(timings, "digest"):
            _check_digest(r, e, t)
    return t


def load(path: PathLike, device: Device = None, *, verify: bool = True, limits: Limits = DEFAULT_LIMITS,
         timings: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Dense state_dict of a .fpk file; frozen parts are regenerated straight on ``device``.

    Stored bytes are always checked against their digests. With ``verify`` (default) every reconstructed tensor is
    checked too (a device->host copy per tensor on GPUs). ``timings``: pass a dict to get seconds per phase.
    """
    device = _check_device(device)
    with FpkReader(path, limits) as r:
        entries = r.header.entries
        container.check_memory(sum(map(container.dense_bytes, entries)) + max(map(container.work_bytes, entries),
                                                                              default=0),
                               f"loading all {len(entries)} tensors", limits, device, r.path)
        if not verify:
            out = {}
            for e in r.header.entries:  # a tied name is the same tensor object, as in torch's state_dict
                out[e.name] = out[e.of] if e.kind == "alias" else _materialize(r, e, device, False, timings)
            return out
        # Hash tensor i on a worker thread while tensor i+1 is regenerated (hashlib releases the GIL).
        from concurrent.futures import ThreadPoolExecutor

        out, pending = {}, []
        with ThreadPoolExecutor(max_workers=1) as pool:
            for e in r.header.entries:
                if e.kind == "alias":
                    out[e.name] = out[e.of]
                    continue
                out[e.name] = t = _materialize(r, e, device, False, timings)
                if e.kind == "frozen" and t.device.type != "meta":  # whole: bytes checked when read
                    pending.append((e, pool.submit(digest, t)))
            t0 = time.perf_counter()
            for e, fut in pending:
                if not container.digest_ok(e.sha256, fut.result()):
                    raise IntegrityError("regenerated tensor does not match its digest: not bit-exact on this "
                                         f"device ({out[e.name].device}) or the file was written from a different "
                                         "generator", path=r.path, tensor=e.name)
            if timings is not None:
                timings["digest_wait"] = timings.get("digest_wait", 0.0) + time.perf_counter() - t0
        return out


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile put these before every name


def _canonical(name: str, prefix_map: dict[str, str] | None) -> str:
    """A name with wrapper prefixes removed and the user's prefix map applied (longest prefix first)."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    for old in sorted(prefix_map or {}, key=len, reverse=True):
        if name.startswith(old):
            return prefix_map[old] + name[len(old):]
    return name


def _match_names(module_names, file_names, prefix_map, path) -> dict[str, str]:
    """``{file name: module name}``: exact names first, else both sides without wrapper prefixes."""
    module_names, file_names = list(module_names), list(file_names)
    if set(file_names) <= set(module_names) and not prefix_map:
        return {n: n for n in file_names}
    canon_mod: dict[str, str] = {}
    for n in module_names:
        c = _canonical(n, None)
        if c in canon_mod:
            raise UsageError(f"the module has two tensors that map to {c!r} ({canon_mod[c]!r}, {n!r})", path=path)
        canon_mod[c] = n
    out = {}
    for n in file_names:
        c = _canonical(n, prefix_map)
        if c in canon_mod:
            out[n] = canon_mod[c]
    return out


def _fit(targets: dict, entries: list[Entry], prefix_map, path, strict: bool):
    """``(match, missing, unexpected)`` of a file's entries against a module's state_dict; with ``strict`` any
    missing or unexpected name is a FormatError."""
    match = _match_names(targets, [e.name for e in entries], prefix_map, path)
    unexpected = [e.name for e in entries if e.name not in match]
    matched = set(match.values())
    tied = _tied_to_loaded(targets, match)
    missing = [k for k in targets if k not in matched and k not in tied]
    if strict and (missing or unexpected):
        raise FormatError(f"does not fit the module: missing {missing[:5]}, unexpected {unexpected[:5]}"
                          f"{_tie_hint(targets, entries, match, missing)}", path=path)
    return match, missing, unexpected


def _tied_to_loaded(targets: dict, match: dict[str, str]) -> dict[str, str]:
    """``{module name: loaded module name}`` for names the file lacks whose tensor *is* one the file fills: a
    module that ties them (an LM head and its embedding) gets them with it, as transformers' loaders do."""
    loaded = {id(targets[n]): n for n in match.values()}
    return {k: loaded[id(t)] for k, t in targets.items() if k not in loaded.values() and id(t) in loaded}


def _tie_hint(targets: dict, entries: list[Entry], match: dict[str, str], missing: list[str]) -> str:
    """A missing tensor shaped like one the file has is usually a tied weight stored once (an LM head)."""
    shapes = {e.shape: match[e.name] for e in entries if e.name in match}
    for k in missing:
        twin = shapes.get(tuple(targets[k].shape))
        if twin is not None and targets[k].dim() >= 2:
            return (f" ({k!r} has the shape of {twin!r}, which the file has: if the model ties them, tie them "
                    "before loading, e.g. transformers' model.tie_weights() or tie_word_embeddings=True in its "
                    "config; strict=False loads the rest)")
    return ""


def _set_tensor(module: torch.nn.Module, name: str, value) -> None:
    mod, _, attr = name.rpartition(".")
    setattr(module.get_submodule(mod), attr, value)


def load_into(module: torch.nn.Module, path: PathLike, *, strict: bool = True, verify: bool = True,
              limits: Limits = DEFAULT_LIMITS,
              prefix_map: dict[str, str] | None = None) -> torch.nn.modules.module._IncompatibleKeys:
    """Fill ``module``'s parameters and buffers from a .fpk in place, regenerating into their own storage.

    Names match exactly, or with the wrapper prefixes ``module.`` / ``_orig_mod.`` stripped on either side, so
    files saved from (or loaded into) DataParallel, DDP and ``torch.compile`` models just work; ``prefix_map``
    (``{"old.prefix.": "new.prefix."}``) renames file tensors. Tied tensors (alias entries) are tied again in
    ``module`` when they are not already. Returns torch's ``(missing_keys, unexpected_keys)`` named tuple; with
    ``strict`` either is an error.
    """
    targets = module.state_dict(keep_vars=True)
    with FpkReader(path, limits) as r:
        entries = r.header.entries
        match, missing, unexpected = _fit(targets, entries, prefix_map, r.path, strict)
        with torch.no_grad():
            for e in entries:
                if e.name not in match:
                    continue
                dst = targets[match[e.name]]
                if tuple(dst.shape) != e.shape:
                    raise FormatError(f"shape {list(e.shape)} does not fit the module's {list(dst.shape)}",
                                      path=r.path, tensor=e.name)
                if e.kind == "alias":
                    src = targets.get(match.get(e.of, ""))
                    if src is not None and src is not dst and isinstance(src, torch.nn.Parameter):
                        _set_tensor(module, match[e.name], src)  # re-tie: one Parameter, as when saved
                        targets[match[e.name]] = src
                    elif src is not None and src is not dst:
                        dst.data.copy_(src.data)
                    continue
                direct = e.kind == "frozen" and dst.dtype == torch.float32 and dst.is_contiguous()
                if direct:
                    _materialize(r, e, dst.device, verify, out=dst.data)
                else:
                    dst.data.copy_(_materialize(r, e, dst.device, verify))
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


def load_freezenet(module: torch.nn.Module, path: PathLike, *, device: Device = None, verify: bool = True,
                   limits: Limits = DEFAULT_LIMITS, prefix_map: dict[str, str] | None = None) -> torch.nn.Module:
    """Make a plain ``module`` the FreezeNet stored in ``path``, ready to train on (resume training).

    Every frozen tensor becomes a FrozenParametrization again (mask, seed, initializer, generator stream and
    FreezeNet-WD scale restored; its trained values are the only Parameter), whole tensors are copied in, tied
    tensors are tied. Saving the result unchanged gives the same file. Names are matched as in :func:`load_into`.
    """
    from torch.nn.utils import parametrize

    from .method.freezenet import FrozenParametrization, guard_save_pretrained

    targets = module.state_dict(keep_vars=True)
    with FpkReader(path, limits) as r:
        entries = r.header.entries
        match, _, _ = _fit(targets, entries, prefix_map, r.path, strict=True)
        tied = _tied_to_loaded(targets, match)  # tied in the module, stored once in the file
        params: dict[str, FrozenParametrization] = {}
        for e in entries:
            name = match[e.name]
            dst = targets[name]
            if e.kind != "alias" and tuple(dst.shape) != e.shape:  # (a tied target may already be re-shaped)
                raise FormatError(f"shape {list(e.shape)} does not fit the module's {list(dst.shape)}",
                                  path=r.path, tensor=e.name)
            dev = dst.device if device is None else _check_device(device)
            mod, _, attr = name.rpartition(".")
            owner = module.get_submodule(mod)
            if e.kind == "alias":
                src = match[e.of]
                if src in params:  # a tied frozen tensor: the same parametrization and values Parameter
                    smod, _, sattr = src.rpartition(".")
                    sowner = module.get_submodule(smod)
                    setattr(owner, attr, torch.nn.Parameter(getattr(sowner, sattr).detach().clone()))
                    parametrize.register_parametrization(owner, attr, params[src], unsafe=True)
                    owner.parametrizations[attr].original = sowner.parametrizations[sattr].original
                elif isinstance(targets[src], torch.nn.Parameter):
                    setattr(owner, attr, targets[src])
                continue
            if e.kind == "whole":
                with torch.no_grad():
                    if dst.device != dev:
                        dst.data = dst.data.to(dev)
                    _materialize(r, e, dev, verify, out=dst.data)
                continue
            if not isinstance(dst, torch.nn.Parameter):
                raise FormatError("a frozen tensor in the file is a buffer in the module, not a parameter",
                                  path=r.path, tensor=e.name)
            # one regeneration and one mask decode give both the frozen buffer (unscaled) and the dense tensor
            idx, vals, g = _frozen_parts(r, e, dev)
            if g is None:
                g = generate(e.init, e.shape, r.header.seed, e.stream_key, device=dev)
            dtype = TORCH_DTYPES[e.dtype]
            frozen = reconstruct(e.init, e.shape, r.header.seed, e.stream_key, dtype, 1.0, None, None, device=dev,
                                 generated=g.clone())
            dense = reconstruct(e.init, e.shape, r.header.seed, e.stream_key, dtype, e.frozen_scale, idx, vals,
                                device=dev, generated=g)
            if verify:
                _check_digest(r, e, dense)
            mask = torch.zeros(e.numel, dtype=torch.bool)
            if idx is not None:
                mask[idx] = True
            p = FrozenParametrization(frozen, mask.view(e.shape), e.init, r.header.seed, e.stream_key)
            if e.frozen_scale != 1.0:
                p.set_frozen_scale(e.frozen_scale)
                p.decay_state.copy_(torch.tensor([e.frozen_scale, 0.0], dtype=torch.float64))
            holders = [n for n, t in targets.items() if t is dst and n != name]
            for other in holders:  # torch set_()s the registered Parameter in place: untie the others first
                omod, _, oattr = other.rpartition(".")
                setattr(module.get_submodule(omod), oattr, torch.nn.Parameter(dst.detach().clone()))
            with torch.no_grad():
                dst.data = dense  # right_inverse takes the trained values from here
            parametrize.register_parametrization(owner, attr, p, unsafe=True)
            params[name] = p
        for name, src in tied.items():  # tie them again, to the frozen parametrization of the name the file has
            if src in params:
                mod, _, attr = name.rpartition(".")
                owner, (smod, _, sattr) = module.get_submodule(mod), src.rpartition(".")
                parametrize.register_parametrization(owner, attr, params[src], unsafe=True)
                owner.parametrizations[attr].original = module.get_submodule(smod).parametrizations[sattr].original
    guard_save_pretrained(module)
    return module


_FRAMEWORKS = {"pt": "pt", "torch": "pt", "pytorch": "pt", "np": "np", "numpy": "np"}


def _safetensors_device(device):
    """safetensors' device argument: a torch device or its name, or a CUDA index (``0`` = ``cuda:0``)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    return device


class TensorSlice:
    """``f.get_slice(name)``, as safetensors gives it: shape and dtype without reading, ``[...]`` for a part.

    A frozen tensor is regenerated whole (its entries come from one generator stream) and then sliced."""

    def __init__(self, f: FpkFile, name: str):
        self._f, self._name, self._e = f, name, f.entry(name)

    def get_shape(self) -> list[int]:
        return list(self._e.shape)

    def get_dtype(self) -> str:
        return self._e.dtype

    def __len__(self) -> int:
        return self._e.shape[0] if self._e.shape else 0

    def __getitem__(self, index):
        return self._f._convert(self._f._tensor(self._name)[index].clone())


class FpkFile:
    """Lazy per-tensor access, a drop-in for ``safetensors.safe_open``: ``with freezepack.safe_open(p, "pt") as f:
    f.get_tensor(k)`` (also ``keys()``, ``get_slice(k)[...]``, ``metadata()``)."""

    def __init__(self, path, framework="pt", device=None, *, verify: bool = True, limits: Limits = DEFAULT_LIMITS):
        fw = _FRAMEWORKS.get(framework) if isinstance(framework, str) else None
        if fw is None:
            raise UsageError(f"framework {framework!r} is not supported (freezepack reads 'pt' = torch, or 'np')",
                             path=path)
        self._framework = fw
        self._device = _check_device(_safetensors_device(device))
        if fw == "np" and self._device is not None and self._device.type != "cpu":
            raise UsageError("framework 'np' gives CPU arrays: leave device unset", path=path)
        self._r = FpkReader(path, limits)
        self._verify = verify
        self._entries = {e.name: e for e in self._r.header.entries}

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def metadata(self) -> dict[str, str]:
        return dict(self._r.header.metadata)

    @property
    def seed(self) -> int:
        return self._r.header.seed

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise KeyError(name)
        return self._entries[name]

    def _tensor(self, name: str) -> torch.Tensor:
        e = self.entry(name)
        if e.kind == "alias":
            e = self.entry(e.of)
        return _materialize(self._r, e, self._device, self._verify)

    def _convert(self, t: torch.Tensor):
        if self._framework == "np":
            if t.dtype == torch.bfloat16:
                raise UsageError("numpy has no bfloat16: read this tensor with framework='pt'", path=self._r.path)
            return t.cpu().numpy()
        return t

    def get_tensor(self, name: str):
        return self._convert(self._tensor(name))

    def get_slice(self, name: str) -> TensorSlice:
        return TensorSlice(self, name)

    def close(self) -> None:
        self._r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def safe_open(path: PathLike, framework: str = "pt", device: Device | int = None, *, verify: bool = True,
              limits: Limits = DEFAULT_LIMITS) -> FpkFile:
    """Open a .fpk lazily, with ``safetensors.safe_open``'s signature (``framework`` ``"pt"`` or ``"np"``;
    ``device`` a torch device, its name, or a CUDA index): the header is read and validated now, each tensor when
    asked for (frozen ones regenerated on ``device`` and checked against their digests)."""
    return FpkFile(path, framework, device, verify=verify, limits=limits)


open = safe_open  # noqa: A001  (the short name, as in safetensors; shadows the builtin inside this module only)


# ---------------------------------------------------------------------------------------------------------------
# verify / inspect
# ---------------------------------------------------------------------------------------------------------------

def verify(path: PathLike, device: Device = None, *, limits: Limits = DEFAULT_LIMITS,
           progress: Progress | None = None) -> dict:
    """Regenerate every tensor and check every digest. Returns a report; ``report["ok"]`` is the verdict.

    ``progress(done, total)`` is called after each tensor.

    A header that cannot be trusted raises (FormatError/IntegrityError/SpecError); a tensor that fails is listed
    with its reason, so one bad tensor does not hide the state of the others.
    """
    results = []
    device = _check_device(device)
    if device is not None and device.type == "meta":
        raise UsageError("cannot verify on the meta device: it holds no values (use device='cpu' or a GPU)")
    with FpkReader(path, limits) as r:
        for i, e in enumerate(r.header.entries):
            try:
                if e.kind != "alias":  # an alias is its target's tensor, checked under the target's name
                    _materialize(r, e, device, True)
                results.append({"name": e.name, "ok": True})
            except FreezepackError as err:
                results.append({"name": e.name, "ok": False, "error": err.reason})
            if progress is not None:
                progress(i + 1, len(r.header.entries))
        lossy = r.header.metadata.get(VALUES_KEY)  # the file is checked against what it holds: say if that is lossy
    bad = [x for x in results if not x["ok"]]
    return {"path": os.fspath(path), "ok": not bad, "tensors": results, "checked": len(results), "failed": len(bad),
            "device": str(torch.device(device)) if device is not None else "cpu", "values": lossy}


def inspect(path: PathLike, *, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Header facts without regenerating anything: per-tensor q, coder, sizes, and the compression factor."""
    with FpkReader(path, limits) as r:
        h = r.header
        rows = []

        def coding(key):  # how a values/whole part is stored (v1: always raw)
            return None if key is None else r._v2.coding(key) if r._v2 is not None else "raw"

        dense_bytes = frozen_elems = frozen_total = 0
        for e in h.entries:
            if e.kind == "alias":
                rows.append({"name": e.name, "kind": "alias", "of": e.of, "shape": list(e.shape), "dtype": e.dtype,
                             "numel": e.numel, "dense_bytes": 0, "stored_bytes": 0})
                continue
            nbytes = e.numel * container.DTYPE_SIZES[e.dtype]
            dense_bytes += nbytes
            row = {"name": e.name, "kind": e.kind, "shape": list(e.shape), "dtype": e.dtype, "numel": e.numel,
                   "dense_bytes": nbytes}
            if e.kind == "frozen":
                frozen_total += e.numel
                frozen_elems += e.numel - e.trainable
                mb = h.stored[e.mask].nbytes if e.mask else 0
                vb = h.stored[e.values].nbytes if e.values else 0
                row.update(stream=e.stream_key, init=e.init.name, dist=e.init.dist, frozen_scale=e.frozen_scale,
                           trainable=e.trainable,
                           q=(1 - e.trainable / e.numel) if e.numel else 1.0, coder=e.coder, mask_bytes=mb,
                           mask_entropy_bytes=round(maskcode.entropy_bytes(e.numel, e.trainable), 1),
                           values_bytes=vb, stored_bytes=mb + vb, values_coding=coding(e.values))
            elif e.kind == "alias":
                row.update(of=e.of, stored_bytes=0, dense_bytes=0)
                dense_bytes -= nbytes
            else:
                row.update(stored_bytes=h.stored[e.data].nbytes, values_coding=coding(e.data))
            rows.append(row)
        return {"path": r.path, "file_bytes": r.file_size, "format_version": h.version, "producer": h.producer,
                "values": h.metadata.get(VALUES_KEY, "f32 (lossless)"),
                "generator": h.generator, "seed": h.seed, "metadata": dict(h.metadata), "tensors": rows,
                "dense_bytes": dense_bytes, "compression_factor": dense_bytes / r.file_size,
                "q": frozen_elems / frozen_total if frozen_total else 0.0,
                "header_bytes": r.data_start if r._v2 is None else  # v2: everything before the first payload
                r.data_start + min((s.start for s in h.stored.values()), default=r.file_size - r.data_start)}

