"""The .fpk file layout (spec/FORMAT.md): a valid safetensors file whose ``__metadata__`` carries a freezepack header.

This module knows bytes, not training: it lays tensors out deterministically, writes atomically, and on read checks
every untrusted number (lengths, offsets, shapes, counts, digests) *before* allocating or decoding anything.

Integrity covers every byte of a file:
  * the 8-byte length prefix and the safetensors JSON header must be exactly the canonical serialization of what
    they declare (sorted keys, no whitespace, ASCII escapes, then space padding to a multiple of 8);
  * the freezepack header (a JSON string inside ``__metadata__``) is hashed into ``freezepack.sha256``;
  * it lists, per stored tensor, dtype, shape, offsets and the SHA-256 of its raw bytes, which a reader checks
    against the safetensors entries and against the bytes it reads;
  * per logical tensor it holds the SHA-256 of the *reconstructed* dense bytes, checked by ``verify``/``load``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
import struct
import sys
from dataclasses import dataclass, field

import numpy as np

from ..atomic import atomic_write as _atomic_write
from ..errors import FormatError, FreezepackError, IntegrityError, SpecError
from . import maskcode
from .init import INITIALIZERS, InitSpec
from .rng import SPEC_VERSION

FORMAT_NAME = "freezepack"
FORMAT_VERSION = 1
HEADER_KEY = "freezepack"                 # __metadata__ key: the freezepack header, canonical JSON text
HEADER_DIGEST_KEY = "freezepack.sha256"   # __metadata__ key: SHA-256 (hex) of that text's UTF-8 bytes
ALIGNMENT = 8
MAX_HEADER_BYTES = 100_000_000           # safetensors refuses bigger headers, so a .fpk may not have one either
VALUES_SUFFIX = "#values"
MASK_SUFFIX = "#mask"

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
# Dense dtypes a frozen tensor may have: the generator makes float32, a reader rounds to the others (spec §5.3).
FROZEN_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class Limits:
    """What a reader agrees to parse and allocate for one file. Each limit is checked *before* the work it bounds
    and exceeding one is a FormatError naming it; raise one for a trusted file, e.g.
    ``freezepack.load(p, limits=Limits(max_dense_bytes=64 << 30))``.
    """

    max_tensor_elements: int = 1 << 32      # one dense tensor: 16 GiB of float32
    max_total_elements: int = 1 << 34       # all dense tensors together
    max_tensors: int = 1 << 16
    max_ndim: int = 16
    max_metadata_bytes: int = 1 << 20       # user metadata, and x- extension members in all (canonical JSON bytes)
    max_header_bytes: int = 1 << 24         # 16 MiB (~28k tensors); the format's cap is MAX_HEADER_BYTES
    max_json_values: int = 1 << 19          # per JSON text: ~11k frozen tensors; counted before parsing
    max_json_depth: int = 32                # a valid header nests 6 deep; x- members may add some
    max_dense_bytes: int | None = None      # what one load may materialize; None = half the memory free now


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Stored:
    """One safetensors tensor of the file: its place and its raw-bytes digest."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    sha256: str

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Entry:
    """One logical tensor (a state_dict entry) as the header describes it."""

    name: str
    kind: str                                # "frozen" | "whole" | "alias"
    shape: tuple[int, ...]
    dtype: str                               # one of FROZEN_DTYPES for frozen tensors
    sha256: str                              # digest of the reconstructed dense little-endian bytes
    of: str | None = None                    # alias: the earlier entry this name shares storage with (tied)
    stream: str | None = None                # frozen: generator stream key when it differs from ``name``
    data: str | None = None                  # whole: key of its stored tensor
    init: InitSpec | None = None             # frozen:
    frozen_scale: float = 1.0
    trainable: int = 0
    coder: str = "const"
    coder_params: dict = field(default_factory=dict)
    mask: str | None = None                  # key of the coded mask (U32), None when the coder has no payload
    values: str | None = None                # key of the trained values (F32), None when trainable == 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stream_key(self) -> str:
        """The generator stream name (RNG.md §2.1): fixed when the tensor was frozen, the name by default."""
        return self.name if self.stream is None else self.stream

    def to_json(self) -> dict:
        if self.kind == "alias":
            return {"name": self.name, "kind": "alias", "of": self.of}
        d = {"name": self.name, "kind": self.kind, "shape": list(self.shape), "dtype": self.dtype,
             "sha256": self.sha256}
        if self.kind == "whole":
            d["data"] = self.data
        else:
            if self.stream is not None and self.stream != self.name:
                d["stream"] = self.stream
            d.update(init=self.init.to_json(), frozen_scale=self.frozen_scale, trainable=self.trainable,
                     mask={"coder": self.coder, "params": dict(self.coder_params), "tensor": self.mask},
                     values=self.values)
        return d


@dataclass
class Header:
    seed: int
    entries: list[Entry]
    metadata: dict[str, str] = field(default_factory=dict)
    producer: str = ""
    generator: str = SPEC_VERSION
    version: int = FORMAT_VERSION
    stored: dict[str, Stored] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# canonical JSON
# ---------------------------------------------------------------------------------------------------------------

