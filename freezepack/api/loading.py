"""load, load_into, load_freezenet, safe_open: a .fpk back into tensors, a module, or a trainable FreezeNet."""
from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..errors import FormatError, UsageError
from ..format.base import Reader
from ..format.dtypes import TORCH_DTYPES
from ..format.init import generate
from ..format.memory import check_memory, dense_bytes, prefault, release_freed_heap, work_bytes
from ..format.model import DEFAULT_LIMITS, AliasEntry, Entry, FrozenEntry, Limits, WholeEntry
from ..format.reader import open_file
from ..parallel import generator_threads, run_ordered, thread_count
from .matching import fit, tied_to_loaded
from .materialize import (
    Device,
    PathLike,
    Progress,
    check_device,
    check_digest,
    frozen_parts,
    materialize,
    materialize_checked,
)


def load(path: PathLike, device: Device = None, *, verify: bool = True, limits: Limits = DEFAULT_LIMITS,
         timings: dict[str, float] | None = None, progress: Progress | None = None,
         threads: int | None = None) -> dict[str, torch.Tensor]:
    """Dense state_dict of a .fpk file; frozen parts are regenerated straight on ``device``.

    Stored bytes are always checked against their digests. With ``verify`` (default) every reconstructed tensor is
    checked too (a device->host copy per tensor on GPUs). ``threads``: how many CPU threads read, decode,
    regenerate and hash the tensors, each tensor one task, biggest first (default ``torch.get_num_threads()``);
    the result is bit-identical for any count, and a failing tensor raises the same error. ``timings``: pass a
    dict to get seconds per phase (summed over the threads). ``progress(done, total)`` is called as tensors
    finish, in file order.
    """
    device = check_device(device)
    nthreads = thread_count(threads)
    with open_file(path, limits) as r:
        entries = r.header.entries
        works = sorted(map(work_bytes, entries), reverse=True)[:nthreads]  # up to nthreads tensors in flight
        check_memory(sum(map(dense_bytes, entries)) + sum(works), f"loading all {len(entries)} tensors", limits,
                     device, r.path)
        own = [i for i, e in enumerate(entries) if not isinstance(e, AliasEntry)]
        gen_threads = generator_threads(nthreads, len(own))

        def task(e: Entry) -> torch.Tensor:
            if verify:
                return materialize_checked(r, e, device, timings, threads=gen_threads)
            return materialize(r, e, device, False, timings, threads=gen_threads)

        def done(k: int) -> None:
            if progress is not None:
                progress(own[k] + 1, len(entries))

        tensors = run_ordered([(dense_bytes(entries[i]), partial(task, entries[i])) for i in own], nthreads, done)
        made = dict(zip(own, tensors))
        out: dict[str, torch.Tensor] = {}
        for i, e in enumerate(entries):  # a tied name is the same tensor object, as in torch's state_dict
            out[e.name] = out[e.of] if isinstance(e, AliasEntry) else made[i]
        if progress is not None and entries and (not own or own[-1] != len(entries) - 1):
            progress(len(entries), len(entries))
        return out


def _check_shapes(r: Reader, targets: dict[str, torch.Tensor], match: dict[str, str]) -> None:
    """Every matched file tensor (an alias by its target's shape) fits the module's tensor, checked before the
    module is changed at all."""
    for e in r.header.entries:
        if e.name in match:
            shape = r.header.target(e).shape
            dst = targets[match[e.name]]
            if tuple(dst.shape) != shape:
                raise FormatError(f"shape {list(shape)} does not fit the module's {list(dst.shape)}", path=r.path,
                                  tensor=e.name)


def _set_tensor(module: torch.nn.Module, name: str, value) -> None:
    mod, _, attr = name.rpartition(".")
    setattr(module.get_submodule(mod), attr, value)


