"""save, and the bytes of a file for a FreezeRecord: what a model becomes on disk, proven before it is published."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..errors import MethodError, SpecError, UsageError
from ..format import maskcode
from ..format.dense import digest, tensor_bytes
from ..format.dtypes import DTYPE_NAMES, FROZEN_TORCH_DTYPES
from ..format.init import InitSpec
from ..format.io import atomic_write
from ..format.model import (
    MASK_SUFFIX,
    VALUES_SUFFIX,
    VERSIONS,
    AliasEntry,
    Entry,
    FrozenEntry,
    Header,
    Parts,
    WholeEntry,
)
from ..format.record import FreezeRecord, FrozenTensor
from ..format.rng import SPEC_VERSION, check_seed
from ..format.strictjson import valid_text
from ..format.writer import DEFAULT_VERSION, encode_file
from ..parallel import run_ordered, thread_count
from .checking import VALUES_KEY, verify
from .materialize import PathLike, Progress

# ---------------------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------------------

def _record_of(obj) -> tuple[FreezeRecord, list[str], dict[str, torch.Tensor]]:
    """(record, tensor order, the dense tensors the file must reproduce)."""
    if isinstance(obj, FreezeRecord):
        order = list(obj.frozen) + [k for k in obj.whole if k not in obj.frozen]
        return obj, order + [k for k in obj.aliases if k not in order], {}
    if isinstance(obj, torch.nn.Module):
        from ..method.freezenet import dense_tensors, freeze_record, frozen_parametrizations, unwrap

        model = unwrap(obj)
        rec = freeze_record(model, copy=False)  # read only here: the model's own masks and values
        # What the model computes with, right now: the file is proven against these before it is published. A
        # frozen tensor is hashed in chunks straight from its parametrization, anything else made dense when its
        # entry is written and dropped after: never a second dense copy of the model, nor of its largest tensor.
        getters = dense_tensors(model)
        for name, p in frozen_parametrizations(model).items():
            if name in rec.frozen and name in getters:
                mod, _, attr = name.rpartition(".")
                owner: Any = model.get_submodule(mod) if mod else model
                values = owner.parametrizations[attr].original
                getters[name] = lambda p=p, v=values, g=getters[name]: _Truth(p.frozen.shape, p.frozen.dtype,
                                                                             lambda: p.dense_digest(v), g)
        truth = _Lazy(getters)
        names = list(rec.frozen) + list(rec.whole) + list(rec.aliases)
        order = [k for k in truth if k in set(names)]
        return rec, order + [k for k in names if k not in order], truth
    raise UsageError(f"save() takes a FreezeRecord or an nn.Module, got {type(obj).__name__}")


class _Truth:
    """A frozen tensor of the model known by shape, dtype and a streamed digest; ``dense()`` makes it whole (only
    lossy value coding needs that)."""

    def __init__(self, shape, dtype, digest, dense):
        self.shape, self.dtype, self.digest, self.dense = tuple(shape), dtype, digest, dense


class _Lazy(dict):
    """``{name: () -> value}`` read as ``{name: value}``: each value computed on access, never kept."""

    def get(self, key, default=None):
        return super().get(key, lambda: default)()

    def __getitem__(self, key):
        return super().__getitem__(key)()


@contextmanager
def _background(fn, *args):
    """``fn(*args)`` on a worker thread for the duration of the block (for work that releases the GIL: hashing,
    the compiled kernels); yields its future."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(fn, *args)


def _check_metadata(metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in metadata.items()):
        raise UsageError("metadata must be a dict of str -> str")
    bad = [x for kv in metadata.items() for x in kv if not valid_text(x)]
    if bad:
        raise UsageError(f"metadata text {bad[0]!r} is not valid Unicode (a lone surrogate?): it cannot be stored")
    return dict(metadata)


