"""Data-parallel ranks agree before they train, fail together, and never wait forever for each other.

Before the first step the ranks prove they are running the same job (:func:`agree`): every rank publishes a
fingerprint of its configuration and of the data it will read (SHA-256 of the tensors) in the process group's
key-value store and compares it with rank 0's. A difference is one :class:`DistributedError` on every rank naming
the fields, the data set (size or contents) and the ranks; nothing is trained. Steps that can fail on one rank only
(loading data, building the model) run under :func:`together`, so every rank learns of the failure at once instead
of waiting in a collective its peer never reaches. Both coordinate through the store, not through collectives, so
they also work when the ranks disagree about the backend or the device, and a rank that does not arrive within
``timeout`` seconds is named. The collectives themselves are bounded by the process group's timeout
(``init_worker(timeout=...)``, ``freezepack train --collective-timeout``); a gloo failure or timeout inside them
becomes a DistributedError (:func:`collective_errors`).

Everything here is re-exported by :mod:`freezepack.method.distributed`.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DistributedError, FreezepackError

DEFAULT_TIMEOUT_S = 300.0  # how long a rank waits for the others (5 min, not torch's 30): a stuck job ends early


def _require_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError("no torch.distributed process group: call torch.distributed.init_process_group "
                               "first (or start the job with torchrun / freezepack train --nproc)")


def _sha256(t: torch.Tensor) -> bytes:
    """SHA-256 of a tensor's little-endian C-order bytes (the same bytes ``freezepack.api.digest`` hashes)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().data if t.numel() else b"").digest()  # the buffer, no copy


def _ranks(ranks) -> str:
    """``rank 1`` / ``ranks 1, 3`` (long lists shortened: a 1024-rank job must still give one readable line)."""
    ranks = list(ranks)
    shown = ", ".join(str(r) for r in ranks[:8]) + (f", ... ({len(ranks)} ranks)" if len(ranks) > 8 else "")
    return f"rank {shown}" if len(ranks) == 1 else f"ranks {shown}"


def _verb(ranks, one: str, many: str) -> str:
    return one if len(list(ranks)) == 1 else many