def canonical_json(obj) -> str:
    """Sorted keys, no whitespace, non-ASCII escaped as \\uXXXX, no NaN/Infinity: one text per value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------

def layout_order(keys_dtypes: dict[str, str]) -> list[str]:
    """Data order: widest element first (so every tensor is aligned to its element size), then by key."""
    return sorted(keys_dtypes, key=lambda k: (-DTYPE_SIZES[keys_dtypes[k]], k))


def _header_json(h: Header) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": h.version,
        "producer": h.producer,
        "generator": h.generator,
        "seed": str(h.seed),
        "metadata": dict(h.metadata),
        "tensors": [e.to_json() for e in h.entries],
        "stored": {k: {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [s.start, s.end],
                       "sha256": s.sha256} for k, s in h.stored.items()},
    }


def encode_file(h: Header, blobs: dict[str, tuple[str, tuple[int, ...], bytes]]) -> list:
    """Lay out a file: returns the list of byte chunks to write in order (prefix+header, then each tensor).

    ``blobs`` maps stored key -> (dtype, shape, little-endian bytes). Fills ``h.stored``.
    """
    for text in [e.name for e in h.entries] + list(blobs) + [h.producer] + [x for kv in h.metadata.items()
                                                                              for x in kv]:
        if not isinstance(text, str) or not _valid_text(text):
            raise SpecError(f"{_short(text)} is not valid Unicode text (a lone surrogate?): it cannot be stored")
    for k, (dtype, _, data) in blobs.items():
        if dtype == "BOOL" and len(data) and int(np.frombuffer(data, np.uint8).max()) > 1:
            raise SpecError(f"BOOL tensor {k!r} holds a byte other than 0 or 1", tensor=k)
    order = layout_order({k: v[0] for k, v in blobs.items()})
    offset = 0
    h.stored = {}
    for k in order:
        dtype, shape, data = blobs[k]
        nbytes = len(data)
        if nbytes != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise FormatError(f"stored tensor {k!r}: {nbytes} bytes for {dtype} shape {list(shape)}")
        h.stored[k] = Stored(k, dtype, tuple(shape), offset, offset + nbytes, hashlib.sha256(data).hexdigest())
        offset += nbytes
    inner = canonical_json(_header_json(h))
    outer = {"__metadata__": {HEADER_KEY: inner,
                              HEADER_DIGEST_KEY: hashlib.sha256(inner.encode("utf-8")).hexdigest()}}
    for k, s in h.stored.items():
        outer[k] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [s.start, s.end]}
    text = canonical_json(outer).encode("ascii")
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    # A writer never publishes what its reader refuses: the header must pass the reader's own checks.
    parse_header(text, 8 + len(text) + offset, limits=_WRITER_LIMITS)
    return [struct.pack("<Q", len(text)) + text] + [blobs[k][2] for k in order]


# The writer checks its own header with limits that only keep the checks, not the caps: a big model is no bomb.
_WRITER_LIMITS = Limits(max_tensor_elements=1 << 63, max_total_elements=1 << 63, max_tensors=1 << 40,
                        max_header_bytes=MAX_HEADER_BYTES, max_json_values=1 << 40, max_json_depth=1 << 20)


def atomic_write(path, chunks, *, validate=None, make_parents: bool = False) -> None:
    """Write chunks to ``path`` atomically (freezepack.atomic).

    Refuses clearly (a FreezepackError naming the path): a directory at ``path``; a missing parent directory
    unless ``make_parents``; a full disk or a file-size limit (the old file, if any, is kept).
    ``validate(tmp_path)`` runs on the complete temp file before the rename; if it raises, nothing is published.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FormatError("is a directory, cannot write a file there", path=path)
    parent = os.path.dirname(os.path.abspath(path))
    if not make_parents and not os.path.isdir(parent):
        raise FreezepackError(f"directory {parent} does not exist: create it first (or pass make_parents=True / "
                              "--parents)", path=path)
    try:
        _atomic_write(path, chunks, validate=validate, make_parents=make_parents)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
            raise FreezepackError(f"cannot write: {e.strerror} (disk full, quota, or a file-size limit such as "
                                  "ulimit -f); nothing was replaced: free space or write elsewhere",
                                  path=path) from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR):
            raise FreezepackError(f"cannot write: {e.strerror}", path=path) from None
        raise


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------

def _int(v, what, path, lo=0, hi=1 << 64, tensor=None) -> int:
    if type(v) is not int or not lo <= v <= hi:  # type() so that true/false are not 1/0
        raise FormatError(f"{what} must be an integer in [{lo}, {hi}], got {_short(v)}", path=path, tensor=tensor)
    return v


def _str(v, what, path, tensor=None) -> str:
    if not isinstance(v, str):
        raise FormatError(f"{what} must be a string, got {_short(v)}", path=path, tensor=tensor)
    return v


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _limit(what: str, value, name: str, limits: Limits, path=None, tensor=None) -> FormatError:
    """The one message for an exceeded reader limit: which limit, its value, and how to raise it."""
    return FormatError(f"{what} ({value}) exceeds the reader limit {name}={getattr(limits, name)}; if you trust "
                       f"this file, raise it: limits=freezepack.format.container.Limits({name}=...)", path=path,
                       tensor=tensor)


def _obj(v, what, path, required: set, optional: set = frozenset(), tensor=None, ext: list | None = None) -> dict:
    """A fixed-schema header object: exactly ``required`` (+ ``optional``) members, plus ``x-`` extension members
    (FORMAT.md §9), whose canonical sizes are added to ``ext`` so that their total can be bounded."""
    if not isinstance(v, dict):
        raise FormatError(f"{what} must be a JSON object, got {_short(v)}", path=path, tensor=tensor)
    missing = required - v.keys()
    if missing:
        raise FormatError(f"{what} lacks {', '.join(sorted(missing))}", path=path, tensor=tensor)
    extra = v.keys() - required - optional
    unknown = {k for k in extra if not k.startswith("x-")}
    if unknown:
        raise FormatError(f"{what} has unknown fields {', '.join(sorted(unknown))} (a newer format?)", path=path,
                          tensor=tensor)
    if ext is not None:
        ext.extend(len(k) + len(canonical_json(v[k])) for k in extra)
    return v


