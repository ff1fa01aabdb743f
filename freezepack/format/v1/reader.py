"""Format v1 (spec/FORMAT.md §1-11), bytes -> model: a safetensors file whose ``__metadata__`` holds a canonical
JSON freezepack header and its SHA-256; the header lists each stored tensor (offsets, raw-bytes digest) and each
logical tensor.

This module checks v1's *encoding*: canonical JSON (outer and inner), the header digest, fixed-schema objects,
JSON number types, the stored tensors against the safetensors entries, the layout and the file size, and that
every stored tensor is some entry's part under the one naming rule. What the entries mean is judged by
:func:`freezepack.format.rules.check_header` after parsing.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import IO

from ...errors import FormatError, FreezepackError, IntegrityError, SpecError
from ..base import Reader
from ..dtypes import DTYPE_SIZES, F32_MAX
from ..framing import ALIGNMENT
from ..init import InitSpec
from ..io import read_at
from ..model import (
    DEFAULT_LIMITS,
    MASK_SUFFIX,
    VALUES_SUFFIX,
    AliasEntry,
    Entry,
    FrozenEntry,
    Header,
    Limits,
    WholeEntry,
    limit_error,
    short,
)
from ..rules import check_header, check_shape
from ..strictjson import HOLE, canonical_json, is_canonical, parse_json
from .layout import FORMAT_NAME, FORMAT_VERSION, HEADER_DIGEST_KEY, HEADER_KEY, layout_order

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class Stored:
    """One safetensors tensor of a v1 file: its place and its raw-bytes digest."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    sha256: str

    @property
    def nbytes(self) -> int:
        return self.end - self.start


# --- JSON field types (FORMAT.md §4) ------------------------------------------------------------------------------

def _int(v, what, path, lo=0, hi=1 << 64, tensor=None) -> int:
    if type(v) is not int or not lo <= v <= hi:  # type() so that true/false are not 1/0
        raise FormatError(f"{what} must be an integer in [{lo}, {hi}], got {short(v)}", path=path, tensor=tensor)
    return v


def _str(v, what, path, tensor=None) -> str:
    if not isinstance(v, str):
        raise FormatError(f"{what} must be a string, got {short(v)}", path=path, tensor=tensor)
    return v


def _float(v, what, path, tensor=None) -> float:
    # a JSON float (a number written with '.' or an exponent): 1 is an integer, not 1.0
    if type(v) is not float or not math.isfinite(v) or abs(v) > F32_MAX:
        raise FormatError(f"{what} must be a finite float32 number written as a JSON float, got {short(v)}",
                          path=path, tensor=tensor)
    return v


def _digest(v, what, path, tensor=None) -> str:
    if not isinstance(v, str) or not _HEX64.match(v):
        raise FormatError(f"{what} must be 64 lowercase hex digits", path=path, tensor=tensor)
    return v


def _shape(v, what, path, tensor=None) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise FormatError(f"{what} must be a list of dimensions", path=path, tensor=tensor)
    return tuple(_int(d, what, path, 0, 1 << 63, tensor) for d in v)


def _obj(v, what, path, required: set, optional: frozenset | set = frozenset(), tensor=None,
         ext: list | None = None) -> dict:
    """A fixed-schema header object: exactly ``required`` (+ ``optional``) members, plus ``x-`` extension members
    (FORMAT.md §9), whose canonical sizes are added to ``ext`` so that their total can be bounded."""
    if not isinstance(v, dict):
        raise FormatError(f"{what} must be a JSON object, got {short(v)}", path=path, tensor=tensor)
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


# --- the header, step by step (FORMAT.md §7) ----------------------------------------------------------------------

def decode_header(raw: bytes, path) -> str:
    if raw.isascii():  # the canonical header is ASCII; a compact ASCII str costs one byte per character
        return raw.decode("ascii")
    if b'"freezepack"' not in raw:
        raise FormatError("is a safetensors file without a freezepack header, not a .fpk (turn it into one with "
                          "`freezepack convert`) or not a safetensors file at all", path=path)
    raise FormatError("header is not ASCII, so not in canonical form (corrupted or edited)", path=path)


