"""JSON from outside (TUF metadata, OCI manifests, release layouts, device state), bounded BEFORE parsing.

``json.loads`` of a few MB can cost far more memory than the text (``[{},{},...]``: ~70 bytes of objects per
3 bytes of text) and a deep nesting raises ``RecursionError`` (not a ``ValueError``) from deep inside. So the text
is first checked for size, nesting depth and number of values with a scan that allocates only a bounded
amount, and only then parsed; every refusal is a ``FleetError`` naming what was wrong.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..errors import FleetError

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE = np.zeros(256, np.int8)
_CLOSE[[ord("]"), ord("}")]] = 1
_SEP = np.zeros(256, np.int8)
_SEP[[ord(","), ord(":")]] = 1
_CHUNK = 1 << 16          # scan window: a few MB of numpy temporaries whatever the input size


@dataclass(frozen=True)
class JsonLimits:
    max_bytes: int
    max_depth: int = 32
    max_containers: int = 100_000      # objects + arrays
    max_values: int = 500_000          # every value and key (a short string costs ~60 bytes once parsed)


# Sized for real repositories (ngclient's own download caps for the TUF roles; a targets file of ~25 models with
# ~1,000 tensors each) while keeping a refused or an accepted parse under 64 MiB (freezepack/testing/fleet_memprobe.py).
TUF_LIMITS = {"root": JsonLimits(512_000), "timestamp": JsonLimits(16_384),
              "snapshot": JsonLimits(2_000_000, max_values=500_000),
              "targets": JsonLimits(5_000_000, max_values=500_000)}
MANIFEST_LIMITS = JsonLimits(1 << 20, max_depth=16, max_containers=50_000, max_values=200_000)
STATE_LIMITS = JsonLimits(1 << 20, max_depth=8, max_containers=10_000, max_values=100_000)


def check_structure(data: bytes, limits: JsonLimits, *, what: str, path=None) -> None:
    """Refuse ``data`` unless it is within ``limits``. A vectorised scan in fixed-size windows (its memory does
    not grow with the input): quotes not escaped by an odd run of backslashes open and close strings; brackets,
    commas and colons outside strings give the nesting depth and an upper bound of the number of values."""
    if len(data) > limits.max_bytes:
        raise FleetError(f"{what} is {len(data)} bytes, more than the limit of {limits.max_bytes}", path=path)
    arr = np.frombuffer(data, np.uint8)
    depth = max_depth = containers = seps = 0
    run = 0           # backslashes ending the previous window
    inside = 0        # 1 when the previous window ended inside a string
    for i in range(0, len(arr), _CHUNK):
        seg = arr[i:i + _CHUNK]
        n = len(seg)
        bs = seg == _BACKSLASH
        pos = np.arange(n, dtype=np.int64)
        last_plain = np.maximum.accumulate(np.where(bs, -1, pos))     # last non-backslash at or before j
        before = np.empty(n, np.int64)                                # backslashes just before j
        before[0] = run
        prev = last_plain[:-1]
        before[1:] = np.where(prev < 0, pos[1:] + run, pos[:-1] - prev)
        quote = (seg == _QUOTE) & (before % 2 == 0)
        parity = (np.cumsum(quote, dtype=np.int64) + inside) % 2      # 1 inside a string (and on its opening quote)
        outside = parity == 0
        step = (_OPEN[seg].astype(np.int32) - _CLOSE[seg]) * outside
        level = np.cumsum(step) + depth
        max_depth = max(max_depth, int(level.max()))
        if int(level.min()) < 0:
            raise FleetError(f"{what} is not JSON (unbalanced brackets)", path=path)
        if max_depth > limits.max_depth:
            raise FleetError(f"{what} nests deeper than {limits.max_depth} levels", path=path)
        depth = int(level[-1])
        containers += int(np.count_nonzero(_OPEN[seg].astype(bool) & outside))
        seps += int(np.count_nonzero(_SEP[seg].astype(bool) & outside))
        run = run + n if last_plain[-1] < 0 else n - 1 - int(last_plain[-1])
        inside = int(parity[-1])
        if containers > limits.max_containers:
            raise FleetError(f"{what} has more than {limits.max_containers} objects/arrays (the limit)", path=path)
        if containers + seps + 1 > limits.max_values:
            raise FleetError(f"{what} has more than {limits.max_values} values (the limit)", path=path)
    if inside:
        raise FleetError(f"{what} is not JSON (unterminated string)", path=path)


def loads(data: bytes, limits: JsonLimits, *, what: str, path=None):
    """``json.loads`` after ``check_structure``; any parse failure is a ``FleetError``."""
    check_structure(data, limits, what=what, path=path)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:    # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FleetError(f"{what} is not JSON ({e})", path=path) from None
