"""save / load / load_into / open / verify / inspect (and convert): the .fpk files as a user sees them.

Composes the layers below: ``init`` regenerates frozen values straight on the target device, ``maskcode`` turns
masks into bytes and back, ``container`` owns the file layout and checks every untrusted number.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from contextlib import contextmanager

import numpy as np
import torch

from . import __version__
from .format import container, maskcode
from .format.container import Entry, FpkReader, Header, Limits, DEFAULT_LIMITS
from .errors import FormatError, FreezepackError, IntegrityError, SpecError
from .format.init import InitSpec, generate
from .format.record import FreezeRecord, FrozenTensor
from .format.rng import SPEC_VERSION, check_seed

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


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

def _record_of(obj) -> tuple[FreezeRecord, list[str]]:
    if isinstance(obj, FreezeRecord):
        return obj, list(obj.frozen) + [k for k in obj.whole if k not in obj.frozen]
    if isinstance(obj, torch.nn.Module):
        from .method.freezenet import dense_state_dict, freeze_record  # the method; imported only for a module

        rec = freeze_record(obj)
        order = [k for k in dense_state_dict(obj) if k in rec.frozen or k in rec.whole]
        return rec, order + [k for k in list(rec.frozen) + list(rec.whole) if k not in order]
    raise SpecError(f"save() takes a FreezeRecord or an nn.Module, got {type(obj).__name__}")


def _check_metadata(metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in metadata.items()):
        raise SpecError("metadata must be a dict of str -> str")
    return dict(metadata)


def _frozen_entry(name: str, ft: FrozenTensor, seed: int, blobs: dict) -> Entry:
    if not isinstance(ft.init, InitSpec):
        raise SpecError("init must be an InitSpec (freezepack.init.make_init)", tensor=name)
    scale = float(ft.frozen_scale)
    if not math.isfinite(scale) or float(np.float32(scale)) != scale:
        raise SpecError(f"frozen_scale {ft.frozen_scale!r} is not a finite float32 number", tensor=name)
    mask = ft.mask.detach().cpu()
    if mask.dtype != torch.bool:
        raise SpecError(f"mask must be a bool tensor, got {mask.dtype}", tensor=name)
    values = ft.values.detach().cpu().reshape(-1)
    k = int(mask.sum())
    if values.dtype != torch.float32 or values.numel() != k:
        raise SpecError(f"values must be {k} float32 numbers (one per True in the mask), got {values.numel()} "
                        f"{values.dtype}", tensor=name)
    coded = maskcode.encode(mask.numpy())
    dense = ft.dense(seed, name, device="cpu")
    e = Entry(name, "frozen", tuple(mask.shape), "F32", digest(dense), init=ft.init, frozen_scale=scale,
              trainable=k, coder=coded.coder, coder_params=dict(coded.params))
    if coded.payload.size:
        e.mask = name + container.MASK_SUFFIX
        blobs[e.mask] = ("U32", (int(coded.payload.size),), coded.payload.astype("<u4").tobytes())
    if k:
        e.values = name + container.VALUES_SUFFIX
        blobs[e.values] = ("F32", (k,), bytes(tensor_bytes(values)))
    return e


def _whole_entry(name: str, t: torch.Tensor, blobs: dict) -> Entry:
    if not isinstance(t, torch.Tensor):
        raise SpecError(f"whole tensors must be torch tensors, got {type(t).__name__}", tensor=name)
    t = t.detach().cpu()
    if t.dtype not in DTYPE_NAMES:
        raise SpecError(f"dtype {t.dtype} cannot be stored", tensor=name)
    data = bytes(tensor_bytes(t))
    blobs[name] = (DTYPE_NAMES[t.dtype], tuple(t.shape), data)
    return Entry(name, "whole", tuple(t.shape), DTYPE_NAMES[t.dtype], hashlib.sha256(data).hexdigest(), data=name)


def encode_record(record: FreezeRecord, order: list[str] | None = None, metadata=None) -> list:
    """The byte chunks of the .fpk file for ``record`` (deterministic: same record -> same bytes)."""
    seed = check_seed(record.seed)
    if record.spec_version != SPEC_VERSION:
        raise SpecError(f"record uses generator {record.spec_version!r}; this writer knows {SPEC_VERSION!r}")
    order = order if order is not None else list(record.frozen) + [k for k in record.whole if k not in record.frozen]
    both = set(record.frozen) & set(record.whole)
    if both:
        raise SpecError(f"tensors both frozen and whole: {', '.join(sorted(both))}")
    blobs: dict = {}
    entries = []
    for name in order:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise SpecError(f"invalid tensor name {name!r}")
        if name in record.frozen:
            entries.append(_frozen_entry(name, record.frozen[name], seed, blobs))
        else:
            entries.append(_whole_entry(name, record.whole[name], blobs))
    keys = [e.data for e in entries if e.data] + [k for e in entries for k in (e.mask, e.values) if k]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise SpecError(f"stored tensor names collide: {', '.join(dup)} (a whole tensor named like another "
                        f"tensor's '{container.VALUES_SUFFIX}'/'{container.MASK_SUFFIX}' part)")
    header = Header(seed=seed, entries=entries, metadata=_check_metadata(metadata),
                    producer=f"freezepack {__version__}")
    return container.encode_file(header, blobs)


def save(path, record_or_module, metadata: dict[str, str] | None = None) -> None:
    """Write a FreezeNet to ``path`` (.fpk) atomically.

    ``record_or_module`` is a :class:`freezepack.record.FreezeRecord` or an ``nn.Module`` trained by freezepack's
    method (its record comes from ``freezepack.freezenet.freeze_record``). ``metadata``: a small str -> str map.
    """
    record, order = _record_of(record_or_module)
    container.atomic_write(path, encode_record(record, order, metadata))


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
        raise SpecError(f"{device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device {device!r} requested but CUDA is not available here")
    return dev


@contextmanager
def _timed(timings: dict | None, key: str):
    if timings is None:
        yield
        return
    t0 = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def _materialize(r: FpkReader, e: Entry, device, check: bool, timings: dict | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """One dense tensor from an open file; with ``check``, its bytes are compared with the stored digest."""
    path = r.path
    if e.kind == "alias":  # a tied tensor: its target's values (the integrator's api ties them in load())
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
    with _timed(timings, "read"):
        mask_words = r.read_array(e.mask, "<u4", e.name) if e.mask else np.zeros(0, np.uint32)
        values = r.read_bytes(e.values, e.name) if e.values else None
    idx = None
    if 0 < e.trainable < e.numel:
        with _timed(timings, "decode"):  # before the dense tensor exists: a bad mask costs no regeneration
            idx = torch.from_numpy(maskcode.decode_indices(e.coder, e.numel, e.trainable, e.coder_params,
                                                           mask_words, where=path, tensor=e.name))
    if e.trainable == e.numel:  # nothing frozen: nothing to regenerate
        t = out if out is not None else torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype], device=device)
    else:
        with _timed(timings, "generate"):
            f32 = e.dtype == "F32"
            t = generate(e.init, e.shape, r.header.seed, e.stream_key, device=device if out is None else None,
                         out=out if f32 else None)
            if not f32:  # FORMAT.md §5.3: round the generator's float32 output to the dense dtype, then scale
                t = t.to(TORCH_DTYPES[e.dtype]) if out is None else out.copy_(t)
            if e.frozen_scale != 1.0:
                t.mul_(e.frozen_scale)  # one correctly rounded float32 multiply (FreezeNet-WD)
    if e.trainable:
        vals = torch.frombuffer(values, dtype=TORCH_DTYPES[e.dtype])
        if e.trainable == e.numel:  # nothing frozen: the values are the tensor
            with _timed(timings, "scatter"):
                t.view(-1).copy_(vals)
        else:
            with _timed(timings, "scatter"):
                t.view(-1).index_copy_(0, idx.to(t.device), vals.to(t.device))
    if check:
        with _timed(timings, "digest"):
            if digest(t) != e.sha256:
                raise IntegrityError("regenerated tensor does not match its digest: not bit-exact on this device "
                                     f"({t.device}) or the file was written from a different generator", path=path,
                                     tensor=e.name)
    return t


def load(path, device=None, *, verify: bool = True, limits: Limits = DEFAULT_LIMITS,
         timings: dict | None = None) -> dict[str, torch.Tensor]:
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
            for e in r.header.entries:
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
                if fut.result() != e.sha256:
                    raise IntegrityError("regenerated tensor does not match its digest: not bit-exact on this "
                                         f"device ({out[e.name].device}) or the file was written from a different "
                                         "generator", path=r.path, tensor=e.name)
            if timings is not None:
                timings["digest_wait"] = timings.get("digest_wait", 0.0) + time.perf_counter() - t0
        return out


def load_into(module: torch.nn.Module, path, *, strict: bool = True, verify: bool = True,
              limits: Limits = DEFAULT_LIMITS):
    """Fill ``module``'s parameters and buffers from a .fpk in place, regenerating into their own storage.

    Returns torch's ``(missing_keys, unexpected_keys)`` named tuple; with ``strict`` either is an error.
    """
    targets = module.state_dict(keep_vars=True)
    with FpkReader(path, limits) as r:
        names = [e.name for e in r.header.entries]
        missing = [k for k in targets if k not in set(names)]
        unexpected = [k for k in names if k not in targets]
        if strict and (missing or unexpected):
            raise FormatError(f"does not fit the module: missing {missing[:5]}, unexpected {unexpected[:5]}",
                              path=r.path)
        with torch.no_grad():
            for e in r.header.entries:
                if e.name not in targets:
                    continue
                dst = targets[e.name]
                if tuple(dst.shape) != e.shape:
                    raise FormatError(f"shape {list(e.shape)} does not fit the module's {list(dst.shape)}",
                                      path=r.path, tensor=e.name)
                direct = e.kind == "frozen" and dst.dtype == torch.float32 and dst.is_contiguous()
                if direct:
                    _materialize(r, e, dst.device, verify, out=dst.data)
                else:
                    dst.data.copy_(_materialize(r, e, dst.device, verify))
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


class FpkFile:
    """Lazy per-tensor access, like ``safetensors.safe_open``: ``with freezepack.open(p) as f: f.get_tensor(k)``."""

    def __init__(self, path, device=None, *, verify: bool = True, limits: Limits = DEFAULT_LIMITS):
        self._device = _check_device(device)
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

    def get_tensor(self, name: str) -> torch.Tensor:
        return _materialize(self._r, self.entry(name), self._device, self._verify)

    def close(self) -> None:
        self._r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open(path, device=None, *, verify: bool = True, limits: Limits = DEFAULT_LIMITS) -> FpkFile:  # noqa: A001
    """Open a .fpk lazily: the header is read and validated now, each tensor when asked for."""
    return FpkFile(path, device, verify=verify, limits=limits)


# ---------------------------------------------------------------------------------------------------------------
# verify / inspect
# ---------------------------------------------------------------------------------------------------------------

def verify(path, device=None, *, limits: Limits = DEFAULT_LIMITS, progress=None) -> dict:
    """Regenerate every tensor and check every digest. Returns a report; ``report["ok"]`` is the verdict.

    ``progress(done, total)`` is called after each tensor.

    A header that cannot be trusted raises (FormatError/IntegrityError/SpecError); a tensor that fails is listed
    with its reason, so one bad tensor does not hide the state of the others.
    """
    results = []
    device = _check_device(device)
    if device is not None and device.type == "meta":
        raise SpecError("cannot verify on the meta device: it holds no values (use device='cpu' or a GPU)")
    with FpkReader(path, limits) as r:
        for i, e in enumerate(r.header.entries):
            try:
                _materialize(r, e, device, True)
                results.append({"name": e.name, "ok": True})
            except FreezepackError as err:
                results.append({"name": e.name, "ok": False, "error": err.reason})
            if progress is not None:
                progress(i + 1, len(r.header.entries))
    bad = [x for x in results if not x["ok"]]
    return {"path": os.fspath(path), "ok": not bad, "tensors": results, "checked": len(results), "failed": len(bad),
            "device": str(torch.device(device)) if device is not None else "cpu"}


def inspect(path, *, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Header facts without regenerating anything: per-tensor q, coder, sizes, and the compression factor."""
    with FpkReader(path, limits) as r:
        h = r.header
        rows = []
        dense_bytes = frozen_elems = frozen_total = 0
        for e in h.entries:
            nbytes = e.numel * container.DTYPE_SIZES[e.dtype]
            dense_bytes += nbytes
            row = {"name": e.name, "kind": e.kind, "shape": list(e.shape), "dtype": e.dtype, "numel": e.numel,
                   "dense_bytes": nbytes}
            if e.kind == "frozen":
                frozen_total += e.numel
                frozen_elems += e.numel - e.trainable
                mb = h.stored[e.mask].nbytes if e.mask else 0
                vb = h.stored[e.values].nbytes if e.values else 0
                row.update(init=e.init.name, dist=e.init.dist, frozen_scale=e.frozen_scale, trainable=e.trainable,
                           q=(1 - e.trainable / e.numel) if e.numel else 1.0, coder=e.coder, mask_bytes=mb,
                           mask_entropy_bytes=round(maskcode.entropy_bytes(e.numel, e.trainable), 1),
                           values_bytes=vb, stored_bytes=mb + vb)
            elif e.kind == "alias":
                row.update(of=e.of, stored_bytes=0, dense_bytes=0)
                dense_bytes -= nbytes
            else:
                row.update(stored_bytes=h.stored[e.data].nbytes)
            rows.append(row)
        return {"path": r.path, "file_bytes": r.file_size, "format_version": h.version, "producer": h.producer,
                "generator": h.generator, "seed": h.seed, "metadata": dict(h.metadata), "tensors": rows,
                "dense_bytes": dense_bytes, "compression_factor": dense_bytes / r.file_size,
                "q": frozen_elems / frozen_total if frozen_total else 0.0,
                "header_bytes": r.data_start}


def convert(src, dst, seed: int, init="xavier_normal", inits=None, metadata=None, progress=None) -> dict:
    """Dense checkpoint + seed + initializer(s) -> the smallest exact .fpk (see :mod:`freezepack.conversion`)."""
    from .conversion import convert_checkpoint

    return convert_checkpoint(src, dst, seed, init, inits, metadata, progress)