def _shape(v, what, path, limits: Limits, tensor=None) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > limits.max_ndim:
        raise FormatError(f"{what} must be a list of at most {limits.max_ndim} dimensions (max_ndim)", path=path,
                          tensor=tensor)
    shape = tuple(_int(d, what, path, 0, 1 << 63, tensor) for d in v)
    if any(d > limits.max_tensor_elements for d in shape) or math.prod(shape) > limits.max_tensor_elements:
        raise _limit(f"{what} {list(shape)}: number of elements", math.prod(shape), "max_tensor_elements", limits,
                     path, tensor)
    return shape


def _digest(v, what, path, tensor=None) -> str:
    if not isinstance(v, str) or not _HEX64.match(v):
        raise FormatError(f"{what} must be 64 lowercase hex digits", path=path, tensor=tensor)
    return v


def _float32(v, what, path, tensor=None) -> float:
    # a JSON float (a number written with '.' or an exponent, FORMAT.md §4): 1 is an integer, not 1.0
    if type(v) is not float or not math.isfinite(v) or abs(v) > 3.4028234663852886e38 or float(np.float32(v)) != v:
        raise FormatError(f"{what} must be a finite float32 number written as a JSON float, got {_short(v)}",
                          path=path, tensor=tensor)
    return v


def check_regular_file(path) -> int:
    """The size of ``path`` if it is a regular file, else a FormatError naming it (missing, a directory, a FIFO,
    unreadable). For a quick check before expensive work; readers open once and take the size from the open file
    (:func:`open_regular`), so a file replaced in between cannot be judged by the old one's size."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError("no such file", path=path) from None
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror}", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError("not a regular file (a directory)" if stat.S_ISDIR(st.st_mode) else "not a regular file",
                          path=path)
    return st.st_size


_check_regular_file = check_regular_file  # the old private name, kept for callers not yet moved


def open_regular(path):
    """Open ``path`` for reading once and return ``(binary file, size)`` with the size from the open file (fstat).

    O_NONBLOCK so a FIFO cannot block the open; anything but a regular file is a FormatError naming the path.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise FormatError("no such file", path=path) from None
    except IsADirectoryError:
        raise FormatError("not a regular file (a directory)", path=path) from None
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror}", path=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError("not a regular file (a directory)" if stat.S_ISDIR(st.st_mode) else "not a regular file",
                              path=path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def sniff(head: bytes) -> str | None:
    """What a file that is not a .fpk probably is, from its first bytes (for the error message only)."""
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (a torch checkpoint saved by torch.save?)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle (a legacy torch checkpoint?)"
    if head[:2] == b"\x1f\x8b":
        return "gzip-compressed data"
    return None


def parse_prefix(head: bytes, file_size: int, path=None, limits: Limits | None = None) -> int:
    """The header length N from the first 8 bytes, checked against the file size and the header cap (§3 rule 1)."""
    cap = min(MAX_HEADER_BYTES, (limits or DEFAULT_LIMITS).max_header_bytes)
    kind = sniff(head)
    if file_size < 8 or len(head) < 8:
        raise FormatError(f"too short for a safetensors/.fpk file ({file_size} bytes)", path=path)
    n = struct.unpack("<Q", head[:8])[0]
    if kind and (n > cap or n > file_size - 8 or (8 + n) % ALIGNMENT):
        raise FormatError(f"is {kind}, not a .fpk: turn a torch checkpoint into one with `freezepack convert`",
                          path=path)
    if n > file_size - 8:
        raise FormatError(f"declares a {n}-byte header but the file has {file_size} bytes (truncated or not a "
                          f".fpk file)", path=path)
    if n > cap:
        if n <= MAX_HEADER_BYTES:
            raise _limit("header length", n, "max_header_bytes", limits or DEFAULT_LIMITS, path)
        raise FormatError(f"declares a {n}-byte header, over the cap of {MAX_HEADER_BYTES} bytes (not a .fpk "
                          "file)", path=path)
    if n < 2 or (8 + n) % ALIGNMENT:
        raise FormatError(f"header length {n} is not padded to a multiple of {ALIGNMENT}", path=path)
    return n


# --- strict, bounded JSON -------------------------------------------------------------------------------------

def _json_values_bound(text: str, what: str, path, limits: Limits) -> None:
    """Refuse a text holding more JSON values than ``max_json_values`` *before* parsing it: a parsed value costs
    ~50-100 bytes of memory, its text as little as 2 ('{}'), so an unchecked header could cost ~40x its size."""
    structural = text.count("{") + text.count("[") + text.count(",")
    if structural < limits.max_json_values:
        return  # the common case: an upper bound already within the limit, no scan needed
    values = _values_outside_strings(text)
    if values > limits.max_json_values:
        raise _limit(f"{what}: number of JSON values", values, "max_json_values", limits, path)