def parse_header(raw: bytes, file_size: int, path=None,
                 limits: Limits = DEFAULT_LIMITS) -> tuple[Header, dict[str, Stored]]:
    """Validate a whole v1 header (the bytes after the 8-byte prefix) against itself and the file size."""
    return parse_header_text(decode_header(raw, path), file_size, path, limits)


def parse_header_text(text: str, file_size: int, path, limits: Limits) -> tuple[Header, dict[str, Stored]]:
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
    seed_s = _str(d["seed"], "seed", path)
    if not re.fullmatch(r"0|[1-9][0-9]{0,19}", seed_s) or int(seed_s) >= 1 << 64:
        raise FormatError(f"seed must be a decimal integer in [0, 2**64), got {short(seed_s)}", path=path)
    if not isinstance(d["metadata"], dict):
        raise FormatError("metadata must map strings to strings", path=path)
    generator = d["generator"] if isinstance(d["generator"], str) else short(d["generator"])
    stored = _parse_stored(d["stored"], outer, data_size, path, limits, ext)
    entries = _parse_tensors(d["tensors"], stored, path, limits, ext)
    h = Header(seed=int(seed_s), entries=tuple(entries), metadata=dict(d["metadata"]),
               producer=_str(d["producer"], "producer", path), generator=generator, version=FORMAT_VERSION)
    check_header(h, limits, path)
    for e in h.entries:
        if isinstance(e, FrozenEntry) and e.values_key and stored[e.values_key].shape != (e.trainable,):
            s = stored[e.values_key]
            raise FormatError(f"values {s.key!r} is {s.dtype} {list(s.shape)}, expected {e.dtype} [{e.trainable}]",
                              path=path, tensor=e.name)
    if sum(ext) > limits.max_metadata_bytes:
        raise limit_error("x- extension members: canonical bytes in all", sum(ext), "max_metadata_bytes", limits,
                          path)
    return h, stored


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
    probe["__metadata__"] = {HEADER_KEY: HOLE, HEADER_DIGEST_KEY: meta[HEADER_DIGEST_KEY]}
    if not is_canonical(probe, text, ALIGNMENT - 1, hole=inner_text, hole_key=HEADER_KEY):
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
        raise FormatError(f"unsupported format {short(d.get('format'))} version {short(version)} (version must "
                          f"be the integer {FORMAT_VERSION})", path=path)


def _parse_stored(stored, outer: dict, data_size: int, path, limits: Limits, ext: list) -> dict[str, Stored]:
    """``stored`` against the safetensors entries (they must agree exactly), the layout, and the file size."""
    if not isinstance(stored, dict):
        raise FormatError("stored must be a JSON object", path=path)
    if len(stored) > 2 * limits.max_tensors:
        raise limit_error("number of stored tensors", len(stored), "max_tensors", limits, path)
    if set(outer) - {"__metadata__"} != set(stored):
        raise FormatError("the safetensors tensors and the freezepack header's stored list differ", path=path)
    out: dict[str, Stored] = {}
    for k, s in stored.items():
        _obj(s, f"stored tensor {k!r}", path, {"dtype", "shape", "data_offsets", "sha256"}, ext=ext)
        if not isinstance(s["dtype"], str) or s["dtype"] not in DTYPE_SIZES:
            raise FormatError(f"stored tensor {k!r} has unknown dtype {short(s['dtype'])}", path=path)
        shape = _shape(s["shape"], f"stored tensor {k!r} shape", path)
        check_shape(shape, limits, path, what=f"stored tensor {k!r} shape")
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
        out[k] = Stored(k, s["dtype"], shape, start, end, _digest(s["sha256"], f"{k!r} sha256", path))
    pos = 0
    for k in layout_order({k: s.dtype for k, s in out.items()}):
        if out[k].start != pos:
            raise FormatError(f"stored tensor {k!r} is not where the layout puts it (offset {out[k].start}, "
                              f"expected {pos})", path=path)
        pos = out[k].end
    if pos != data_size:
        raise FormatError(f"tensor data is {data_size} bytes but the tensors need {pos} (truncated or padded)",
                          path=path)
    return out


