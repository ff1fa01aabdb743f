"""One way to open a .fpk, whatever its version: sniff the version from the frame and return that version's
:class:`~freezepack.format.base.Reader` (the same interface for every version).

    with open_file(path) as r:
        for e in r.header.entries: ...

A version this reader does not know yet (a newer freezepack wrote it) is a FormatError saying to upgrade.
"""
from __future__ import annotations

import sys

from ..errors import FormatError
from .base import Reader
from .framing import parse_prefix
from .io import open_regular, read_exact
from .model import DEFAULT_LIMITS, VERSIONS, Limits
from .v1.reader import V1Reader
from .v2 import reader as v2_reader
from .v2.wire import declared_version, outer_header


def open_file(path, limits: Limits = DEFAULT_LIMITS) -> Reader:
    """Open and validate a .fpk (any version); parts are read, decoded and digest-checked when asked for."""
    if sys.byteorder != "little":
        raise FormatError("big-endian hosts are not supported yet", path=path)
    f, size = open_regular(path)
    try:
        raw = read_exact(f, parse_prefix(f.read(8), size, path, limits), path)
        version = declared_version(raw)
        if version is None:  # v1: a JSON header (it names its version inside, checked there)
            return V1Reader(f, str(path), size, raw, limits)
        if version == 2:
            return v2_reader.V2Reader(f, str(path), size, raw, limits)
        if version > max(VERSIONS):
            raise FormatError(f"format version {version} is newer than this reader's ({max(VERSIONS)}): upgrade "
                              "freezepack", path=path)
        raise FormatError(f"unsupported format version {version}", path=path)
    except BaseException:
        f.close()
        raise


FpkReader = open_file  # the name callers used before the readers were split by version


def payload_layout(head: bytes, file_size: int, limits: Limits = DEFAULT_LIMITS):
    """Where a file's payloads lie, from its first bytes ``head`` only (no digest checked: for cutting a file into
    pieces that something else verifies, as freezepack.fleet.delta does against a signed hash).

    Returns ``[(offset, length, label), ...]`` in file order, the first covering everything up to the first payload,
    each next one a part (``name``, ``name#mask``, ``name#values``) - or None when the file is not one whose payloads
    sit inside a single body (v1 and plain safetensors files: cut them at their safetensors tensors).
    """
    if len(head) < 8:
        return None
    n = int.from_bytes(head[:8], "little")
    raw = head[8:8 + n]
    if len(raw) != n or declared_version(raw) != 2:
        return None
    base = 8 + n
    body_len = file_size - base
    if body_len < 32 or head[:base] != outer_header(body_len):
        return None
    header_end, parts = v2_reader.layout(memoryview(head)[base:base + body_len], body_len, limits=limits)
    out = [(0, base + header_end, "")]
    pos = header_end
    for key, start, end in parts:
        if start != pos or end < start:
            return None
        out.append((base + start, end - start, key))
        pos = end
    return out if pos == body_len else None