def _canonical(value) -> str:
    """A config value as text that two ranks compare exactly (repr keeps every bit of a float: 0.1 != 0.1000001)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float, type(None))):
        return repr(value)
    if isinstance(value, torch.device):
        return str(value)
    return json.dumps(value, sort_keys=True, default=repr)


def _part(value) -> dict:
    """Size, type, shape and SHA-256 of one piece of data: a tensor, bytes, or a file (hashed by content)."""
    if isinstance(value, torch.Tensor):
        shape = list(value.shape)
        return {"size": shape[0] if shape else 1, "type": f"{str(value.dtype).removeprefix('torch.')} {shape}",
                "sha256": _sha256(value).hex()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return {"size": len(raw), "type": "bytes", "sha256": hashlib.sha256(raw).hexdigest()}
    if isinstance(value, (str, os.PathLike)):
        h, n = hashlib.sha256(), 0
        with open(value, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                n += len(chunk)
        return {"size": n, "type": "bytes", "sha256": h.hexdigest()}  # a file is its bytes: same as bytes(...)
    raise DistributedError(f"cannot fingerprint data of type {type(value).__name__}: pass tensors, bytes or paths")


def architecture(model: nn.Module) -> str:
    """The parameter and buffer names, shapes and dtypes of ``model`` as one short line (for :func:`agree`)."""
    entries = [(n, str(tuple(t.shape)), str(t.dtype)) for n, t in model.state_dict().items()]
    numel = sum(t.numel() for t in model.state_dict().values())
    return (f"{len(entries)} tensors, {numel:,} numbers, "
            f"sha256 {hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]}")


def fingerprint(config: Mapping[str, object], data: Mapping[str, object] | None = None) -> dict:
    """What :func:`agree` compares between ranks: each config value as canonical text, and for each data set its
    size and, per part (``{"images": tensor, "labels": tensor}``, or one tensor/bytes/path), type and SHA-256.

    The versions of freezepack and torch and the process group's backend are added to the config: a rank on
    another release or backend does not train the same model.
    """
    from .. import __version__

    cfg = {str(k): _canonical(v) for k, v in config.items()}
    cfg.setdefault("freezepack version", __version__)
    cfg.setdefault("torch version", torch.__version__)
    if dist.is_available() and dist.is_initialized():
        cfg.setdefault("backend", str(dist.get_backend()))
    sets = {}
    for name, value in (data or {}).items():
        parts = {str(k): _part(v) for k, v in value.items()} if isinstance(value, Mapping) else {"": _part(value)}
        first: dict[str, Any] = next(iter(parts.values()), {"size": 0, "type": "bytes"})
        sets[str(name)] = {"size": first["size"], "unit": "examples" if "bytes" not in first["type"] else "bytes",
                           "parts": parts}
    return {"config": cfg, "data": sets}


def _show(text: str | None) -> str:
    if text is None:
        return "nothing"
    return text if len(text) <= 60 else text[:57] + "..."


def describe_disagreement(reference: dict, others: Mapping[int, dict], stage: str = "training") -> str | None:
    """One line naming every field and data set in which ``others`` (rank -> fingerprint) differ from rank 0's
    ``reference``, and the ranks; None when they all agree."""
    items: list[str] = []
    odd: set[int] = set()

    def differ(label: str, ref, values: dict[int, object], show=_show, unit: str = "") -> None:
        groups: dict = {}
        for r, v in sorted(values.items()):
            if v != ref:
                groups.setdefault(v, []).append(r)
        if groups:
            odd.update(r for rs in groups.values() for r in rs)
            items.append(f"{label}: rank 0 has {show(ref)}{unit}, " + ", ".join(
                f"{_ranks(rs)} {_verb(rs, 'has', 'have')} {show(v)}" for v, rs in groups.items()))

    keys = list(reference["config"])
    keys += sorted({k for fp in others.values() for k in fp["config"]} - set(keys))
    for k in keys:
        differ(k, reference["config"].get(k), {r: fp["config"].get(k) for r, fp in others.items()})
    names = list(reference["data"])
    names += sorted({n for fp in others.values() for n in fp["data"]} - set(names))
    for name in names:
        ref = reference["data"].get(name)
        sets = {r: fp["data"].get(name) for r, fp in others.items()}
        size = (lambda s: None if s is None else s["size"])  # noqa: E731
        unit = "" if ref is None else " " + ref.get("unit", "examples")
        differ(f"{name} size", size(ref), {r: size(s) for r, s in sets.items()},
               show=lambda n: "nothing" if n is None else f"{n:,}", unit=unit)
        if ref is None:
            continue
        changed: dict[tuple, list[int]] = {}  # same size: which parts differ in contents (or shape/dtype)
        for r, s in sets.items():
            if s is None or size(s) != size(ref):
                continue
            parts = tuple(p for p in sorted(set(ref["parts"]) | set(s["parts"]))
                          if ref["parts"].get(p) != s["parts"].get(p))
            if parts:
                changed.setdefault(parts, []).append(r)
        for parts, rs in changed.items():
            odd.update(rs)
            what = ", ".join(p for p in parts if p) or "contents"
            items.append(f"{name}: same size ({size(ref):,}{unit}), different {what} on {_ranks(rs)}")
    if not items:
        return None
    odd_ranks = sorted(odd)
    return (f"{_ranks(odd_ranks)} {_verb(odd_ranks, 'disagrees', 'disagree')} with rank 0 before {stage}, "
            f"nothing was trained: " + "; ".join(items))


class Rendezvous:
    """Steps every rank takes together, coordinated through a key-value store (``torch.distributed.Store``).

    Each call is a numbered round under ``freezepack/<world>/<n>/`` in the store: a rank posts what it has, then
    waits until every rank has arrived, at most ``timeout`` seconds; a rank that did not arrive is named. Only
    small strings travel, and no collective runs, so a rank with another backend or device still gets the
    message. :func:`agree` and :func:`together` use the default process group's store; tests can pass any store.
    """

    def __init__(self, store, rank: int, world: int, timeout: float = DEFAULT_TIMEOUT_S):
        if timeout <= 0:
            raise DistributedError(f"timeout must be positive, got {timeout}")
        self.store, self.rank, self.world, self.timeout = store, rank, world, float(timeout)

    @classmethod
    def of_default_group(cls, timeout: float | None = None) -> Rendezvous:
        _require_group()
        try:
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, ValueError, KeyError) as e:  # private in torch; pinned, but say so if it moves
            raise DistributedError(f"this torch does not expose the process group's store: {e}") from None
        return cls(store, dist.get_rank(), dist.get_world_size(), DEFAULT_TIMEOUT_S if timeout is None else timeout)

    def _round(self) -> tuple[str, float]:
        # every rank adds 1 per round, and no rank starts round n+1 before all added for round n: same n everywhere
        n = self.store.add(f"freezepack/{self.world}/rounds", 1)
        return f"freezepack/{self.world}/{(n - 1) // self.world}", time.monotonic() + self.timeout

    def _wait(self, key: str, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:  # a zero timeout means "wait forever" to the store
            return self.store.check([key])
        try:
            self.store.wait([key], datetime.timedelta(seconds=left))
            return True
        except RuntimeError:  # the store's timeout (DistStoreError, or RuntimeError from a FileStore)
            return self.store.check([key])

    def _meet(self, key: str, deadline: float, stage: str) -> None:
        """Return when every rank has arrived at ``key``; otherwise name those that did not, on every rank."""
        self.store.set(f"{key}/here/{self.rank}", b"1")
        if self.store.add(f"{key}/here", 1) == self.world:
            self.store.set(f"{key}/all", b"1")
        if not self._wait(f"{key}/all", deadline):
            missing = [r for r in range(self.world) if not self.store.check([f"{key}/here/{r}"])]
            if missing:
                self.store.set(f"{key}/gave-up", str(self.rank).encode())
                raise DistributedError(f"{_ranks(missing)} did not reach {stage} within {self.timeout:g} s "
                                       f"(stopped, failed, still busy or started with other options); "
                                       f"the wait is bounded by --collective-timeout / timeout=")
        if self.store.check([f"{key}/gave-up"]):
            who = self.store.get(f"{key}/gave-up").decode()
            raise DistributedError(f"rank {who} stopped waiting at {stage} before this rank (rank {self.rank}) "
                                   f"arrived: it was more than {self.timeout:g} s late")

    def _verdict(self, key: str, deadline: float, compose: Callable[[], str]) -> str:
        """Rank 0 composes the message from the store; the others read it, so every rank raises the same line."""
        if self.rank == 0:
            message = compose()
            self.store.set(f"{key}/verdict", message.encode())
            return message
        if self._wait(f"{key}/verdict", deadline + self.timeout):
            return self.store.get(f"{key}/verdict").decode()
        return "the ranks disagree, but rank 0 did not say how (it stopped)"

    def agree(self, fp: dict, stage: str = "training") -> str:
        """Raise the same DistributedError on every rank unless all ``fp`` (:func:`fingerprint`) equal rank 0's;
        returns the agreed fingerprint's SHA-256."""
        blob = json.dumps(fp, sort_keys=True).encode()
        key, deadline = self._round()
        self.store.set(f"{key}/fingerprint/{self.rank}", blob)
        if self.rank != 0 and self._wait(f"{key}/fingerprint/0", deadline):
            if self.store.get(f"{key}/fingerprint/0") != blob:  # posted before arriving: complete once all meet
                self.store.set(f"{key}/differs/{self.rank}", b"1")
                self.store.add(f"{key}/differs", 1)
        self._meet(key, deadline, f"the agreement check before {stage}")
        if self.store.add(f"{key}/differs", 0):
            def compose() -> str:
                odd = [r for r in range(1, self.world) if self.store.check([f"{key}/differs/{r}"])]
                others = {r: json.loads(self.store.get(f"{key}/fingerprint/{r}")) for r in odd}
                return (describe_disagreement(json.loads(blob), others, stage)
                        or f"{_ranks(odd)} hold a fingerprint that differs from rank 0's")
            raise DistributedError(self._verdict(key, deadline, compose))
        return hashlib.sha256(blob).hexdigest()

    def together(self, stage: str, fn: Callable[[], object]):
        """``fn()`` on this rank; if it fails on any rank, every rank raises the same one-line DistributedError.

        A FreezepackError or OSError is reported as its message; anything else (a bug) is reported to the other
        ranks by type and message and re-raised here with its traceback.
        """
        result, error, message = None, None, None
        try:
            result = fn()
        except FreezepackError as e:
            message = str(e)
        except OSError as e:
            message = f"{e.filename or ''}: {e.strerror or e}" if e.filename else str(e)
        except Exception as e:  # noqa: BLE001 - reported to the others, then re-raised below
            error, message = e, f"{type(e).__name__}: {e}".splitlines()[0]
        key, deadline = self._round()
        if message is not None:  # posted before arriving: every failure is in the store once all have met
            self.store.set(f"{key}/failed/{self.rank}", message.encode())
            self.store.add(f"{key}/failed", 1)
        self._meet(key, deadline, stage)
        if self.store.add(f"{key}/failed", 0):
            def compose() -> str:
                groups: dict[str, list[int]] = {}
                for r in range(self.world):
                    if self.store.check([f"{key}/failed/{r}"]):
                        groups.setdefault(self.store.get(f"{key}/failed/{r}").decode(), []).append(r)
                return "; ".join(f"{_ranks(rs)} failed {stage}: {m}" for m, rs in groups.items())
            verdict = self._verdict(key, deadline, compose)
            if error is not None:
                raise error
            raise DistributedError(verdict)
        return result


