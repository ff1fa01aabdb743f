"""verify and inspect: is a file bit-exact here, and what is in it (without regenerating anything)."""
from __future__ import annotations

import os
from functools import partial

import torch

from ..errors import FreezepackError, UsageError
from ..format import maskcode
from ..format.dtypes import DTYPE_SIZES
from ..format.model import DEFAULT_LIMITS, AliasEntry, FrozenEntry, Limits
from ..format.reader import open_file
from ..parallel import generator_threads, run_ordered, thread_count
from .materialize import Device, PathLike, Progress, check_device, check_digest, materialize, streamed_digest

VALUES_KEY = "freezepack.values"  # metadata: the lossy values coding a file was written with (absent: lossless)


def verify(path: PathLike, device: Device = None, *, limits: Limits = DEFAULT_LIMITS,
           progress: Progress | None = None, threads: int | None = None) -> dict:
    """Regenerate every tensor and check every digest. Returns a report; ``report["ok"]`` is the verdict.
    Frozen tensors are regenerated and hashed a few million elements at a time: checking a model never needs
    memory for its largest tensor.

    ``threads``: tensors checked at once, each on its own CPU thread, biggest first (default
    ``torch.get_num_threads()``); the report is the same for any count. ``progress(done, total)`` is called as
    tensors finish, in file order.

    A header that cannot be trusted raises (FormatError/IntegrityError/SpecError); a tensor that fails is listed
    with its reason, so one bad tensor does not hide the state of the others.
    """
    device = check_device(device)
    if device is not None and device.type == "meta":
        raise UsageError("cannot verify on the meta device: it holds no values (use device='cpu' or a GPU)")
    nthreads = thread_count(threads)
    with open_file(path, limits) as r:
        entries = r.header.entries
        gen = generator_threads(nthreads, sum(not isinstance(e, AliasEntry) for e in entries))

        def check(e) -> dict:
            try:
                if isinstance(e, FrozenEntry) and e.coder != "ans-ctx":  # streamed: a chunk at a time in memory
                    check_digest(r, e, torch.empty(0, device=device), streamed_digest(r, e, device, threads=gen))
                elif not isinstance(e, AliasEntry):  # an alias is its target's tensor, checked under its target's name
                    materialize(r, e, device, True, threads=gen)
                return {"name": e.name, "ok": True}
            except FreezepackError as err:
                return {"name": e.name, "ok": False, "error": err.reason}

        def done(i: int) -> None:
            if progress is not None:
                progress(i + 1, len(entries))

        results = run_ordered([(0 if isinstance(e, AliasEntry) else e.numel, partial(check, e)) for e in entries],
                              nthreads, done)
        lossy = r.header.metadata.get(VALUES_KEY)  # the file is checked against what it holds: say if that is lossy
    bad = [x for x in results if not x["ok"]]
    return {"path": os.fspath(path), "ok": not bad, "tensors": results, "checked": len(results), "failed": len(bad),
            "device": str(torch.device(device)) if device is not None else "cpu", "values": lossy}


def inspect(path: PathLike, *, limits: Limits = DEFAULT_LIMITS) -> dict:
    """Header facts without regenerating anything: per-tensor q, coder, sizes, and the compression factor.

    ``header_bytes`` is every byte before the first payload: v1, the 8-byte length and the safetensors JSON (the
    freezepack header inside it); v2, the 8-byte length, the fixed safetensors JSON, the 32-byte body digest and
    the binary header *including* the coder models (``ans-ctx`` bin counts, value histograms and codebooks).
    spec/FORMAT.md §12.11's "structure" (the README's ~400 B for LeNet-5-Caffe) is the same bytes *without* the
    coder models.
    """
    with open_file(path, limits) as r:
        h = r.header
        rows: list[dict] = []
        dense_bytes = frozen_elems = frozen_total = 0
        for e in h.entries:
            if isinstance(e, AliasEntry):
                t = h.target(e)
                rows.append({"name": e.name, "kind": "alias", "of": e.of, "shape": list(t.shape), "dtype": t.dtype,
                             "numel": t.numel, "dense_bytes": 0, "stored_bytes": 0})
                continue
            nbytes = e.numel * DTYPE_SIZES[e.dtype]
            dense_bytes += nbytes
            row = {"name": e.name, "kind": e.kind, "shape": list(e.shape), "dtype": e.dtype, "numel": e.numel,
                   "dense_bytes": nbytes}
            if isinstance(e, FrozenEntry):
                frozen_total += e.numel
                frozen_elems += e.numel - e.trainable
                mb = r.part_nbytes(e.mask_key)
                vb = r.part_nbytes(e.values_key)
                row.update(stream=e.stream_key, init=e.init.name, dist=e.init.dist, frozen_scale=e.frozen_scale,
                           trainable=e.trainable,
                           q=(1 - e.trainable / e.numel) if e.numel else 1.0, coder=e.coder, mask_bytes=mb,
                           mask_entropy_bytes=round(maskcode.entropy_bytes(e.numel, e.trainable), 1),
                           values_bytes=vb, stored_bytes=mb + vb, values_coding=r.part_coding(e.values_key))
            else:
                row.update(stored_bytes=r.part_nbytes(e.data_key), values_coding=r.part_coding(e.data_key))
            rows.append(row)
        return {"path": r.path, "file_bytes": r.file_size, "format_version": h.version, "producer": h.producer,
                "values": h.metadata.get(VALUES_KEY, "f32 (lossless)"),
                "generator": h.generator, "seed": h.seed, "metadata": dict(h.metadata), "tensors": rows,
                "dense_bytes": dense_bytes, "compression_factor": dense_bytes / r.file_size,
                "q": frozen_elems / frozen_total if frozen_total else 0.0,
                "header_bytes": r.header_bytes}