def _materialize_meta(module: torch.nn.Module, targets: dict, name: str, device) -> torch.Tensor:
    """Give the meta tensor ``targets[name]`` real (uninitialised) storage on ``device``, in every module slot that
    holds it (a tied Parameter stays one Parameter); returns the new tensor, for the caller to fill in place."""
    old = targets[name]
    new = torch.empty(old.shape, dtype=old.dtype, device=device)
    if isinstance(old, torch.nn.Parameter):
        new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
    for other in [n for n, t in targets.items() if t is old]:
        _set_tensor(module, other, new)
        targets[other] = new
    return new


def _storage_key(t: torch.Tensor):
    """Tensors that share memory share a key: what writes them must not run at the same time."""
    return t.device, t.untyped_storage().data_ptr()


def load_into(module: torch.nn.Module, path: PathLike, *, strict: bool = True, verify: bool = True,
              limits: Limits = DEFAULT_LIMITS, prefix_map: dict[str, str] | None = None, device: Device = None,
              progress: Progress | None = None,
              threads: int | None = None) -> torch.nn.modules.module._IncompatibleKeys:
    """Fill ``module``'s parameters and buffers from a .fpk in place, regenerating into their own storage.

    Names match exactly, or with the wrapper prefixes ``module.`` / ``_orig_mod.`` stripped on either side, so
    files saved from (or loaded into) DataParallel, DDP and ``torch.compile`` models just work; ``prefix_map``
    (``{"old.prefix.": "new.prefix."}``) renames file tensors. Tied tensors (alias entries) are tied again in
    ``module`` when they are not already. Returns torch's ``(missing_keys, unexpected_keys)`` named tuple; with
    ``strict`` either is an error.

    A module built on the meta device (``with torch.device("meta"): model = Net()``, no initialisation at all)
    gets each of its meta tensors allocated on ``device`` (default CPU) and regenerated there once, straight into
    its final storage: a GPU target never sees a dense CPU copy. ``threads`` as in :func:`load` (tensors that
    share memory are written one after another, in file order). ``progress(done, total)`` is called as tensors
    finish.
    """
    targets = module.state_dict(keep_vars=True)
    meta_device = check_device(device) or torch.device("cpu")
    if meta_device.type == "meta":
        raise UsageError("load_into(device=...) is where meta tensors are materialised; it cannot be 'meta'")
    nthreads = thread_count(threads)
    with open_file(path, limits) as r:
        entries = r.header.entries
        total = len(entries)
        match, missing, unexpected = fit(targets, entries, prefix_map, r.path, strict)
        _check_shapes(r, targets, match)
        groups: dict = {}  # storage -> [(file index, entry, destination)], in file order
        fresh = set()  # storages just allocated for meta tensors: their pages are mapped by the task that fills them
        copies = []  # tied in the file, separate buffers in the module: copied once the source is filled
        with torch.no_grad():
            for i, e in enumerate(entries):
                if e.name not in match:
                    continue
                dst = targets[match[e.name]]
                if isinstance(e, AliasEntry):
                    src = targets.get(match.get(e.of, ""))
                    if src is not None and src is not dst and isinstance(src, torch.nn.Parameter):
                        _set_tensor(module, match[e.name], src)  # re-tie: one Parameter, as when saved
                        targets[match[e.name]] = src
                    elif src is not None and src is not dst:
                        if dst.is_meta:
                            dst = _materialize_meta(module, targets, match[e.name], src.device)
                        copies.append((src, dst))
                    continue
                if dst.is_meta:
                    dst = _materialize_meta(module, targets, match[e.name], meta_device)
                    fresh.add(_storage_key(dst))
                groups.setdefault(_storage_key(dst), []).append((i, e, dst))

        def fill(items) -> None:
            if _storage_key(items[0][2]) in fresh:
                prefault(items[0][2])
            with torch.no_grad():  # (grad mode is per thread)
                for _, e, dst in items:
                    # regenerated straight into the module's storage when no rounding lies between (an F16 file
                    # tensor is checked at F16, then widened by copy_)
                    if isinstance(e, FrozenEntry) and e.dtype == "F32" and dst.dtype == torch.float32 and \
                            dst.is_contiguous():
                        if verify:
                            materialize_checked(r, e, dst.device, out=dst.data, threads=gen_threads)
                        else:
                            materialize(r, e, dst.device, False, out=dst.data, threads=gen_threads)
                    else:
                        dst.data.copy_(materialize(r, e, dst.device, verify, threads=gen_threads))

        jobs = list(groups.values())
        gen_threads = generator_threads(nthreads, len(jobs))
        reached = [0]

        def done(g: int) -> None:
            reached[0] = max(reached[0], jobs[g][-1][0] + 1)
            if progress is not None:
                progress(reached[0], total)

        costs = [sum(dense_bytes(e) for _, e, _ in items) for items in jobs]
        run_ordered([(c, partial(fill, items)) for c, items in zip(costs, jobs)], nthreads, done)
        with torch.no_grad():
            for src, dst in copies:
                dst.data.copy_(src.data)
        if progress is not None and reached[0] != total:
            progress(total, total)
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


