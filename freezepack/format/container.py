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
MAX_HEADER_BYTES = 100 * 1024 * 1024      # as safetensors: a bigger header is refused before it is read
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
    """What a reader agrees to allocate for one file (allocation bombs are refused before any work)."""

    max_tensor_elements: int = 1 << 32      # one dense tensor: 16 GiB of float32
    max_total_elements: int = 1 << 34       # all dense tensors together
    max_tensors: int = 1 << 16
    max_ndim: int = 16
    max_metadata_bytes: int = 1 << 20


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


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _bad_constant(name):
    raise ValueError(f"{name} is not allowed")


def parse_json(text: str, what: str, path=None):
    """Strict JSON: no duplicate keys, no NaN/Infinity, bounded depth; any failure is a FormatError."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_bad_constant)
    except (ValueError, RecursionError, TypeError) as e:
        raise FormatError(f"{what} is not valid JSON: {str(e)[:200]}", path=path) from None


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
    return [struct.pack("<Q", len(text)) + text] + [blobs[k][2] for k in order]


def atomic_write(path, chunks, *, validate=None) -> None:
    """Write chunks to ``path`` atomically (freezepack.atomic); a directory at ``path`` is refused clearly.
    ``validate(tmp_path)`` runs on the complete temp file before the rename; if it raises, nothing is published."""
    if os.path.isdir(os.fspath(path)):
        raise FormatError("is a directory, cannot write a file there", path=os.fspath(path))
    _atomic_write(path, chunks, validate=validate)


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------

def _int(v, what, path, lo=0, hi=1 << 64, tensor=None) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise FormatError(f"{what} must be an integer in [{lo}, {hi}], got {_short(v)}", path=path, tensor=tensor)
    return v


def _str(v, what, path, tensor=None) -> str:
    if not isinstance(v, str):
        raise FormatError(f"{what} must be a string, got {_short(v)}", path=path, tensor=tensor)
    return v


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _obj(v, what, path, required: set, optional: set = frozenset(), tensor=None) -> dict:
    if not isinstance(v, dict):
        raise FormatError(f"{what} must be a JSON object, got {_short(v)}", path=path, tensor=tensor)
    missing = required - v.keys()
    if missing:
        raise FormatError(f"{what} lacks {', '.join(sorted(missing))}", path=path, tensor=tensor)
    extra = {k for k in v.keys() - required - optional if not k.startswith("x-")}
    if extra:
        raise FormatError(f"{what} has unknown fields {', '.join(sorted(extra))} (a newer format?)", path=path,
                          tensor=tensor)
    return v


def _shape(v, what, path, limits: Limits, tensor=None) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > limits.max_ndim:
        raise FormatError(f"{what} must be a list of at most {limits.max_ndim} dimensions", path=path, tensor=tensor)
    shape = tuple(_int(d, what, path, 0, 1 << 63, tensor) for d in v)
    if any(d > limits.max_tensor_elements for d in shape):
        raise FormatError(f"{what} {list(shape)} has a dimension over the limit of {limits.max_tensor_elements} "
                          "elements", path=path, tensor=tensor)
    if math.prod(shape) > limits.max_tensor_elements:
        raise FormatError(f"{what} {list(shape)} has {math.prod(shape)} elements, over the limit of "
                          f"{limits.max_tensor_elements}", path=path, tensor=tensor)
    return shape


def _digest(v, what, path, tensor=None) -> str:
    if not isinstance(v, str) or not _HEX64.match(v):
        raise FormatError(f"{what} must be 64 lowercase hex digits", path=path, tensor=tensor)
    return v


def _float32(v, what, path, tensor=None) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or abs(v) > 3.4028234663852886e38 \
            or float(np.float32(v)) != v:
        raise FormatError(f"{what} must be a finite float32 number, got {_short(v)}", path=path, tensor=tensor)
    return float(v)


def _check_regular_file(path) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError("no such file", path=path) from None
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror}", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError("not a regular file", path=path)
    return st.st_size


def parse_prefix(head: bytes, file_size: int, path=None) -> int:
    if file_size < 8 or len(head) < 8:
        raise FormatError(f"too short for a safetensors/.fpk file ({file_size} bytes)", path=path)
    n = struct.unpack("<Q", head[:8])[0]
    if n > MAX_HEADER_BYTES or n > file_size - 8:
        raise FormatError(f"declares a {n}-byte header but the file has {file_size} bytes (truncated or not a "
                          f".fpk file)", path=path)
    if n < 2 or (8 + n) % ALIGNMENT:
        raise FormatError(f"header length {n} is not padded to a multiple of {ALIGNMENT}", path=path)
    return n


def parse_header(raw: bytes, file_size: int, path=None, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Validate a whole header (the bytes after the 8-byte prefix) against itself and the file size."""
    data_size = file_size - 8 - len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("header is not UTF-8 JSON (corrupted, or not a safetensors file)", path=path) from None
    outer = parse_json(text, "safetensors header", path)
    if not isinstance(outer, dict):
        raise FormatError("safetensors header is not a JSON object", path=path)
    meta = outer.get("__metadata__")
    if not isinstance(meta, dict) or HEADER_KEY not in meta:
        raise FormatError("is a plain safetensors file without a freezepack header, not a .fpk "
                          "(turn it into one with `freezepack convert`)", path=path)
    canon = canonical_json(outer)
    pad = len(text) - len(canon)
    if not 0 <= pad < ALIGNMENT or text != canon + " " * pad:
        raise FormatError("safetensors header is not in canonical form (corrupted or edited)", path=path)
    if set(meta) != {HEADER_KEY, HEADER_DIGEST_KEY} or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"__metadata__ must hold exactly {HEADER_KEY!r} and {HEADER_DIGEST_KEY!r} strings",
                          path=path)
    inner_text = meta[HEADER_KEY]
    if hashlib.sha256(inner_text.encode("utf-8")).hexdigest() != meta[HEADER_DIGEST_KEY]:
        raise IntegrityError("freezepack header digest mismatch: the header was corrupted", path=path)
    d = parse_json(inner_text, "freezepack header", path)
    if isinstance(d, dict) and d.get("format") == FORMAT_NAME and type(d.get("version")) is int \
            and d["version"] > FORMAT_VERSION:
        raise FormatError(f"format version {d['version']} is newer than this reader's ({FORMAT_VERSION}): "
                          "upgrade freezepack", path=path)
    _obj(d, "freezepack header", path, {"format", "version", "producer", "generator", "seed", "metadata",
                                         "tensors", "stored"})
    if d["format"] != FORMAT_NAME or d["version"] != FORMAT_VERSION:
        raise FormatError(f"unsupported format {_short(d['format'])} version {_short(d['version'])}", path=path)
    if d["generator"] != SPEC_VERSION:
        raise SpecError(f"unknown generator {_short(d['generator'])} (this reader knows {SPEC_VERSION})", path=path)
    seed_s = _str(d["seed"], "seed", path)
    if not re.fullmatch(r"0|[1-9][0-9]{0,19}", seed_s) or int(seed_s) >= 1 << 64:
        raise FormatError(f"seed must be a decimal integer in [0, 2**64), got {_short(seed_s)}", path=path)
    metadata = d["metadata"]
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in metadata.items()):
        raise FormatError("metadata must map strings to strings", path=path)
    if len(canonical_json(metadata)) > limits.max_metadata_bytes:
        raise FormatError(f"metadata is larger than {limits.max_metadata_bytes} bytes", path=path)
    h = Header(seed=int(seed_s), entries=[], metadata=dict(metadata), producer=_str(d["producer"], "producer", path))

    # stored tensors: the freezepack header and the safetensors entries must agree exactly
    stored = d["stored"]
    if not isinstance(stored, dict) or len(stored) > 2 * limits.max_tensors:
        raise FormatError("stored must be an object of at most 2 x max_tensors entries", path=path)
    st_keys = set(outer) - {"__metadata__"}
    if st_keys != set(stored):
        raise FormatError("the safetensors tensors and the freezepack header's stored list differ", path=path)
    for k, s in stored.items():
        _obj(s, f"stored tensor {k!r}", path, {"dtype", "shape", "data_offsets", "sha256"})
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
        if end - start != math.prod(shape) * DTYPE_SIZES[s["dtype"]]:
            raise FormatError(f"stored tensor {k!r}: offsets span {end - start} bytes but {s['dtype']} "
                              f"{list(shape)} needs {math.prod(shape) * DTYPE_SIZES[s['dtype']]}", path=path)
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

    # logical tensors
    tensors = d["tensors"]
    if not isinstance(tensors, list) or len(tensors) > limits.max_tensors:
        raise FormatError(f"tensors must be a list of at most {limits.max_tensors} entries", path=path)
    used: set[str] = set()
    names: set[str] = set()
    total = 0

    def take(key, dtype, shape, what, name):
        expected = name + {"data": "", "mask": MASK_SUFFIX, "values": VALUES_SUFFIX}[what]
        if key != expected:  # one naming rule, so a stored tensor's key alone says whose part it is
            raise FormatError(f"{what} tensor must be stored as {expected!r}, got {_short(key)}", path=path,
                              tensor=name)
        if not isinstance(key, str) or key not in h.stored:
            raise FormatError(f"{what} refers to missing stored tensor {_short(key)}", path=path, tensor=name)
        if key in used:
            raise FormatError(f"stored tensor {key!r} is used twice", path=path, tensor=name)
        s = h.stored[key]
        if s.dtype != dtype or (shape is not None and s.shape != tuple(shape)) or (shape is None and len(s.shape) != 1):
            raise FormatError(f"{what} {key!r} is {s.dtype} {list(s.shape)}, expected {dtype} "
                              f"{'1-D' if shape is None else list(shape)}", path=path, tensor=name)
        used.add(key)
        return s

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
        if kind == "alias":  # a tied tensor: same storage as an earlier entry, stored once
            _obj(t, "alias entry", path, {"name", "kind", "of"}, tensor=name)
            target = next((x for x in h.entries if x.name == t["of"] and x.kind != "alias"), None)
            if target is None:
                raise FormatError(f"alias of {_short(t['of'])}: not an earlier non-alias tensor", path=path,
                                  tensor=name)
            h.entries.append(Entry(name, "alias", target.shape, target.dtype, target.sha256, of=target.name))
            continue
        if kind == "whole":
            _obj(t, "whole tensor entry", path, {"name", "kind", "shape", "dtype", "sha256", "data"}, tensor=name)
        elif kind == "frozen":
            _obj(t, "frozen tensor entry", path, {"name", "kind", "shape", "dtype", "sha256", "init", "frozen_scale",
                                                   "trainable", "mask", "values"}, {"stream"}, tensor=name)
        else:
            raise FormatError(f"unknown tensor kind {_short(kind)}", path=path, tensor=name)
        shape = _shape(t["shape"], "shape", path, limits, tensor=name)
        dtype = t["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES or (kind == "frozen" and dtype not in FROZEN_DTYPES):
            raise FormatError(f"dtype {_short(dtype)} is not allowed for a {kind} tensor", path=path, tensor=name)
        e = Entry(name, kind, shape, dtype, _digest(t["sha256"], "sha256", path, tensor=name))
        total += e.numel
        if total > limits.max_total_elements:
            raise FormatError(f"tensors hold more than {limits.max_total_elements} elements in all (limit)",
                              path=path, tensor=name)
        if kind == "whole":
            s = take(t["data"], dtype, shape, "data", name)
            e.data = s.key
            if s.sha256 != e.sha256:
                raise FormatError("whole tensor's dense digest differs from its stored digest", path=path, tensor=name)
        else:
            ini = _obj(t["init"], "init", path, {"name", "dist", "a", "b", "params"}, tensor=name)
            if ini["name"] not in INITIALIZERS if isinstance(ini["name"], str) else True:
                raise SpecError(f"unknown initializer {_short(ini['name'])} (known: {', '.join(INITIALIZERS)})",
                                path=path, tensor=name)
            _float32(ini["a"], "init a", path, tensor=name)
            _float32(ini["b"], "init b", path, tensor=name)
            if not isinstance(ini["params"], dict):
                raise FormatError("init params must be an object", path=path, tensor=name)
            try:
                e.init = InitSpec.from_json(t["init"])
            except FreezepackError as err:
                raise SpecError(err.reason, path=path, tensor=name) from None
            if "stream" in t:
                e.stream = _str(t["stream"], "stream", path, tensor=name)
                if e.stream == name or not e.stream:  # the default is never spelled out: one file per model
                    raise FormatError("stream must be given only when it differs from the name", path=path,
                                      tensor=name)
            e.frozen_scale = _float32(t["frozen_scale"], "frozen_scale", path, tensor=name)
            if dtype != "F32" and e.frozen_scale != _round_float(e.frozen_scale, dtype):
                raise FormatError(f"frozen_scale {e.frozen_scale!r} is not exactly a {dtype} number", path=path,
                                  tensor=name)
            e.trainable = _int(t["trainable"], "trainable", path, 0, e.numel, tensor=name)
            m = _obj(t["mask"], "mask", path, {"coder", "params", "tensor"}, tensor=name)
            e.coder = _str(m["coder"], "mask coder", path, tensor=name)
            if not isinstance(m["params"], dict) or not all(type(v) is int for v in m["params"].values()):
                raise FormatError("mask params must map names to integers", path=path, tensor=name)
            e.coder_params = dict(m["params"])
            words = 0
            if m["tensor"] is not None:
                s = take(m["tensor"], "U32", None, "mask", name)
                e.mask, words = s.key, s.shape[0]
            maskcode.check_params(e.coder, e.numel, e.trainable, e.coder_params, words, where=path, tensor=name)
            if (m["tensor"] is None) != (e.coder == "const"):
                raise FormatError(f"mask coder {e.coder!r} {'needs' if e.coder != 'const' else 'has no'} payload "
                                  "tensor", path=path, tensor=name)
            if e.trainable:
                e.values = take(t["values"], dtype, (e.trainable,), "values", name).key
            elif t["values"] is not None:
                raise FormatError("values given for a tensor with no trainable entries", path=path, tensor=name)
        h.entries.append(e)
    if used != set(h.stored):
        raise FormatError(f"stored tensors not used by any tensor: {', '.join(sorted(set(h.stored) - used))}",
                          path=path)
    return h


def digest_ok(expected: str, got_hex: str) -> bool:
    """Does a dense tensor's SHA-256 (hex) match an entry's digest: full (v1, 64 hex) or truncated (v2, 32 hex)."""
    return len(expected) in (32, 64) and got_hex[:len(expected)] == expected


def _round_float(x: float, dtype: str) -> float:
    """``x`` rounded to ``dtype`` (F32/F16/BF16) with round-to-nearest-even, as a Python float."""
    import torch  # the format layer already depends on torch (init); imported here to keep this module light

    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32).to(tdt))


