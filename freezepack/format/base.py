"""The interface every version's reader offers: what api, conversion and fleet see of an open .fpk.

A reader holds the validated :class:`~freezepack.format.model.Header` and hands out an entry's parts on demand,
each checked against its digest: a whole tensor's bytes, a frozen tensor's trained values (decoded, little-endian)
and its mask (as ascending trainable positions), plus how each part is coded and what the file's bytes are spent on.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import IO, Any

import numpy as np

from ..errors import FormatError
from . import entropy, maskcode
from .model import Entry, FrozenEntry, Header, Limits, WholeEntry


def mask_indices(e: FrozenEntry, words: np.ndarray, keys: Any = None, where=None) -> np.ndarray:
    """Ascending positions of ``e``'s trainable entries from its mask payload ``words``; ``keys`` (or ``keys()``)
    is the ``ans-ctx`` context (|w_init| bits), needed by that coder only."""
    if e.coder == "ans-ctx":
        if keys is None:
            raise FormatError("'ans-ctx' mask needs the regenerated frozen values", path=where, tensor=e.name)
        return entropy.decode_ctx(e.numel, e.trainable, e.shape, dict(e.coder_params), words,
                                  keys() if callable(keys) else keys, where, e.name)
    return maskcode.decode_indices(e.coder, e.numel, e.trainable, dict(e.coder_params), words, where=where,
                                   tensor=e.name)


class Reader(ABC):
    """An open .fpk file (the file is opened once; its size comes from the open file, so a concurrent atomic
    replace is read consistently as the old file). Use as a context manager."""

    version: int
    header: Header

    def __init__(self, f: IO[bytes], path: str, file_size: int, data_start: int, limits: Limits):
        self._f, self.path, self.file_size, self.data_start, self.limits = f, path, file_size, data_start, limits

    # --- what each version provides ---------------------------------------------------------------------------

    @abstractmethod
    def _read_part(self, key: str, tensor: str | None) -> bytearray:
        """Digest-checked bytes of a part: decoded little-endian values / whole data, or a mask's coded payload."""

    @abstractmethod
    def part_nbytes(self, key: str | None) -> int:
        """Bytes a part takes in the file (0 for None)."""

    @abstractmethod
    def part_coding(self, key: str | None) -> str | None:
        """How a values / whole part is coded, for humans: ``raw``, ``planes``, ``cast:BF16``, ``codebook:16``."""

    @property
    @abstractmethod
    def header_bytes(self) -> int:
        """File bytes before the first payload (safetensors JSON and the format's own header)."""

    @abstractmethod
    def breakdown(self) -> dict[str, int]:
        """Bytes by role: ``file``, ``structure``, ``mask_model``, ``value_model``, ``mask_payload``,
        ``values_payload``, ``whole_payload`` (they add up to ``file``)."""

    # --- version-neutral ----------------------------------------------------------------------------------------

    def read_bytes(self, key: str, tensor: str | None = None) -> bytearray:
        """A part's bytes (see :meth:`_read_part`); a BOOL tensor's bytes must be 0 or 1 (spec §3)."""
        buf = self._read_part(key, tensor)
        e = self.header.by_name.get(key)
        if isinstance(e, WholeEntry) and e.dtype == "BOOL" and buf and int(np.frombuffer(buf, np.uint8).max()) > 1:
            raise FormatError(f"BOOL tensor {key!r} holds a byte other than 0 or 1", path=self.path, tensor=tensor)
        return buf

    def read_array(self, key: str, np_dtype: str, tensor: str | None = None) -> np.ndarray:
        return np.frombuffer(self.read_bytes(key, tensor), dtype=np_dtype)

    def whole_bytes(self, e: WholeEntry) -> bytearray:
        return self.read_bytes(e.data_key, e.name)

    def values_bytes(self, e: FrozenEntry) -> bytearray | None:
        """A frozen entry's trained values (little-endian, its dtype), None when nothing is trainable."""
        return self.read_bytes(e.values_key, e.name) if e.values_key else None

    def mask_words(self, e: FrozenEntry) -> np.ndarray:
        return self.read_array(e.mask_key, "<u4", e.name) if e.mask_key else np.zeros(0, np.uint32)

    def mask_indices(self, e: FrozenEntry, words: np.ndarray, keys: Any = None) -> np.ndarray:
        return mask_indices(e, words, keys, self.path)

    def entry(self, name: str) -> Entry:
        return self.header.by_name[name]

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