def load_freezenet(module: torch.nn.Module, path: PathLike, *, device: Device = None, verify: bool = True,
                   limits: Limits = DEFAULT_LIMITS, prefix_map: dict[str, str] | None = None,
                   threads: int | None = None) -> torch.nn.Module:
    """Make a plain ``module`` the FreezeNet stored in ``path``, ready to train on (resume training).

    Every frozen tensor becomes a FrozenParametrization again (mask, seed, initializer, generator stream and
    FreezeNet-WD scale restored; its trained values are the only Parameter), whole tensors are copied in, tied
    tensors are tied. Saving the result unchanged gives the same file. Names are matched as in :func:`load_into`.
    ``threads``: frozen tensors regenerated and checked at once (default torch's CPU threads; the same result and
    error for any count). Each is checked chunk by chunk from its frozen buffer: no dense copy is made to check it.
    """
    from torch.nn.utils import parametrize

    from ..method.freezenet import FrozenParametrization, guard_save_pretrained

    targets = module.state_dict(keep_vars=True)
    with open_file(path, limits) as r:
        entries = r.header.entries
        match, _, _ = fit(targets, entries, prefix_map, r.path, strict=True)
        tied_missing = tied_to_loaded(targets, match)  # tied in the module, stored once in the file
        _check_shapes(r, targets, match)  # every name, aliases too, before the module is touched
        nthreads = thread_count(threads)
        frozen_entries = [e for e in entries if isinstance(e, FrozenEntry)]
        gen = generator_threads(nthreads, len(frozen_entries))

        def prepare(e: FrozenEntry) -> tuple[FrozenParametrization, torch.Tensor]:
            """The tensor's parametrization (one regeneration and one mask decode) and its stored values,
            checked against the digest chunk by chunk (:meth:`FrozenParametrization.dense_digest`)."""
            dst = targets[match[e.name]]
            dev = dst.device if device is None else check_device(device)
            # the module's own float32 storage becomes the frozen buffer when nothing else holds it: no second copy
            # of the model while its initial weights are replaced (the module takes the dense tensor afterwards)
            reuse = dst.data if (e.dtype == "F32" and dst.dtype == torch.float32 and dst.is_contiguous()
                                 and dst.device == dev and dev.type != "meta" and isinstance(dst, torch.nn.Parameter)
                                 and sum(t is dst for t in targets.values()) == 1) else None
            idx, vals, g = frozen_parts(r, e, dev, out=reuse, threads=gen)
            if g is None:
                g = generate(e.init, e.shape, r.header.seed, e.stream_key, device=dev, out=reuse, threads=gen)
            frozen = g.to(TORCH_DTYPES[e.dtype])  # (the generator's float32 output itself for F32)
            mask = torch.zeros(e.numel, dtype=torch.bool)
            if idx is not None:
                mask[idx] = True
            p = FrozenParametrization(frozen, mask.view(e.shape), e.init, r.header.seed, e.stream_key)
            if e.frozen_scale != 1.0:
                p.set_frozen_scale(e.frozen_scale)
                p.decay_state.copy_(torch.tensor([e.frozen_scale, 0.0], dtype=torch.float64))
            values = torch.zeros(0, dtype=frozen.dtype) if vals is None else vals.to(frozen.dtype)
            if verify and frozen.device.type != "meta":
                check_digest(r, e, frozen, p.dense_digest(values.to(frozen.device)))
            return p, values

        prepared = dict(zip((e.name for e in frozen_entries),
                            run_ordered([(e.numel, partial(prepare, e)) for e in frozen_entries], nthreads)))
        release_freed_heap()  # the decoders' scratch: not to be counted again while the weights are swapped
        freed, every = 0, max(1, sum(e.numel for e in frozen_entries) // 16)
        params: dict[str, FrozenParametrization] = {}
        for e in entries:
            name = match[e.name]
            dst = targets[name]
            dev = dst.device if device is None else check_device(device)
            mod, _, attr = name.rpartition(".")
            owner = module.get_submodule(mod)
            if isinstance(e, AliasEntry):
                src = match[e.of]
                if src in params:  # a tied frozen tensor: the same parametrization and values Parameter
                    smod, _, sattr = src.rpartition(".")
                    sowner: Any = module.get_submodule(smod)  # parametrized: torch's types do not say so
                    setattr(owner, attr, torch.nn.Parameter(getattr(sowner, sattr).detach().clone()))
                    parametrize.register_parametrization(owner, attr, params[src], unsafe=True)
                    tied: Any = owner.parametrizations  # (torch types it as Tensor | Module)
                    tied[attr].original = sowner.parametrizations[sattr].original
                elif isinstance(targets[src], torch.nn.Parameter):
                    setattr(owner, attr, targets[src])
                continue
            if isinstance(e, WholeEntry):
                with torch.no_grad():
                    if dst.device != dev:
                        dst.data = dst.data.to(dev)
                    materialize(r, e, dev, verify, out=dst.data)
                continue
            if not isinstance(dst, torch.nn.Parameter):
                raise FormatError("a frozen tensor in the file is a buffer in the module, not a parameter",
                                  path=r.path, tensor=e.name)
            p, values = prepared.pop(e.name)
            with torch.no_grad():  # one dense tensor at a time: right_inverse takes the trained values from it
                dense = p(values.to(p.frozen.device))
            holders = [n for n, t in targets.items() if t is dst and n != name]
            for other in holders:  # torch set_()s the registered Parameter in place: untie the others first
                omod, _, oattr = other.rpartition(".")
                setattr(module.get_submodule(omod), oattr, torch.nn.Parameter(dst.detach().clone()))
            with torch.no_grad():
                dst.data = dense  # right_inverse takes the trained values from here
            parametrize.register_parametrization(owner, attr, p, unsafe=True)
            params[name] = p
            del dense
            freed += e.numel
            if freed >= every:  # the dense tensors just swapped in and out: hand their blocks back now and then
                freed = 0
                release_freed_heap()
        for name, src in tied_missing.items():  # tie them again, to the parametrization of the name the file has
            if src in params:
                mod, _, attr = name.rpartition(".")
                holder: Any = module.get_submodule(mod)  # parametrized: torch's types do not say so
                source: Any = module.get_submodule(src.rpartition(".")[0])
                parametrize.register_parametrization(holder, attr, params[src], unsafe=True)
                holder.parametrizations[attr].original = source.parametrizations[src.rpartition(".")[2]].original
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
        self._f, self._name = f, name
        self._e = f._r.header.target(f.entry(name))  # an alias: its target's shape and dtype

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
        self._device = check_device(_safetensors_device(device))
        if fw == "np" and self._device is not None and self._device.type != "cpu":
            raise UsageError("framework 'np' gives CPU arrays: leave device unset", path=path)
        self._r = open_file(path, limits)
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
        return materialize(self._r, self.entry(name), self._device, self._verify)

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
