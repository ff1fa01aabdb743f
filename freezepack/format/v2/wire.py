"""Format v2's wire: the fixed safetensors frame, the code tables and the primitive encodings (spec/FORMAT.md §12).

A v2 file is a valid safetensors file with exactly one ``U8`` tensor named ``freezepack`` and the metadata
``{"freezepack": "2"}``, so its safetensors JSON is a function of the tensor's length alone; the tensor (the
*body*) is ``SHA-256(rest) || rest`` with ``rest = header || payloads``. Numbers are unsigned LEB128 (minimal),
floats little-endian float32, strings a length and UTF-8, names front-coded against the previous name.
"""
from __future__ import annotations

import math
import re
import struct

from ...errors import FormatError
from ..framing import frame
from ..initializers import INITIALIZERS, TABLE
from ..model import Limits
from ..rng import SPEC_VERSION
from ..strictjson import canonical_json

VERSION = 2
TENSOR_KEY = "freezepack"
GENERATORS = (SPEC_VERSION,)
MASK_CODERS = ("const", "positions", "ans-gaps", "ans-bernoulli", "ans-ctx")
VALUE_CODERS = ("raw", "planes", "cast", "codebook")
KINDS = ("whole", "frozen", "alias")
TAG_STREAM, TAG_SCALE, TAG_PARAMS = 4, 8, 16
DIGEST_BYTES = 16          # per frozen tensor: SHA-256 of the dense bytes, truncated (see spec §12.6)
# The initializer arguments a writer would have to spell out, when they are torch's defaults (the one table's).
DEFAULT_PARAMS = {name: TABLE[name].defaults() for name in INITIALIZERS}
_VERSION_PREFIX = re.compile(rb'\{"__metadata__":\{"freezepack":"([0-9]{1,9})"')
# Derived sizes (names built from front coding) may use at most this much beyond twice the input.
DERIVED_SLACK = 64 << 20


def outer_header(body_len: int) -> bytes:
    """The 8-byte prefix and safetensors JSON of a v2 file whose body has ``body_len`` bytes (all determined)."""
    return frame(canonical_json({"__metadata__": {"freezepack": str(VERSION)},
                                 TENSOR_KEY: {"dtype": "U8", "shape": [body_len], "data_offsets": [0, body_len]}}))


def declared_version(raw_header: bytes) -> int | None:
    """The version a body-carrying file declares (``{"__metadata__":{"freezepack":"N"``), None for another file."""
    m = _VERSION_PREFIX.match(raw_header)
    return int(m.group(1)) if m else None


def is_v2(raw_header: bytes) -> bool:
    return declared_version(raw_header) == VERSION


def zigzag(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1


def unzigzag(v: int) -> int:
    return v // 2 if v % 2 == 0 else -(v + 1) // 2


class Out:
    """A v2 header under construction: bytes, LEB128 varints, float32 and length-prefixed UTF-8 strings."""

    def __init__(self) -> None:
        self.b = bytearray()

    def u8(self, v: int):
        self.b.append(v)

    def var(self, v: int):  # unsigned LEB128, minimal
        v = int(v)
        while True:
            byte = v & 0x7F
            v >>= 7
            if v:
                self.b.append(byte | 0x80)
            else:
                self.b.append(byte)
                return

    def f32(self, v: float):
        self.b += struct.pack("<f", v)

    def str(self, s: str):
        raw = s.encode("utf-8")
        self.var(len(raw))
        self.b += raw


class In:
    """A bounds-checked cursor: every read past the end or malformed number is a FormatError."""

    def __init__(self, data: bytes | memoryview, path):
        self.d, self.i, self.path = data, 0, path
        self.tensor: str | None = None

    def err(self, msg):
        return FormatError(msg, path=self.path, tensor=self.tensor)

    def u8(self) -> int:
        if self.i >= len(self.d):
            raise self.err("v2 header ends early (truncated or corrupted)")
        self.i += 1
        return self.d[self.i - 1]

    def var(self, hi: int = 1 << 64) -> int:
        v = shift = 0
        start = self.i
        while True:
            b = self.u8()
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if shift >= 70:
                raise self.err("v2 varint longer than 10 bytes")
        if self.i - start > 1 and b == 0:
            raise self.err("v2 varint is not minimal")
        if v >= hi:
            raise self.err(f"v2 number {v} out of range (< {hi})")
        return v

    def take(self, n: int) -> bytes | memoryview:
        if n > len(self.d) - self.i:
            raise self.err("v2 header ends early (truncated or corrupted)")
        self.i += n
        return self.d[self.i - n:self.i]

    def f32(self, what) -> float:
        v = struct.unpack("<f", self.take(4))[0]
        if not math.isfinite(v):
            raise self.err(f"{what} is not finite")
        return v

    def str(self, what, max_len: int = 1 << 20) -> str:
        n = self.var()
        if n > max_len:
            raise self.err(f"{what} is longer than {max_len} bytes")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise self.err(f"{what} is not UTF-8") from None


def shape_out(o: Out, shape):
    o.var(len(shape))
    for d in shape:
        o.var(d)


def shape_in(c: In, limits: Limits) -> tuple[int, ...]:
    nd = c.var()
    if nd > limits.max_ndim:
        raise c.err(f"shape has {nd} dimensions, over the limit of {limits.max_ndim}")
    return tuple(c.var() for _ in range(nd))  # (bounded above before it is built; the rules judge the rest)


def common_prefix(a: bytes, b: bytes) -> int:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return i


def name_out(o: Out, prev: bytes, name: str) -> bytes:
    """Front coding: bytes shared with the previous name, then the rest (BN layers share long prefixes)."""
    raw = name.encode("utf-8")
    shared = common_prefix(prev, raw)
    o.var(shared)
    o.var(len(raw) - shared)
    o.b += raw[shared:]
    return raw


def name_in(c: In, prev: bytes, budget: list[int]) -> tuple[str, bytes]:
    """The next front-coded name. ``budget[0]``: name bytes still allowed; a name is a prefix of the previous one
    plus new bytes, so a few input bytes can mean a long name: the total is bounded before any name is built."""
    shared = c.var(len(prev) + 1)
    rest = bytes(c.take(c.var(1 << 16)))
    budget[0] -= shared + len(rest)
    if budget[0] < 0:
        raise c.err("tensor names are longer in all than the file can justify (a front-coding bomb?)")
    if rest[:1] and shared < len(prev) and rest[0] == prev[shared]:
        raise c.err("tensor name does not share its longest prefix with the previous one (not canonical)")
    raw = prev[:shared] + rest
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        raise c.err("tensor name is not UTF-8") from None
