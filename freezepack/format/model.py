"""What a .fpk file *means*, whatever its version: typed, immutable entries and header, and the reader's limits.

A file holds a seed, user metadata and an ordered list of entries (state_dict tensors), each one of:

* :class:`FrozenEntry`: regenerated from seed + initializer + stream, its trainable entries (a coded mask) replaced
  by stored values, optionally scaled (FreezeNet-WD);
* :class:`WholeEntry`: stored as is;
* :class:`AliasEntry`: the same tensor as an earlier non-alias entry (tied weights), stored once.

The readers (``v1``, ``v2``) produce these, ``rules.check_header`` judges them, the writers consume them. How a
version lays out the parts of an entry (its mask payload, its values, a whole tensor's bytes) stays inside it; every
part has one key whatever the version: ``name`` (whole), ``name#mask``, ``name#values``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal

from ..errors import FormatError
from .dtypes import DTYPE_SIZES
from .init import InitSpec
from .rng import SPEC_VERSION

MASK_SUFFIX = "#mask"
VALUES_SUFFIX = "#values"
MAX_HEADER_BYTES = 100_000_000   # safetensors refuses bigger headers, so a .fpk may not have one either
VERSIONS = (1, 2)                # what this reader reads; a newer number is an "upgrade freezepack" error


@dataclass(frozen=True)
class Limits:
    """What a reader agrees to parse and allocate for one file. Each limit is checked *before* the work it bounds
    and exceeding one is a FormatError naming it; raise one for a trusted file, e.g.
    ``freezepack.load(p, limits=Limits(max_dense_bytes=64 << 30))``.
    """

    max_tensor_elements: int = 1 << 32      # one dense tensor (and any one of its dimensions): 16 GiB of float32
    max_total_elements: int = 1 << 34       # all dense tensors together
    max_tensors: int = 1 << 16
    max_ndim: int = 16
    max_metadata_bytes: int = 1 << 20       # user metadata, and x- extension members in all (canonical JSON bytes)
    max_header_bytes: int = 1 << 24         # 16 MiB (~28k tensors); the format's cap is MAX_HEADER_BYTES
    max_json_values: int = 1 << 19          # per JSON text: ~11k frozen tensors; counted before parsing
    max_json_depth: int = 32                # a valid header nests 6 deep; x- members may add some
    max_dense_bytes: int | None = None      # what one load may materialize; None = half the memory free now


DEFAULT_LIMITS = Limits()
# A writer checks its own header with limits that keep the checks, not the caps: a big model is no bomb.
WRITER_LIMITS = Limits(max_tensor_elements=1 << 63, max_total_elements=1 << 63, max_tensors=1 << 40,
                       max_header_bytes=MAX_HEADER_BYTES, max_json_values=1 << 40, max_json_depth=1 << 20)


def short(v: object) -> str:
    """``repr(v)``, cut to 60 characters: untrusted values in error messages stay readable."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def limit_error(what: str, value: object, name: str, limits: Limits, path=None, tensor=None) -> FormatError:
    """The one message for an exceeded reader limit: which limit, its value, and how to raise it."""
    return FormatError(f"{what} ({value}) exceeds the reader limit {name}={getattr(limits, name)}; if you trust "
                       f"this file, raise it: limits=freezepack.format.model.Limits({name}=...)", path=path,
                       tensor=tensor)


@dataclass(frozen=True)
class FrozenEntry:
    """A tensor regenerated from (seed, ``init``, ``stream_key``), rounded to ``dtype``, times ``frozen_scale``,
    with its ``trainable`` mask positions (coded by ``coder`` in ``mask_words`` 32-bit words) set to stored values.
    ``sha256``: hex digest of the dense little-endian bytes (64 digits; v2 stores the first 32)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    sha256: str
    init: InitSpec
    frozen_scale: float = 1.0
    trainable: int = 0
    coder: str = "const"
    coder_params: Mapping[str, Any] = field(default_factory=dict)
    mask_words: int = 0
    stream: str | None = None                # generator stream key when it differs from ``name``
    kind: ClassVar[Literal["frozen"]] = "frozen"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stream_key(self) -> str:
        """The generator stream name (RNG.md §2.1): fixed when the tensor was frozen, the name by default."""
        return self.name if self.stream is None else self.stream

    @property
    def mask_key(self) -> str | None:
        return self.name + MASK_SUFFIX if self.mask_words else None

    @property
    def values_key(self) -> str | None:
        return self.name + VALUES_SUFFIX if self.trainable else None


@dataclass(frozen=True)
class WholeEntry:
    """A tensor stored as it is (any dtype). ``sha256``: hex digest of its bytes (v1); None in v2, whose body
    digest covers them."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    sha256: str | None
    kind: ClassVar[Literal["whole"]] = "whole"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def data_key(self) -> str:
        return self.name


@dataclass(frozen=True)
class AliasEntry:
    """A tied tensor: the same values as the earlier non-alias entry ``of`` (``Header.target`` finds it)."""

    name: str
    of: str
    kind: ClassVar[Literal["alias"]] = "alias"


Entry = FrozenEntry | WholeEntry | AliasEntry
Stored = FrozenEntry | WholeEntry            # an entry whose bytes the file holds


@dataclass(frozen=True)
class Header:
    """A file's meaning: seed, entries in file order, string metadata, and who wrote it."""

    seed: int
    entries: tuple[Entry, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)
    producer: str = ""
    generator: str = SPEC_VERSION
    version: int = 2

    @cached_property
    def by_name(self) -> dict[str, Entry]:
        return {e.name: e for e in self.entries}

    def target(self, e: Entry) -> Stored:
        """The entry whose tensor ``e`` is: itself, or an alias's target (checked by the rules on read)."""
        t = self.by_name[e.of] if isinstance(e, AliasEntry) else e
        if isinstance(t, AliasEntry):
            raise FormatError(f"alias of {t.name!r}, itself an alias", tensor=e.name)
        return t


def digest_ok(expected: str, got_hex: str) -> bool:
    """Does a dense tensor's SHA-256 (hex) match an entry's digest: full (v1, 64 hex) or truncated (v2, 32 hex)."""
    return len(expected) in (32, 64) and got_hex[:len(expected)] == expected


def dense_bytes(e: Entry) -> int:
    """Bytes of the reconstructed tensor (0 for an alias: it shares its target's storage)."""
    return 0 if isinstance(e, AliasEntry) else e.numel * DTYPE_SIZES[e.dtype]


# What a writer is given besides the header: part key -> (dtype, shape, little-endian bytes[, coding hint]). A frozen
# entry's mask part holds its v1-coded payload (U32 words); the hint is a lossy quantizer's {"step": grid step}.
Parts = dict[str, tuple]