class _Parts:
    """Hands out stored tensors to the entries that use them: one naming rule, each used exactly once."""

    def __init__(self, stored: dict[str, Stored], path):
        self.stored, self.path = stored, path
        self.used: set[str] = set()

    def take(self, key, dtype, shape, what, name) -> Stored:
        expected = name + {"data": "", "mask": MASK_SUFFIX, "values": VALUES_SUFFIX}[what]
        if key != expected:  # one naming rule, so a stored tensor's key alone says whose part it is
            raise FormatError(f"{what} tensor must be stored as {expected!r}, got {short(key)}", path=self.path,
                              tensor=name)
        if key not in self.stored:
            raise FormatError(f"{what} refers to missing stored tensor {short(key)}", path=self.path, tensor=name)
        if key in self.used:
            raise FormatError(f"stored tensor {key!r} is used twice", path=self.path, tensor=name)
        s = self.stored[key]
        if s.dtype != dtype or (shape is not None and s.shape != tuple(shape)) or (shape is None and len(s.shape) != 1):
            raise FormatError(f"{what} {key!r} is {s.dtype} {list(s.shape)}, expected {dtype} "
                              f"{'1-D' if shape is None else list(shape)}", path=self.path, tensor=name)
        self.used.add(key)
        return s


def _parse_tensors(tensors, stored: dict[str, Stored], path, limits: Limits, ext: list) -> list[Entry]:
    if not isinstance(tensors, list):
        raise FormatError("tensors must be a JSON array", path=path)
    if len(tensors) > limits.max_tensors:
        raise limit_error("number of tensors", len(tensors), "max_tensors", limits, path)
    parts = _Parts(stored, path)
    entries: list[Entry] = []
    for t in tensors:
        if not isinstance(t, dict):
            raise FormatError("tensor entry is not an object", path=path)
        name = _str(t.get("name"), "tensor name", path)
        kind = t.get("kind")
        if kind == "alias":
            _obj(t, "alias entry", path, {"name", "kind", "of"}, tensor=name, ext=ext)
            entries.append(AliasEntry(name, _str(t["of"], "alias of", path, tensor=name)))
        elif kind in ("whole", "frozen"):
            entries.append(_parse_entry(t, kind, name, parts, path, ext))
        else:
            raise FormatError(f"unknown tensor kind {short(kind)}", path=path, tensor=name)
    if parts.used != set(stored):
        raise FormatError(f"stored tensors not used by any tensor: {', '.join(sorted(set(stored) - parts.used))}",
                          path=path)
    return entries