def _values_outside_strings(text: str, step: int = 1 << 20) -> int:
    """1 + the number of '{', '[' and ',' outside strings (an upper bound on the values of a valid text), in
    slices of ``step`` characters so that memory stays ~10 x ``step`` whatever the text's size."""
    count, inside, start = 1, 0, 0
    while start < len(text):
        end = min(start + step, len(text))
        while end < len(text) and text[end - 1] == "\\":
            end += 1  # never split an escape: a slice does not end in a backslash
        # Escapes pair up left to right, as a JSON string reads them: drop them, then quotes toggle "inside".
        piece = text[start:end].replace("\\\\", "").replace('\\"', "").encode("utf-8", "surrogatepass")
        a = np.frombuffer(piece, np.uint8)
        quote = a == 34
        parity = (np.cumsum(quote, dtype=np.int64) + inside) & 1
        structural = (a == 123) | (a == 91) | (a == 44)
        count += int(np.count_nonzero(structural & (parity == 0)))
        inside = (inside + int(np.count_nonzero(quote))) & 1
        start = end
    return count


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _bad_constant(name):
    raise ValueError(f"{name} is not allowed")


def _check_tree(value, what: str, path, limits: Limits) -> None:
    """Depth within ``max_json_depth`` and every string valid Unicode (a lone surrogate such as \\ud800 is legal
    JSON escape syntax but no text: it could not be hashed, printed or used as a stream name)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limits.max_json_depth:
                raise _limit(f"{what}: nesting depth", depth, "max_json_depth", limits, path)
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(k, str) and not _valid_text(k):
                    raise FormatError(f"{what} holds a key with a lone surrogate {_short(k)} (not valid Unicode)",
                                      path=path)
                if isinstance(x, (dict, list)):
                    stack.append((x, depth + 1))
                elif isinstance(x, str) and not _valid_text(x):
                    raise FormatError(f"{what} holds a string with a lone surrogate {_short(x)} (not valid "
                                      "Unicode)", path=path)


def _valid_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json(text: str, what: str, path=None, limits: Limits = DEFAULT_LIMITS):
    """Strict, bounded JSON: values and depth within ``limits`` (counted before parsing), no duplicate keys, no
    NaN/Infinity, no lone surrogates. Any failure is a FormatError."""
    if not _valid_text(text):
        raise FormatError(f"{what} is not valid Unicode text", path=path)
    _json_values_bound(text, what, path, limits)
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_bad_constant)
    except RecursionError:
        raise _limit(f"{what}: nesting depth", "too deep to parse", "max_json_depth", limits, path) from None
    except (ValueError, TypeError) as e:
        raise FormatError(f"{what} is not valid JSON: {str(e)[:200]}", path=path) from None
    _check_tree(value, what, path, limits)
    return value


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
_HOLE = "\x00freezepack-hole\x00"


def is_canonical(value, text: str, pad: int = 0, hole: str | None = None) -> bool:
    """``text == canonical_json(value) + up to ``pad`` spaces``, compared piece by piece (no full-size copy).

    ``hole``: a long string member of ``value`` that was replaced by :data:`_HOLE`; its escaped form is compared
    in slices, so a 100 MB inner header is never escaped into one more 100 MB string.
    """
    pos = 0
    hole_chunk = json.encoder.encode_basestring_ascii(_HOLE)
    key_chunk = json.encoder.encode_basestring_ascii(HEADER_KEY)
    last = ("", "")
    try:
        for chunk in _ENCODER.iterencode(value):
            hole_here = hole is not None and chunk == hole_chunk and last == (key_chunk, ":")
            last = (last[1], chunk)
            if hole_here:  # only as the value of __metadata__.freezepack, never a key or another string
                if not text.startswith('"', pos):
                    return False
                pos += 1
                step = 1 << 20
                for i in range(0, len(hole), step):  # escaping is per character: slices escape independently
                    piece = json.encoder.encode_basestring_ascii(hole[i:i + step])[1:-1]
                    if not text.startswith(piece, pos):
                        return False
                    pos += len(piece)
                if not text.startswith('"', pos):
                    return False
                pos += 1
            elif not text.startswith(chunk, pos):
                return False
            else:
                pos += len(chunk)
    except ValueError:  # a NaN/Infinity (from an overflowing literal such as 1e999) has no canonical form
        return False
    rest = len(text) - pos
    return 0 <= rest <= pad and text.count(" ", pos) == rest


# --- the header, step by step (FORMAT.md §7) ------------------------------------------------------------------

def parse_header(raw: bytes, file_size: int, path=None, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Validate a whole header (the bytes after the 8-byte prefix) against itself and the file size."""
    return _parse_header_text(_decode_header(raw, path), file_size, path, limits)


def _decode_header(raw: bytes, path) -> str:
    if raw.isascii():  # the canonical header is ASCII; a compact ASCII str costs one byte per character
        return raw.decode("ascii")
    if b'"freezepack"' not in raw:
        raise FormatError("is a safetensors file without a freezepack header, not a .fpk (turn it into one with "
                          "`freezepack convert`) or not a safetensors file at all", path=path)
    raise FormatError("header is not ASCII, so not in canonical form (corrupted or edited)", path=path)


def _read_header_text(f, n: int, path) -> str:
    raw = f.read(n)
    if len(raw) != n:
        raise FormatError("file shrank while being read", path=path)
    return _decode_header(raw, path)  # raw is freed on return: only the text stays


