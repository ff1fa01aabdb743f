"""Format v1's names and layout rules, shared by its reader and writer (spec/FORMAT.md §3, §5)."""
from __future__ import annotations

from ..dtypes import DTYPE_SIZES
from ..model import AliasEntry, Entry, FrozenEntry, Header

FORMAT_NAME = "freezepack"
FORMAT_VERSION = 1
HEADER_KEY = "freezepack"                 # __metadata__ key: the freezepack header, canonical JSON text
HEADER_DIGEST_KEY = "freezepack.sha256"   # __metadata__ key: SHA-256 (hex) of that text's UTF-8 bytes


def layout_order(keys_dtypes: dict[str, str]) -> list[str]:
    """Data order: widest element first (so every tensor is aligned to its element size), then by key."""
    return sorted(keys_dtypes, key=lambda k: (-DTYPE_SIZES[keys_dtypes[k]], k))


def entry_json(e: Entry) -> dict:
    """An entry as the v1 header spells it (FORMAT.md §5)."""
    if isinstance(e, AliasEntry):
        return {"name": e.name, "kind": "alias", "of": e.of}
    d: dict = {"name": e.name, "kind": e.kind, "shape": list(e.shape), "dtype": e.dtype, "sha256": e.sha256}
    if not isinstance(e, FrozenEntry):
        d["data"] = e.name
        return d
    if e.stream is not None and e.stream != e.name:
        d["stream"] = e.stream
    d.update(init=e.init.to_json(), frozen_scale=e.frozen_scale, trainable=e.trainable,
             mask={"coder": e.coder, "params": dict(e.coder_params), "tensor": e.mask_key}, values=e.values_key)
    return d


def header_json(h: Header, stored: dict) -> dict:
    """The inner header; ``stored``: key -> (dtype, shape, start, end, sha256) of each stored tensor."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "producer": h.producer,
        "generator": h.generator,
        "seed": str(h.seed),
        "metadata": dict(h.metadata),
        "tensors": [entry_json(e) for e in h.entries],
        "stored": {k: {"dtype": dt, "shape": list(shape), "data_offsets": [start, end], "sha256": sha}
                   for k, (dt, shape, start, end, sha) in stored.items()},
    }