def _frozen_entry(name: str, ft: FrozenTensor, seed: int, blobs: Parts, truth: torch.Tensor | _Truth | None,
                  coding=None) -> FrozenEntry:
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
    k = int(np.count_nonzero(mask.numpy()))  # (a torch bool sum widens every entry to int64 first)
    if values.numel() != k:
        raise UsageError(f"values must be {k} numbers (one per True in the mask), got {values.numel()}",
                         tensor=name)
    if ft.stream is not None and (not isinstance(ft.stream, str) or not ft.stream
                                  or not valid_text(ft.stream)):
        raise UsageError(f"stream must be a non-empty string, got {ft.stream!r}", tensor=name)
    hint: dict[str, float] = {}
    if isinstance(truth, _Truth) and coding is not None and k:
        truth = truth.dense()
    if coding is not None and k:  # lossy values: the file must reproduce the model with *these* values
        from ..method.quantize import quantize

        values, hint = quantize(values, coding, name)
        ft = dataclasses.replace(ft, values=values)
        if truth is not None:
            assert isinstance(truth, torch.Tensor)  # a _Truth was made dense above
            truth = truth.detach().cpu().clone()
            truth.view(-1)[mask.reshape(-1)] = values.to(truth.dtype)
    dense = truth if truth is not None else ft.dense(seed, name, device="cpu")
    if tuple(dense.shape) != tuple(mask.shape) or dense.dtype != values.dtype:
        raise MethodError(f"the model's tensor is {dense.dtype} {list(dense.shape)} but its frozen record is "
                          f"{values.dtype} {list(mask.shape)}", tensor=name)
    work = (dense.digest,) if isinstance(dense, _Truth) else (digest, dense)
    with _background(*work) as hashed:  # hashed on another core while the mask is coded
        coded = maskcode.encode(mask.numpy())
    e = FrozenEntry(name, tuple(mask.shape), dtype, hashed.result(), ft.init, scale, k, coded.coder,
                    dict(coded.params), int(coded.payload.size), None if ft.stream in (None, name) else ft.stream)
    if e.mask_key:
        blobs[e.mask_key] = ("U32", (int(coded.payload.size),), coded.payload.astype("<u4").tobytes())
    if e.values_key:
        blobs[e.values_key] = (dtype, (k,), bytes(tensor_bytes(values))) + ((hint,) if hint else ())
    return e


def _whole_entry(name: str, t: torch.Tensor, blobs: Parts) -> WholeEntry:
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
    return WholeEntry(name, tuple(t.shape), DTYPE_NAMES[t.dtype], hashlib.sha256(data).hexdigest())


def encode_record(record: FreezeRecord, order: list[str] | None = None, metadata=None,
                  truth: dict[str, torch.Tensor] | None = None, version: int | None = None,
                  values: str | None = None, progress: Progress | None = None, threads: int | None = None) -> list:
    """The byte chunks of the .fpk file for ``record`` (deterministic: same record -> same bytes, for any
    ``threads``: tensors coded at once, default torch's CPU threads).

    ``truth``: the dense tensors the file must reproduce (a module's weights as its forward pass uses them).
    Their digests go into the header, so a reader's check compares its reconstruction with *them*, not with a
    second reconstruction; without it the record's own reconstruction is hashed. ``version``: file format 1
    (spec/FORMAT.md §1-11) or 2 (§12, compact); default :data:`DEFAULT_VERSION`. ``values``: opt-in lossy coding
    of the trained values (:mod:`freezepack.method.quantize`: ``f16``, ``bf16``, ``int8``, ``kmeans:K``,
    ``uniform:K``); default lossless. It is recorded in the metadata as ``freezepack.values``.
    ``progress(done, total)`` is called after each tensor.
    """
    version = DEFAULT_VERSION if version is None else version
    if version not in VERSIONS:
        raise UsageError(f"format version must be 1 or 2, got {version!r}")
    coding = None
    metadata = _check_metadata(metadata)
    if values is not None:
        from ..method.quantize import ValueCoding

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
    stored: set[str] = set()
    for name in order:  # names and aliases first, in order: the errors a sequential writer would raise first
        if not isinstance(name, str) or not name or name == "__metadata__" or not valid_text(name):
            raise UsageError(f"invalid tensor name {name!r} (empty, reserved, or not valid Unicode text)")
        if name in record.aliases and record.aliases[name] not in stored:
            raise UsageError(f"alias of {record.aliases[name]!r}, which is not an earlier tensor", tensor=name)
        stored.add(name)

    def one(name: str) -> tuple[Entry, Parts]:
        """One tensor's entry and stored parts (its own dict: tasks run on several threads)."""
        own: Parts = {}
        if name in record.frozen:
            return _frozen_entry(name, record.frozen[name], seed, own, truth.get(name), coding), own
        return _whole_entry(name, record.whole[name], own), own

    def size(name: str) -> int:  # (bad input is refused by the task itself, in order)
        t = getattr(record.frozen[name], "mask", None) if name in record.frozen else record.whole[name]
        return t.numel() if isinstance(t, torch.Tensor) else 0

    # One task per tensor on every core (digests, mask coding and quantizing release the GIL or are numpy);
    # entries, parts and the first error in file order, so the bytes never depend on the thread count.
    tasks = [name for name in order if name not in record.aliases]

    def done(i: int) -> None:  # (the last step, len(order), is reported once the file's bytes are made)
        if progress is not None and i + 1 < len(tasks):
            progress(i + 1, len(order))

    made = dict(zip(tasks, run_ordered([(size(n), partial(one, n)) for n in tasks], thread_count(threads), done)))
    blobs: Parts = {}
    entries: list[Entry] = []
    for name in order:
        if name in record.aliases:
            entries.append(AliasEntry(name, record.aliases[name]))
        else:
            entry, own = made[name]
            entries.append(entry)
            blobs.update(own)
    keys = [e.data_key for e in entries if isinstance(e, WholeEntry)] + \
        [k for e in entries if isinstance(e, FrozenEntry) for k in (e.mask_key, e.values_key) if k]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise UsageError(f"stored tensor names collide: {', '.join(dup)} (a whole tensor named like another "
                         f"tensor's '{VALUES_SUFFIX}'/'{MASK_SUFFIX}' part)")
    header = Header(seed=seed, entries=tuple(entries), metadata=metadata, producer=f"freezepack {__version__}",
                    version=version)
    chunks = encode_file(header, blobs, version, threads)
    if progress is not None:
        progress(len(order), len(order))
    return chunks