def _parse_header_text(text: str, file_size: int, path, limits: Limits) -> Header:
    data_size = file_size - 8 - len(text)
    outer = parse_json(text, "safetensors header", path, limits)
    inner_text = _check_outer(outer, text, path)
    del text
    d = parse_json(inner_text, "freezepack header", path, limits)
    _check_version(d, path)
    if not is_canonical(d, inner_text):
        raise FormatError("freezepack header is not in canonical form (FORMAT.md §4)", path=path)
    del inner_text
    ext: list[int] = []
    _obj(d, "freezepack header", path, {"format", "version", "producer", "generator", "seed", "metadata",
                                         "tensors", "stored"}, ext=ext)
    h = _parse_fields(d, path, limits)
    _parse_stored(h, d["stored"], outer, data_size, path, limits, ext)
    _parse_tensors(h, d["tensors"], path, limits, ext)
    if sum(ext) > limits.max_metadata_bytes:
        raise _limit("x- extension members: canonical bytes in all", sum(ext), "max_metadata_bytes", limits, path)
    return h


def _check_outer(outer, text: str, path) -> str:
    """§3 rules 2-3: the safetensors header is canonical and its __metadata__ is exactly ours; returns the inner
    header text after checking its digest."""
    if not isinstance(outer, dict):
        raise FormatError("safetensors header is not a JSON object", path=path)
    meta = outer.get("__metadata__")
    if not isinstance(meta, dict) or HEADER_KEY not in meta:
        raise FormatError("is a plain safetensors file without a freezepack header, not a .fpk "
                          "(turn it into one with `freezepack convert`)", path=path)
    if set(meta) != {HEADER_KEY, HEADER_DIGEST_KEY} or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"__metadata__ must hold exactly {HEADER_KEY!r} and {HEADER_DIGEST_KEY!r} strings",
                          path=path)
    inner_text = meta[HEADER_KEY]
    probe = dict(outer)
    probe["__metadata__"] = {HEADER_KEY: _HOLE, HEADER_DIGEST_KEY: meta[HEADER_DIGEST_KEY]}
    if not is_canonical(probe, text, ALIGNMENT - 1, hole=inner_text):
        raise FormatError("safetensors header is not in canonical form (corrupted or edited)", path=path)
    if not inner_text.isascii():  # canonical JSON is ASCII, so a valid inner header is too
        raise FormatError("freezepack header is not ASCII, so not in canonical form (corrupted or edited)",
                          path=path)
    if hashlib.sha256(inner_text.encode("ascii")).hexdigest() != meta[HEADER_DIGEST_KEY]:
        raise IntegrityError("freezepack header digest mismatch: the header was corrupted", path=path)
    return inner_text


def _check_version(d, path) -> None:
    if not isinstance(d, dict):
        raise FormatError("freezepack header is not a JSON object", path=path)
    version = d.get("version")
    if d.get("format") == FORMAT_NAME and type(version) is int and version == 2:
        raise FormatError("a version-1 JSON header claims version 2, whose files have a binary body "
                          "(FORMAT.md §12): corrupted or forged", path=path)
    if d.get("format") == FORMAT_NAME and type(version) is int and version > FORMAT_VERSION:
        raise FormatError(f"format version {version} is newer than this reader's (2): upgrade freezepack", path=path)
    if d.get("format") != FORMAT_NAME or type(version) is not int or version != FORMAT_VERSION:
        raise FormatError(f"unsupported format {_short(d.get('format'))} version {_short(version)} (version must "
                          f"be the integer {FORMAT_VERSION})", path=path)


def _parse_fields(d: dict, path, limits: Limits) -> Header:
    if d["generator"] != SPEC_VERSION:
        raise SpecError(f"unknown generator {_short(d['generator'])} (this reader knows {SPEC_VERSION})", path=path)
    seed_s = _str(d["seed"], "seed", path)
    if not re.fullmatch(r"0|[1-9][0-9]{0,19}", seed_s) or int(seed_s) >= 1 << 64:
        raise FormatError(f"seed must be a decimal integer in [0, 2**64), got {_short(seed_s)}", path=path)
    metadata = d["metadata"]
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("metadata must map strings to strings", path=path)
    size = len(canonical_json(metadata))
    if size > limits.max_metadata_bytes:
        raise _limit("metadata: canonical bytes", size, "max_metadata_bytes", limits, path)
    return Header(seed=int(seed_s), entries=[], metadata=dict(metadata), producer=_str(d["producer"], "producer", path))