def agree(config: Mapping[str, object], data: Mapping[str, object] | None = None, *,
          timeout: float | None = None, stage: str = "training") -> str:
    """Prove before training that every rank runs the same configuration on the same data.

    ``config``: everything that changes the result (``{"epochs": 15, "lr": 0.1, ...}``); ``data``:
    ``{"train set": {"images": x, "labels": y}, ...}`` (tensors, bytes or file paths). A difference is one
    DistributedError on every rank naming the fields / data sets (size or contents) and the ranks, e.g.
    ``rank 1 disagrees with rank 0 before training, nothing was trained: epochs: rank 0 has 2, rank 1 has 3``.
    ``timeout``: seconds to wait for the other ranks (default 300). Returns the agreed fingerprint's SHA-256.
    """
    rendezvous = Rendezvous.of_default_group(timeout)
    # hashing reads files / tensors, which can fail on one rank only: then every rank says so
    fp = rendezvous.together("fingerprinting its configuration and data", lambda: fingerprint(config, data))
    return rendezvous.agree(fp, stage)


def together(stage: str, fn: Callable[[], object], *, timeout: float | None = None):
    """Run ``fn()`` on every rank; a failure on any rank becomes the same DistributedError on all of them
    (``ranks 0, 1 failed loading the data: /data: data directory not found``) instead of a wait for a rank
    that has already stopped. ``stage`` says what was being done."""
    return Rendezvous.of_default_group(timeout).together(stage, fn)


_COMM_FAILURE = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "gloo/transport",
                 "ProcessGroupGloo", "NCCL error", "Socket Timeout", "wait timeout")


@contextlib.contextmanager
def collective_errors(stage: str):
    """Turn a collective that failed or timed out (a peer stopped, or never came) into one DistributedError line.

    Other RuntimeErrors (a model's shape error, say) pass through unchanged.
    """
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if not (isinstance(e, dist.DistError) or any(s in text for s in _COMM_FAILURE)):
            raise
        reason = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        if reason.startswith("[") and "] " in reason:  # gloo prefixes its source location: "[.../pair.cc:553] "
            reason = reason.split("] ", 1)[1]
        reason = reason.split(". ", 1)[0]  # the fact, not gloo's advice that follows it
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise DistributedError(f"rank {rank}: {stage}: a collective did not complete ({reason}): another rank "
                               f"stopped, failed or is waiting elsewhere; the wait is bounded by "
                               f"--collective-timeout / init_worker(timeout=)") from None