class FpkReader:
    """An open .fpk file: validated header, and raw stored tensors read (and digest-checked) on demand."""

    def __init__(self, path, limits: Limits = DEFAULT_LIMITS):
        if sys.byteorder != "little":
            raise FormatError("big-endian hosts are not supported yet", path=path)
        self.path = os.fspath(path)
        size = _check_regular_file(self.path)
        try:
            self._f = open(self.path, "rb")
        except OSError as e:
            raise FormatError(f"cannot open: {e.strerror}", path=self.path) from None
        try:
            prefix = self._f.read(8)
            n = parse_prefix(prefix, size, self.path)
            raw = self._f.read(n)
            if len(raw) != n:
                raise FormatError("file shrank while being read", path=self.path)
            self._v2 = None
            if raw.startswith(b'{"__metadata__":{"freezepack":"2"'):  # format v2: compact binary body
                from . import compact

                self._v2 = compact.parse_file(raw, self._f, size, self.path, limits)
                self.header = self._v2.header
            else:
                self.header = parse_header(raw, size, self.path, limits)
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
        """The raw bytes of a stored tensor, checked against its SHA-256 (v2: decoded; the body digest was
        checked on open)."""
        if self._v2 is not None:
            return self._v2.read_bytes(key, tensor)
        s = self.header.stored[key]
        buf = bytearray(s.nbytes)
        self._f.seek(self.data_start + s.start)
        got = self._f.readinto(buf)
        if got != s.nbytes:
            raise FormatError(f"stored tensor {key!r} is truncated", path=self.path, tensor=tensor)
        if hashlib.sha256(buf).hexdigest() != s.sha256:
            raise IntegrityError(f"stored tensor {key!r} is corrupted (SHA-256 mismatch)", path=self.path,
                                 tensor=tensor)
        return buf

    def read_array(self, key: str, np_dtype: str, tensor: str | None = None) -> np.ndarray:
        return np.frombuffer(self.read_bytes(key, tensor), dtype=np_dtype)