def _parse_stored(h: Header, stored, outer: dict, data_size: int, path, limits: Limits, ext: list) -> None:
    """``stored`` against the safetensors entries (they must agree exactly), the layout, and the file size."""
    if not isinstance(stored, dict):
        raise FormatError("stored must be a JSON object", path=path)
    if len(stored) > 2 * limits.max_tensors:
        raise _limit("number of stored tensors", len(stored), "max_tensors", limits, path)
    if set(outer) - {"__metadata__"} != set(stored):
        raise FormatError("the safetensors tensors and the freezepack header's stored list differ", path=path)
    for k, s in stored.items():
        _obj(s, f"stored tensor {k!r}", path, {"dtype", "shape", "data_offsets", "sha256"}, ext=ext)
        if not isinstance(s["dtype"], str) or s["dtype"] not in DTYPE_SIZES:
            raise FormatError(f"stored tensor {k!r} has unknown dtype {_short(s['dtype'])}", path=path)
        shape = _shape(s["shape"], f"stored tensor {k!r} shape", path, limits)
        offs = s["data_offsets"]
        if not isinstance(offs, list) or len(offs) != 2:
            raise FormatError(f"stored tensor {k!r} data_offsets must be [start, end]", path=path)
        start, end = (_int(o, f"stored tensor {k!r} offset", path, 0, 1 << 63) for o in offs)
        if end > data_size:
            raise FormatError(f"stored tensor {k!r} ends at data byte {end} but the file holds only {data_size}: "
                              "truncated, or offsets out of range", path=path)
        need = math.prod(shape) * DTYPE_SIZES[s["dtype"]]
        if end - start != need:
            raise FormatError(f"stored tensor {k!r}: offsets span {end - start} bytes but {s['dtype']} "
                              f"{list(shape)} needs {need}", path=path)
        if outer[k] != {"dtype": s["dtype"], "shape": s["shape"], "data_offsets": s["data_offsets"]}:
            raise FormatError(f"safetensors entry {k!r} disagrees with the freezepack header", path=path)
        h.stored[k] = Stored(k, s["dtype"], shape, start, end, _digest(s["sha256"], f"{k!r} sha256", path))
    pos = 0
    for k in layout_order({k: s.dtype for k, s in h.stored.items()}):
        s = h.stored[k]
        if s.start != pos:
            raise FormatError(f"stored tensor {k!r} is not where the layout puts it (offset {s.start}, expected "
                              f"{pos})", path=path)
        pos = s.end
    if pos != data_size:
        raise FormatError(f"tensor data is {data_size} bytes but the tensors need {pos} (truncated or padded)",
                          path=path)


class _Parts:
    """Hands out stored tensors to the entries that use them: one naming rule, each used exactly once."""

    def __init__(self, h: Header, path):
        self.h, self.path, self.used = h, path, set()

    def take(self, key, dtype, shape, what, name) -> Stored:
        expected = name + {"data": "", "mask": MASK_SUFFIX, "values": VALUES_SUFFIX}[what]
        if key != expected:  # one naming rule, so a stored tensor's key alone says whose part it is
            raise FormatError(f"{what} tensor must be stored as {expected!r}, got {_short(key)}", path=self.path,
                              tensor=name)
        if key not in self.h.stored:
            raise FormatError(f"{what} refers to missing stored tensor {_short(key)}", path=self.path, tensor=name)
        if key in self.used:
            raise FormatError(f"stored tensor {key!r} is used twice", path=self.path, tensor=name)
        s = self.h.stored[key]
        if s.dtype != dtype or (shape is not None and s.shape != tuple(shape)) or (shape is None and len(s.shape) != 1):
            raise FormatError(f"{what} {key!r} is {s.dtype} {list(s.shape)}, expected {dtype} "
                              f"{'1-D' if shape is None else list(shape)}", path=self.path, tensor=name)
        self.used.add(key)
        return s


def _parse_tensors(h: Header, tensors, path, limits: Limits, ext: list) -> None:
    if not isinstance(tensors, list):
        raise FormatError("tensors must be a JSON array", path=path)
    if len(tensors) > limits.max_tensors:
        raise _limit("number of tensors", len(tensors), "max_tensors", limits, path)
    parts = _Parts(h, path)
    names: set[str] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, dict):
            raise FormatError("tensor entry is not an object", path=path)
        name = _str(t.get("name"), "tensor name", path)
        if not name or name == "__metadata__":
            raise FormatError(f"invalid tensor name {name!r}", path=path)
        if name in names:
            raise FormatError("tensor name appears twice", path=path, tensor=name)
        names.add(name)
        kind = t.get("kind")
        if kind == "alias":
            e = _parse_alias(h, t, name, path, ext)
        elif kind in ("whole", "frozen"):
            e = _parse_entry(t, kind, name, parts, path, limits, ext)
            total += e.numel
            if total > limits.max_total_elements:
                raise _limit("elements of all tensors", total, "max_total_elements", limits, path, name)
        else:
            raise FormatError(f"unknown tensor kind {_short(kind)}", path=path, tensor=name)
        h.entries.append(e)
    if parts.used != set(h.stored):
        raise FormatError(f"stored tensors not used by any tensor: {', '.join(sorted(set(h.stored) - parts.used))}",
                          path=path)


def _parse_alias(h: Header, t: dict, name: str, path, ext: list) -> Entry:
    """A tied tensor: the same values as an earlier non-alias entry, stored once (§5.1)."""
    _obj(t, "alias entry", path, {"name", "kind", "of"}, tensor=name, ext=ext)
    target = next((x for x in h.entries if x.name == t["of"] and x.kind != "alias"), None)
    if target is None:
        raise FormatError(f"alias of {_short(t['of'])}: not an earlier non-alias tensor", path=path, tensor=name)
    return Entry(name, "alias", target.shape, target.dtype, target.sha256, of=target.name)


