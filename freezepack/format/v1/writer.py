"""Format v1, model -> bytes: the safetensors layout with the canonical JSON freezepack header (FORMAT.md §3-5).

Deterministic (same header and parts -> same bytes) and self-checking: the header is parsed back by the v1 reader
(so by the rules) before a single byte is handed out.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from ...errors import FormatError, SpecError
from ..dtypes import DTYPE_SIZES
from ..framing import frame
from ..model import WRITER_LIMITS, Header, Parts, short
from ..strictjson import canonical_json, valid_text
from .layout import HEADER_DIGEST_KEY, HEADER_KEY, header_json, layout_order
from .reader import parse_header


def encode_file(h: Header, parts: Parts) -> list[bytes]:
    """The byte chunks of a v1 file, in order (prefix + header, then each stored tensor).

    ``parts`` maps part key (``name``, ``name#mask``, ``name#values``) -> (dtype, shape, little-endian bytes[,
    hint]); v1 stores each as one safetensors tensor.
    """
    for text in [e.name for e in h.entries] + list(parts) + [h.producer] + [x for kv in h.metadata.items()
                                                                              for x in kv]:
        if not isinstance(text, str) or not valid_text(text):
            raise SpecError(f"{short(text)} is not valid Unicode text (a lone surrogate?): it cannot be stored")
    for k, (dtype, _, data, *_) in parts.items():
        if dtype == "BOOL" and len(data) and int(np.frombuffer(data, np.uint8).max()) > 1:
            raise SpecError(f"BOOL tensor {k!r} holds a byte other than 0 or 1", tensor=k)
    order = layout_order({k: v[0] for k, v in parts.items()})
    offset = 0
    stored = {}
    for k in order:
        dtype, shape, data = parts[k][:3]
        nbytes = len(data)
        if nbytes != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise FormatError(f"stored tensor {k!r}: {nbytes} bytes for {dtype} shape {list(shape)}")
        stored[k] = (dtype, tuple(shape), offset, offset + nbytes, hashlib.sha256(data).hexdigest())
        offset += nbytes
    inner = canonical_json(header_json(h, stored))
    outer: dict = {"__metadata__": {HEADER_KEY: inner,
                                    HEADER_DIGEST_KEY: hashlib.sha256(inner.encode("utf-8")).hexdigest()}}
    for k, (dtype, shape, start, end, _) in stored.items():
        outer[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    head = frame(canonical_json(outer))
    # A writer never publishes what its reader refuses: the header must pass the reader's own checks.
    parse_header(head[8:], len(head) + offset, limits=WRITER_LIMITS)
    return [head] + [parts[k][2] for k in order]
