"""JSON from outside (TUF metadata, OCI manifests, release layouts, device state), bounded BEFORE parsing.

``json.loads`` of a few MB can cost far more memory than the text (``[{},{},...]``: ~70 bytes of objects per
3 bytes of text) and a deep nesting raises ``RecursionError`` (not a ``ValueError``) from deep inside. So the text
is first checked for size, nesting depth and number of values with the format's scan (strictjson.scan), which
allocates only a bounded amount, and only then parsed; every refusal is a ``FleetError`` naming what was wrong.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import FleetError
from ..format.strictjson import scan


@dataclass(frozen=True)
class JsonLimits:
    max_bytes: int
    max_depth: int = 32
    max_containers: int = 100_000      # objects + arrays
    max_values: int = 500_000          # every value and key (a short string costs ~60 bytes once parsed)


# Sized for real repositories (ngclient's own download caps for the TUF roles; a targets file of ~25 models with
# ~1,000 tensors each) while keeping a refused or an accepted parse under 64 MiB
# (freezepack/testing/fleet_memprobe.py).
TUF_LIMITS = {"root": JsonLimits(512_000), "timestamp": JsonLimits(16_384),
              "snapshot": JsonLimits(2_000_000, max_values=500_000),
              "targets": JsonLimits(5_000_000, max_values=500_000)}
MANIFEST_LIMITS = JsonLimits(1 << 20, max_depth=16, max_containers=50_000, max_values=200_000)
STATE_LIMITS = JsonLimits(1 << 20, max_depth=8, max_containers=10_000, max_values=100_000)


def check_structure(data: bytes, limits: JsonLimits, *, what: str, path=None) -> None:
    """Refuse ``data`` unless it is within ``limits``: its size, then (one bounded-memory scan, the format's
    ``strictjson.scan``) nesting depth, objects/arrays and an upper bound of the values (keys included)."""
    if len(data) > limits.max_bytes:
        raise FleetError(f"{what} is {len(data)} bytes, more than the limit of {limits.max_bytes}", path=path)
    shape = scan(data)
    if shape.unbalanced:
        raise FleetError(f"{what} is not JSON (unbalanced brackets)", path=path)
    if shape.depth > limits.max_depth:
        raise FleetError(f"{what} nests deeper than {limits.max_depth} levels", path=path)
    if shape.containers > limits.max_containers:
        raise FleetError(f"{what} has more than {limits.max_containers} objects/arrays (the limit)", path=path)
    if shape.containers + shape.commas + shape.colons + 1 > limits.max_values:
        raise FleetError(f"{what} has more than {limits.max_values} values (the limit)", path=path)
    if shape.open_string:
        raise FleetError(f"{what} is not JSON (unterminated string)", path=path)


def loads(data: bytes, limits: JsonLimits, *, what: str, path=None):
    """``json.loads`` after ``check_structure``; any parse failure is a ``FleetError``."""
    check_structure(data, limits, what=what, path=path)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:    # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FleetError(f"{what} is not JSON ({e})", path=path) from None