def _parse_entry(t: dict, kind: str, name: str, parts: _Parts, path, ext: list) -> Entry:
    if kind == "whole":
        _obj(t, "whole tensor entry", path, {"name", "kind", "shape", "dtype", "sha256", "data"}, tensor=name,
             ext=ext)
    else:
        _obj(t, "frozen tensor entry", path, {"name", "kind", "shape", "dtype", "sha256", "init", "frozen_scale",
                                               "trainable", "mask", "values"}, {"stream"}, tensor=name, ext=ext)
    shape = _shape(t["shape"], "shape", path, tensor=name)
    dtype = t["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise FormatError(f"dtype {short(dtype)} is not allowed for a {kind} tensor", path=path, tensor=name)
    sha = _digest(t["sha256"], "sha256", path, tensor=name)
    if kind == "whole":
        s = parts.take(t["data"], dtype, shape, "data", name)
        if s.sha256 != sha:
            raise FormatError("whole tensor's dense digest differs from its stored digest", path=path, tensor=name)
        return WholeEntry(name, shape, dtype, sha)
    init = _parse_init(t["init"], name, path, ext)
    stream = _str(t["stream"], "stream", path, tensor=name) if "stream" in t else None
    scale = _float(t["frozen_scale"], "frozen_scale", path, tensor=name)
    trainable = _int(t["trainable"], "trainable", path, 0, math.prod(shape), tensor=name)
    m = _obj(t["mask"], "mask", path, {"coder", "params", "tensor"}, tensor=name, ext=ext)
    coder = _str(m["coder"], "mask coder", path, tensor=name)
    if not isinstance(m["params"], dict) or not all(type(v) is int for v in m["params"].values()):
        raise FormatError("mask params must map names to integers", path=path, tensor=name)
    words = 0
    if m["tensor"] is not None:  # §3: the mask tensor exists exactly when the coded stream has words
        words = parts.take(m["tensor"], "U32", None, "mask", name).shape[0]
        if words == 0:
            raise FormatError("zero-length mask tensor: an empty stream is stored as \"tensor\": null", path=path,
                              tensor=name)
    if trainable:  # its length is checked after the rules (a count the mask coder disagrees with is named first)
        parts.take(t["values"], dtype, None, "values", name)
    elif t["values"] is not None:
        raise FormatError("values given for a tensor with no trainable entries", path=path, tensor=name)
    return FrozenEntry(name, shape, dtype, sha, init, scale, trainable, coder, dict(m["params"]), words, stream)


def _parse_init(v, name: str, path, ext: list) -> InitSpec:
    """The record's JSON shape and number types; whether it names a known initializer with exactly its params is
    a rule (rules.check_init), the same for both versions."""
    ini = _obj(v, "init", path, {"name", "dist", "a", "b", "params"}, tensor=name, ext=ext)
    iname = _str(ini["name"], "init name", path, tensor=name)
    a = _float(ini["a"], "init a", path, tensor=name)
    b = _float(ini["b"], "init b", path, tensor=name)
    try:
        return InitSpec(iname, ini["dist"], a, b, ini["params"] if isinstance(ini["params"], dict) else {})
    except FreezepackError as err:
        raise SpecError(err.reason, path=path, tensor=name) from None


class V1Reader(Reader):
    """An open v1 file: the header parsed and judged, stored tensors read and digest-checked on demand."""

    version = 1

    def __init__(self, f: IO[bytes], path: str, file_size: int, raw_header: bytes, limits: Limits):
        super().__init__(f, path, file_size, 8 + len(raw_header), limits)
        text = decode_header(raw_header, path)
        del raw_header  # only the text stays
        self.header, self.stored = parse_header_text(text, file_size, path, limits)

    def _read_part(self, key: str, tensor: str | None) -> bytearray:
        s = self.stored[key]
        buf = bytearray(s.nbytes)
        if read_at(self._f, buf, self.data_start + s.start) != s.nbytes:  # positional: safe from several threads
            raise FormatError(f"stored tensor {key!r} is truncated", path=self.path, tensor=tensor)
        if hashlib.sha256(buf).hexdigest() != s.sha256:
            raise IntegrityError(f"stored tensor {key!r} is corrupted (SHA-256 mismatch)", path=self.path,
                                 tensor=tensor)
        return buf

    def part_nbytes(self, key: str | None) -> int:
        return self.stored[key].nbytes if key else 0

    def part_coding(self, key: str | None) -> str | None:
        return None if key is None else "raw"

    @property
    def header_bytes(self) -> int:
        return self.data_start

    def breakdown(self) -> dict[str, int]:
        pay = {"mask": 0, "values": 0, "whole": 0}
        for key, s in self.stored.items():
            pay[_role(key)] += s.nbytes
        return {"file": self.file_size, "structure": self.data_start, "mask_model": 0, "value_model": 0,
                "mask_payload": pay["mask"], "values_payload": pay["values"], "whole_payload": pay["whole"]}


def _role(key: str) -> str:
    return "mask" if key.endswith(MASK_SUFFIX) else "values" if key.endswith(VALUES_SUFFIX) else "whole"
