"""JSON from outside (TUF metadata, OCI manifests, release layouts, device state), bounded BEFORE parsing.

``json.loads`` of a few MB can cost far more memory than the text (``[{},{},...]``: ~70 bytes of objects per
3 bytes of text) and a deep nesting raises ``RecursionError`` (not a ``ValueError``) from deep inside. So the text
is first checked for size, nesting depth and number of values with a scan that allocates only a bounded
amount, and only then parsed; every refusal is a ``FleetError`` naming what was wrong.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from ..errors import FleetError

# a JSON string: quote, then any non-quote non-backslash or an escape pair, then quote (linear time)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE = np.zeros(256, np.int8)
_CLOSE[[ord("]"), ord("}")]] = 1
_CHUNK = 1 << 18


@dataclass(frozen=True)
class JsonLimits:
    max_bytes: int
    max_depth: int = 32
    max_containers: int = 100_000      # objects + arrays
    max_values: int = 1_000_000        # every value and key


# Sized for real repositories with room to spare (ngclient's own download caps for the TUF roles; a targets file
# of ~50 models with a few thousand pieces each) while keeping a refused or accepted parse well under 64 MiB.
TUF_LIMITS = {"root": JsonLimits(512_000), "timestamp": JsonLimits(16_384),
              "snapshot": JsonLimits(2_000_000), "targets": JsonLimits(5_000_000)}
MANIFEST_LIMITS = JsonLimits(1 << 20, max_depth=16, max_containers=50_000, max_values=200_000)
STATE_LIMITS = JsonLimits(1 << 20, max_depth=8, max_containers=10_000, max_values=100_000)


def check_structure(data: bytes, limits: JsonLimits, *, what: str, path=None) -> None:
    """Refuse ``data`` unless it is within ``limits``; allocates O(len(data)) at most once (the string-free copy)."""
    if len(data) > limits.max_bytes:
        raise FleetError(f"{what} is {len(data)} bytes, more than the limit of {limits.max_bytes}", path=path)
    if b"\\" in data:
        data = re.sub(rb"\\.", b"", data, flags=re.DOTALL)     # escapes first, so \" cannot end a string
    bare = _STRING.sub(b"0", data)                             # strings hold no structure
    if b'"' in bare:
        raise FleetError(f"{what} is not JSON (unterminated string)", path=path)
    arr = np.frombuffer(bare, np.uint8)
    depth = max_depth = 0
    for i in range(0, len(arr), _CHUNK):
        seg = arr[i:i + _CHUNK]
        step = _OPEN[seg].astype(np.int32) - _CLOSE[seg]
        level = np.cumsum(step) + depth
        if len(level):
            max_depth = max(max_depth, int(level.max()))
            if level.min() < 0:
                raise FleetError(f"{what} is not JSON (unbalanced brackets)", path=path)
            depth = int(level[-1])
        if max_depth > limits.max_depth:
            raise FleetError(f"{what} nests deeper than {limits.max_depth} levels", path=path)
    containers = bare.count(b"[") + bare.count(b"{")
    if containers > limits.max_containers:
        raise FleetError(f"{what} has {containers} objects/arrays, more than the limit of "
                         f"{limits.max_containers}", path=path)
    values = containers + bare.count(b",") + bare.count(b":") + 1
    if values > limits.max_values:
        raise FleetError(f"{what} has about {values} values, more than the limit of {limits.max_values}",
                         path=path)


def loads(data: bytes, limits: JsonLimits, *, what: str, path=None):
    """``json.loads`` after ``check_structure``; any parse failure is a ``FleetError``."""
    check_structure(data, limits, what=what, path=path)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:    # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FleetError(f"{what} is not JSON ({e})", path=path) from None