def _parse_entry(t: dict, kind: str, name: str, parts: _Parts, path, limits: Limits, ext: list) -> Entry:
    if kind == "whole":
        _obj(t, "whole tensor entry", path, {"name", "kind", "shape", "dtype", "sha256", "data"}, tensor=name,
             ext=ext)
    else:
        _obj(t, "frozen tensor entry", path, {"name", "kind", "shape", "dtype", "sha256", "init", "frozen_scale",
                                               "trainable", "mask", "values"}, {"stream"}, tensor=name, ext=ext)
    shape = _shape(t["shape"], "shape", path, limits, tensor=name)
    dtype = t["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES or (kind == "frozen" and dtype not in FROZEN_DTYPES):
        raise FormatError(f"dtype {_short(dtype)} is not allowed for a {kind} tensor", path=path, tensor=name)
    e = Entry(name, kind, shape, dtype, _digest(t["sha256"], "sha256", path, tensor=name))
    if kind == "whole":
        s = parts.take(t["data"], dtype, shape, "data", name)
        e.data = s.key
        if s.sha256 != e.sha256:
            raise FormatError("whole tensor's dense digest differs from its stored digest", path=path, tensor=name)
        return e
    e.init = _parse_init(t["init"], name, path, ext)
    if "stream" in t:
        e.stream = _str(t["stream"], "stream", path, tensor=name)
        if e.stream == name or not e.stream:  # the default is never spelled out: one file per model
            raise FormatError("stream must be given only when it differs from the name", path=path, tensor=name)
    e.frozen_scale = _float32(t["frozen_scale"], "frozen_scale", path, tensor=name)
    if dtype != "F32" and e.frozen_scale != _round_float(e.frozen_scale, dtype):
        raise FormatError(f"frozen_scale {e.frozen_scale!r} is not exactly a {dtype} number", path=path, tensor=name)
    e.trainable = _int(t["trainable"], "trainable", path, 0, e.numel, tensor=name)
    m = _obj(t["mask"], "mask", path, {"coder", "params", "tensor"}, tensor=name, ext=ext)
    e.coder = _str(m["coder"], "mask coder", path, tensor=name)
    if not isinstance(m["params"], dict) or not all(type(v) is int for v in m["params"].values()):
        raise FormatError("mask params must map names to integers", path=path, tensor=name)
    e.coder_params = dict(m["params"])
    words = 0
    if m["tensor"] is not None:  # §3: the mask tensor exists exactly when the coded stream has words
        s = parts.take(m["tensor"], "U32", None, "mask", name)
        e.mask, words = s.key, s.shape[0]
        if words == 0:
            raise FormatError("zero-length mask tensor: an empty stream is stored as \"tensor\": null", path=path,
                              tensor=name)
    maskcode.check_params(e.coder, e.numel, e.trainable, e.coder_params, words, where=path, tensor=name)
    if e.trainable:
        e.values = parts.take(t["values"], dtype, (e.trainable,), "values", name).key
    elif t["values"] is not None:
        raise FormatError("values given for a tensor with no trainable entries", path=path, tensor=name)
    return e


# The user's arguments each initializer records in init.params (RNG.md §6.1): name -> {key: JSON type}.
INIT_PARAMS = {
    "xavier_normal": {"gain": float}, "xavier_uniform": {"gain": float}, "pm_sigma": {"gain": float},
    "kaiming_normal": {"a": float, "mode": str, "nonlinearity": str},
    "kaiming_uniform": {"a": float, "mode": str, "nonlinearity": str},
    "normal": {"mean": float, "std": float}, "uniform": {"a": float, "b": float},
    "zeros": {}, "constant": {"val": float},
}


def _parse_init(v, name: str, path, ext: list) -> InitSpec:
    ini = _obj(v, "init", path, {"name", "dist", "a", "b", "params"}, tensor=name, ext=ext)
    if not isinstance(ini["name"], str) or ini["name"] not in INITIALIZERS:
        raise SpecError(f"unknown initializer {_short(ini['name'])} (known: {', '.join(INITIALIZERS)})", path=path,
                        tensor=name)
    _float32(ini["a"], "init a", path, tensor=name)
    _float32(ini["b"], "init b", path, tensor=name)
    params, want = ini["params"], INIT_PARAMS[ini["name"]]
    if not isinstance(params, dict) or set(params) != set(want) or \
            not all(type(params[k]) is want[k] for k in want):
        spelled = ", ".join(f"{k}: {'float' if t is float else 'string'}" for k, t in want.items())
        raise SpecError(f"init params of {ini['name']!r} must be exactly {{{spelled}}}, got {_short(params)}",
                        path=path, tensor=name)
    try:
        return InitSpec.from_json(ini)
    except FreezepackError as err:
        raise SpecError(err.reason, path=path, tensor=name) from None


def digest_ok(expected: str, got_hex: str) -> bool:
    """Does a dense tensor's SHA-256 (hex) match an entry's digest: full (v1, 64 hex) or truncated (v2, 32 hex)."""
    return len(expected) in (32, 64) and got_hex[:len(expected)] == expected


def _round_float(x: float, dtype: str) -> float:
    """``x`` rounded to ``dtype`` (F32/F16/BF16) with round-to-nearest-even, as a Python float."""
    import torch  # the format layer already depends on torch (init); imported here to keep this module light

    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32).to(tdt))


# --- memory: what a load may allocate, checked before it does ------------------------------------------------

def available_bytes(device=None) -> int | None:
    """Memory a load may still allocate on ``device`` now, or None when unknown: for a CPU the smaller of half the
    system's available memory and what the process's address-space/data limits (RLIMIT_AS, RLIMIT_DATA) leave;
    for a GPU its free memory."""
    kind = getattr(device, "type", None) or (str(device).split(":")[0] if device is not None else "cpu")
    if kind == "meta":
        return None
    if kind == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    if kind != "cpu":
        return None
    best = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    # half: a file of a few bytes must not be able to push a shared machine into swap or the
                    # OOM killer; a trusted big model raises the limit explicitly
                    best = int(line.split()[1]) * 1024 // 2
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        for lim in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
            soft = resource.getrlimit(lim)[0]
            if soft != resource.RLIM_INFINITY:
                room = max(soft - vm, 0)
                best = room if best is None else min(best, room)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return best