def _prove(tmp_path: str, target, progress: Progress | None = None, threads: int | None = None) -> None:
    """Read the written temp file back as any reader will, before it is published: every tensor must decode,
    and every reconstruction must match the digest of what the model holds in memory. Frozen tensors are
    regenerated and hashed in chunks (:func:`verify`): the proof never holds a whole regenerated tensor."""
    report = verify(tmp_path, progress=progress, threads=threads)
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
        from ..method.freezenet import unwrap

        params = {n.replace("parametrizations.", "").removesuffix(".original")
                  for n, _ in unwrap(obj).named_parameters(remove_duplicate=False)}
        trained.update({n: t for n, t in record.whole.items() if n in params})
    for name, t in trained.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise MethodError(f"{bad} trained value(s) are NaN or infinite (a diverged run?): not saved; pass "
                              "allow_nonfinite=True to store them anyway", path=path, tensor=name)


def _lossy_dense(model: torch.nn.Module, record: FreezeRecord, truth: dict, values: str):
    """A dense model's trained values are its weights: quantize the ones a FreezeNet would freeze (Linear, Conv,
    Embedding, ... weights); biases and norms stay exact, as a FreezeNet's do. The model itself is not changed."""
    from ..method.freezenet import unwrap
    from ..method.quantize import ValueCoding, quantize
    from ..method.saliency import prunable_weights

    coding = ValueCoding.parse(values)
    if coding.lossless:
        return record, truth
    whole, lazy = dict(record.whole), _Lazy(truth)  # a copy of the getters: values are still made on access
    for name in prunable_weights(unwrap(model)):
        if name in whole and whole[name].is_floating_point():
            whole[name] = quantize(whole[name], coding, name)[0]
            lazy[name] = lambda t=whole[name]: t  # _Lazy stores getters; reading calls them
    return dataclasses.replace(record, whole=whole), lazy


def save(path: PathLike, record_or_module: FreezeRecord | torch.nn.Module,
         metadata: dict[str, str] | None = None, *, version: int | None = None, values: str | None = None,
         progress: Progress | None = None, allow_nonfinite: bool = False, threads: int | None = None) -> None:
    """Write a FreezeNet to ``path`` (.fpk) atomically, proven before it is published.

    ``record_or_module``: an ``nn.Module`` frozen by freezepack (wrappers such as DataParallel/DDP/``torch.compile``
    are looked through; tied weights are stored once) or a :class:`freezepack.format.record.FreezeRecord`.
    Before the rename the temp file is read back and every tensor regenerated and compared bit for bit with the
    model in memory; any difference is a :class:`MethodError` naming the tensor, and nothing is written.
    ``metadata``: a small str -> str map. ``version``: file format (1 or 2), default :data:`DEFAULT_VERSION`.
    ``values``: opt-in **lossy** coding of the trained values (``"bf16"``, ``"f16"``, ``"int8"``, ``"kmeans:K"``,
    ``"uniform:K"``; see :mod:`freezepack.method.quantize`), default lossless. The model in memory is not changed;
    the file holds (and is proven against) the model with quantized values, and records the coding. A dense
    model's (one with no frozen tensor) trained values are the weights a FreezeNet would freeze: those are coded.
    NaN or infinite trained values are refused (a :class:`MethodError`) unless ``allow_nonfinite``.
    ``progress(done, total)``: called as each tensor is coded, then as each is proven (total = twice the tensors).
    ``threads``: tensors coded and proven at once (default torch's CPU threads); the bytes are the same for any.
    """
    record, order, truth = _record_of(record_or_module)
    if not allow_nonfinite:
        _refuse_nonfinite(record, record_or_module, os.fspath(path))
    if values is not None and not record.frozen and isinstance(record_or_module, torch.nn.Module):
        record, truth = _lossy_dense(record_or_module, record, truth, values)
    steps = len(order)
    coded = None if progress is None else lambda done, total: progress(done, 2 * steps)
    proven = None if progress is None else lambda done, total: progress(steps + done, 2 * steps)
    chunks = encode_record(record, order, metadata, truth, version, values, progress=coded, threads=threads)
    atomic_write(path, chunks, validate=lambda tmp: _prove(tmp, os.fspath(path), proven, threads))