def dense_bytes(e: Entry) -> int:
    """Bytes of the reconstructed tensor (0 for an alias: it shares its target's storage)."""
    return 0 if e.kind == "alias" else e.numel * DTYPE_SIZES[e.dtype]


def work_bytes(e: Entry) -> int:
    """Upper estimate of what reconstructing ``e`` allocates besides the dense tensor: the stored parts read from
    the file and the decoder's working arrays (maskcode.decode_indices)."""
    if e.kind != "frozen":
        return 0 if e.kind == "alias" else dense_bytes(e)  # the bytes read, then viewed in place
    n, k = e.numel, e.trainable
    stored = 4 * k  # values; the mask's words are counted by the coder below
    if e.coder in ("const",) or k in (0, n):
        return stored + 8 * (k if k == n else 0)
    if e.coder == "ans-bernoulli":
        return stored + 6 * n + 8 * k  # n int32 symbols + n bools + k int64 indices
    if e.coder == "ans-gaps" and e.mask is None:  # empty stream: the positions are a prefix, nothing to decode
        return stored + 8 * k
    m = k if e.coder_params.get("value") == 1 else n - k
    return stored + 16 * m + 8 * k + (0 if e.coder_params.get("value") == 1 else n)


_ALWAYS_ALLOWED = 4 << 20  # a materialization this small is never refused for lack of system memory


def check_memory(nbytes: int, what: str, limits: Limits = DEFAULT_LIMITS, device=None, path=None,
                 tensor=None) -> None:
    """Refuse, before allocating, to materialize more than ``limits.max_dense_bytes`` (default: the memory
    available now on ``device``). A .fpk legitimately regenerates gigabytes from a few bytes, so the file size
    cannot bound this; a FormatError naming the limit is better than an out-of-memory kill."""
    if limits.max_dense_bytes is None and nbytes <= _ALWAYS_ALLOWED:
        return  # asking the system costs ~0.2 ms (a /proc read): not worth it for a small tensor
    limit = limits.max_dense_bytes if limits.max_dense_bytes is not None else available_bytes(device)
    if limit is None or nbytes <= limit:
        return
    source = "" if limits.max_dense_bytes is not None else " (default: half the memory available now)"
    raise FormatError(f"{what} needs {_human_bytes(nbytes)} of memory, over the reader limit max_dense_bytes="
                      f"{limit}{source}; free memory, or if you trust this file pass "
                      "limits=freezepack.format.container.Limits(max_dense_bytes=...)", path=path, tensor=tensor)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class FpkReader:
    """An open .fpk file: validated header, and raw stored tensors read (and digest-checked) on demand.

    The file is opened once; its size comes from the open file, so a concurrent atomic replace (rename over the
    path) is read consistently as the old file.
    """

    def __init__(self, path, limits: Limits = DEFAULT_LIMITS):
        if sys.byteorder != "little":
            raise FormatError("big-endian hosts are not supported yet", path=path)
        self.path = os.fspath(path)
        self.limits = limits
        self._f, size = open_regular(self.path)
        try:
            n = parse_prefix(self._f.read(8), size, self.path, limits)
            raw = self._f.read(n)
            if len(raw) != n:
                raise FormatError("file shrank while being read", path=self.path)
            self._v2 = None
            if raw.startswith(b'{"__metadata__":{"freezepack":"2"'):  # format v2: compact binary body (§12)
                from . import compact

                self._v2 = compact.parse_file(raw, self._f, size, self.path, limits)
                self.header = self._v2.header
            else:
                text = _decode_header(raw, self.path)
                del raw  # only the text stays
                self.header = _parse_header_text(text, size, self.path, limits)
            self.data_start = 8 + n
            self.file_size = size
        except BaseException:
            self._f.close()
            raise

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read_bytes(self, key: str, tensor: str | None = None) -> bytearray:
        """The raw bytes of a stored tensor, checked against its SHA-256 and BOOL bytes against 0/1 (v2: decoded;
        the body digest was checked on open)."""
        if self._v2 is not None:
            buf = self._v2.read_bytes(key, tensor)
            e = next((x for x in self.header.entries if x.data == key), None)
            if e is not None and e.dtype == "BOOL" and buf and int(np.frombuffer(buf, np.uint8).max()) > 1:
                raise FormatError(f"BOOL tensor {key!r} holds a byte other than 0 or 1", path=self.path,
                                  tensor=tensor)
            return buf
        s = self.header.stored[key]
        buf = bytearray(s.nbytes)
        self._f.seek(self.data_start + s.start)
        got = self._f.readinto(buf)
        if got != s.nbytes:
            raise FormatError(f"stored tensor {key!r} is truncated", path=self.path, tensor=tensor)
        if hashlib.sha256(buf).hexdigest() != s.sha256:
            raise IntegrityError(f"stored tensor {key!r} is corrupted (SHA-256 mismatch)", path=self.path,
                                 tensor=tensor)
        if s.dtype == "BOOL" and buf and int(np.frombuffer(buf, np.uint8).max()) > 1:
            raise FormatError(f"BOOL tensor {key!r} holds a byte other than 0 or 1", path=self.path, tensor=tensor)
        return buf

    def read_array(self, key: str, np_dtype: str, tensor: str | None = None) -> np.ndarray:
        return np.frombuffer(self.read_bytes(key, tensor), dtype=np_dtype)
