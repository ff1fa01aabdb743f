"""Format v2, bytes -> model (spec/FORMAT.md §12): the body's digest, its binary header and where each payload lies.

This module checks v2's *encoding*: the frame is exactly the one the body length implies, the body digest, minimal
varints, known codes, canonical init params text, front-coded names (their total size bounded before they are
built), each coder's header fields and that the payloads tile the body. What the entries mean is judged by the
rules (:class:`freezepack.format.rules.Checker`), which the parser applies to each field as it reads it: of two
defects, the one at the lower offset wins (spec/FORMAT.md §12.9).
"""
from __future__ import annotations

import hashlib
import math
import struct
from typing import IO, Any

import numpy as np

from ...errors import FormatError, FreezepackError, IntegrityError, SpecError
from .. import entropy, maskcode
from ..base import Reader
from ..dtypes import DTYPE_SIZES, DTYPES
from ..init import DISTRIBUTIONS, InitSpec
from ..initializers import INITIALIZERS
from ..io import read_exact
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
)
from ..rules import Checker
from ..strictjson import canonical_json, parse_json
from .wire import (
    DEFAULT_PARAMS,
    DERIVED_SLACK,
    DIGEST_BYTES,
    GENERATORS,
    KINDS,
    MASK_CODERS,
    TAG_PARAMS,
    TAG_SCALE,
    TAG_STREAM,
    VALUE_CODERS,
    VERSION,
    In,
    name_in,
    outer_header,
    shape_in,
    unzigzag,
)

Part = tuple[Any, Any, int, int]  # (coder, its parsed parameters, start, end) in the body


class _Parser:
    """One pass over a v2 header: the entries, and per part key (coder, params, start, end) in the body."""

    def __init__(self, body_len: int, path, budget: int, limits: Limits):
        self.path, self.body_len = path, body_len
        self.check = Checker(VERSION, limits, path)  # the rules, applied as each field is read (byte order)
        self.parts: dict[str, Part] = {}
        self.model_bytes = {"mask": 0, "values": 0}  # header bytes that are coder parameters (for accounting)
        self.name_budget = [budget]

    def parse(self, c: In, limits: Limits) -> Header:
        g = c.u8()
        if g >= len(GENERATORS):
            raise SpecError(f"unknown generator code {g} (this reader knows {', '.join(GENERATORS)})", path=self.path)
        self.check.generator(GENERATORS[g])
        seed = c.var()
        self.check.seed(seed)
        producer = c.str("producer")
        self.check.producer(producer)
        metadata = self._metadata(c, limits)
        count = c.var()
        self.check.count(count)
        entries: list[Entry] = []
        lengths: list[tuple[str, Any, Any, int]] = []  # (key, coder, params, length) in payload order
        prev = b""
        for i in range(count):
            c.tensor = None
            name, prev = name_in(c, prev, self.name_budget)
            self.check.name(name)
            c.tensor = name
            tag = c.u8()
            kind = tag & 3
            if kind >= len(KINDS) or tag & ~(3 | TAG_STREAM | TAG_SCALE | TAG_PARAMS) or \
                    (kind != 1 and tag & ~3):
                raise c.err(f"unknown entry tag {tag}")
            if KINDS[kind] == "alias":
                j = c.var(i)  # 0-based, counting every entry (aliases too); the rules check what it names
                self.check.alias(name, entries[j].name)
                entries.append(AliasEntry(name, entries[j].name))
                continue
            d = c.u8()
            if d >= len(DTYPES):
                raise c.err(f"unknown dtype code {d}")
            dtype = DTYPES[d]
            self.check.dtype(name, dtype)
            shape = shape_in(c, limits)
            self.check.shape(name, shape)
            n = math.prod(shape)
            if KINDS[kind] == "whole":
                lengths.append((name,) + self._value_block(c, n, dtype))
                entries.append(WholeEntry(name, shape, dtype, None))  # its bytes are under the body digest
                continue
            entries.append(self._frozen(c, name, tag, dtype, shape, n, lengths))
        c.tensor = None
        pos = 32 + c.i
        for key, coder, params, length in lengths:
            if length > self.body_len - pos:
                raise FormatError("v2 payloads run past the end of the file (truncated or lying lengths)",
                                  path=self.path)
            if key in self.parts:
                raise FormatError(f"two payloads are named {key!r} (tensor names collide)", path=self.path)
            self.parts[key] = (coder, params, pos, pos + length)
            pos += length
        if pos != self.body_len:
            raise FormatError(f"v2 body has {self.body_len - pos} bytes after the last payload", path=self.path)
        return Header(seed=seed, entries=tuple(entries), metadata=metadata, producer=producer,
                      generator=GENERATORS[g], version=VERSION)

    def _metadata(self, c: In, limits: Limits) -> dict[str, str]:
        """Keys strictly increasing (UTF-8 bytes, i.e. code points); the size measured as the rules measure it (UTF-8
        bytes of keys and values), while reading, so that no more than the limit is ever built."""
        nmeta = c.var(limits.max_metadata_bytes + 1)
        prev: bytes | None = None
        size = 0
        metadata: dict[str, str] = {}
        for _ in range(nmeta):
            k, v = c.str("metadata key"), c.str("metadata value")
            kb = k.encode("utf-8")
            if prev is not None and kb <= prev:
                raise c.err("metadata keys are not strictly increasing")
            prev = kb
            size += len(kb) + len(v.encode("utf-8"))
            self.check.metadata_size(size)
            metadata[k] = v
        return metadata

    def _frozen(self, c: In, name: str, tag: int, dtype: str, shape: tuple[int, ...], n: int,
                lengths: list) -> FrozenEntry:
        self.check.frozen_dtype(name, dtype)
        stream = c.str("stream") if tag & TAG_STREAM else None
        self.check.stream(name, stream)
        ib = c.u8()
        if ib >> 2 >= len(INITIALIZERS) or (ib & 3) >= len(DISTRIBUTIONS):
            raise SpecError(f"unknown initializer code {ib}", path=self.path, tensor=name)
        a, b = c.f32("init a"), c.f32("init b")
        iname = INITIALIZERS[ib >> 2]
        params: Any = dict(DEFAULT_PARAMS[iname])
        if tag & TAG_PARAMS:
            text = c.str("init params")
            params = parse_json(text, "init params", self.path)
            if not isinstance(params, dict) or canonical_json(params) == canonical_json(DEFAULT_PARAMS[iname]):
                raise c.err("init params must be an object other than the defaults")
            if canonical_json(params) != text:  # one text per value, as for every JSON text in a .fpk
                raise c.err("init params are not canonical JSON")
        self.check.init_params(name, iname, params)
        try:
            init = InitSpec(iname, DISTRIBUTIONS[ib & 3], a, b, params)
        except FreezepackError as err:
            raise SpecError(err.reason, path=self.path, tensor=name) from None
        self.check.init(name, init)
        scale = 1.0
        if tag & TAG_SCALE:
            scale = c.f32("frozen_scale")
            if scale == 1.0:
                raise c.err("frozen_scale 1.0 must not be spelled out")
            self.check.frozen_scale(name, scale, dtype)
        trainable = c.var(n + 1)
        at = c.i
        mc = c.u8()
        if mc >= len(MASK_CODERS):
            raise FormatError(f"unknown mask coder code {mc}: written by a newer freezepack?", path=self.path,
                              tensor=name)
        coder = MASK_CODERS[mc]
        coder_params = self._mask_params(c, coder, n, trainable)
        words = 0
        if coder != "const":
            mlen = c.var(self.body_len + 1)
            if mlen % 4:
                raise c.err("mask payload is not whole 32-bit words")
            words = mlen // 4
            lengths.append((name + MASK_SUFFIX, "mask", None, mlen))
        self.model_bytes["mask"] += c.i - at
        self.check.mask(FrozenEntry(name, shape, dtype, "", init, scale, trainable, coder, coder_params, words, stream))
        if trainable:
            lengths.append((name + VALUES_SUFFIX,) + self._value_block(c, trainable, dtype))
        sha = bytes(c.take(DIGEST_BYTES)).hex()  # (its form is the wire's: 16 bytes)
        return FrozenEntry(name, shape, dtype, sha, init, scale, trainable, coder, coder_params, words, stream)

    def _mask_params(self, c: In, coder: str, n: int, trainable: int) -> dict:
        if coder == "positions":
            return {"value": c.u8()}
        if coder == "ans-gaps":
            return {"value": c.u8(), "b": c.u8(), "phi": c.var(1 << 32)}
        if coder == "ans-bernoulli":
            if not 0 < trainable < n:
                raise c.err("'ans-bernoulli' mask with nothing to code")
            return {"cdf1": maskcode.ans_threshold(n, trainable)}
        if coder == "ans-ctx":
            nb, flags = c.u8(), c.u8()
            p: dict[str, Any] = {"bins": nb, "flags": flags}
            if flags & entropy.FLAG_COLS:
                p["col_ones"] = c.var(n + 1)
            if flags & entropy.FLAG_ROWS:
                p["row_ones"] = c.var(n + 1)
            if nb > entropy.MAX_BINS:
                raise c.err(f"'ans-ctx' with {nb} bins (at most {entropy.MAX_BINS})")
            p["counts"] = [c.var(n + 1) for _ in range(nb)]
            return p
        return {}

    def _value_block(self, c: In, n: int, dtype: str):
        at = c.i
        try:
            return self._value_block_(c, n, dtype)
        finally:
            self.model_bytes["values"] += c.i - at

    def _value_block_(self, c: In, n: int, dtype: str, nested: bool = False):
        """(coder, params, payload length) of one value block (spec §12.8)."""
        elem = DTYPE_SIZES[dtype]
        vc = c.u8()
        if vc >= len(VALUE_CODERS) or (nested and VALUE_CODERS[vc] not in ("raw", "planes")):
            raise FormatError(f"unknown value coder code {vc}" + (" inside 'cast'" if nested else
                              ": written by a newer freezepack?"), path=self.path, tensor=c.tensor)
        coder = VALUE_CODERS[vc]
        if coder == "raw":
            return "raw", None, n * elem
        if n == 0:
            raise c.err(f"{coder!r} coding of an empty tensor")
        if coder == "cast":
            t = c.u8()
            if dtype != "F32" or t >= len(DTYPES) or DTYPES[t] not in ("F16", "BF16"):
                raise c.err(f"'cast' of a {dtype} tensor to dtype code {t} (only F32 to F16/BF16)")
            inner, params, length = self._value_block_(c, n, DTYPES[t], nested=True)
            return "cast", (DTYPES[t], inner, params, n), length
        if coder == "codebook":
            return self._codebook(c, n, dtype)
        tables: list[tuple[list[int], list[int]] | None] = []
        coded = c.u8()
        if coded >> elem or not coded >> (elem - 1):
            raise c.err(f"'planes' coded-plane mask {coded} is invalid for {elem}-byte elements")
        for i in range(elem):
            if not coded >> (elem - 1 - i) & 1:
                tables.append(None)
                continue
            m = c.u8() + 1
            used = list(c.take(m))
            if any(x >= y for x, y in zip(used, used[1:])):
                raise c.err("'planes' symbols are not strictly increasing")
            counts = [c.var(n + 1) for _ in range(m)]
            if sum(counts) != n or min(counts) < 1:
                raise c.err("'planes' histogram does not add up to the element count")
            tables.append((used, counts))
        if tables[0] is None:
            raise c.err("'planes' must code the top plane")
        stream = c.var(4 * (2 + (n * elem * entropy.PRECISION + 31) // 32) + 1)
        return "planes", (tables, elem, n), stream + n * sum(t is None for t in tables)

    def _codebook(self, c: In, n: int, dtype: str):
        elem = DTYPE_SIZES[dtype]
        if n < 2 or elem == 1:
            raise c.err(f"'codebook' coding of {n} {dtype} elements (needs >= 2 elements of >= 2 bytes)")
        form, m = c.u8(), c.u8() + 1
        if form == 0:
            table = np.frombuffer(bytes(c.take(m * elem)), dtype=f"<u{elem}")
            if np.any(table[1:] <= table[:-1]):
                raise c.err("'codebook' table is not strictly increasing")
        elif form == 1:
            if dtype != "F32":
                raise c.err(f"'codebook' grid on a {dtype} tensor (F32 only)")
            step = c.f32("'codebook' grid step")
            if not step > 0:
                raise c.err("'codebook' grid step must be > 0")
            levels = [unzigzag(c.var(2 * entropy.MAX_GRID_LEVEL + 1))]
            for _ in range(m - 1):
                levels.append(levels[-1] + 1 + c.var(2 * entropy.MAX_GRID_LEVEL + 1))
            if max(abs(levels[0]), abs(levels[-1])) > entropy.MAX_GRID_LEVEL:
                raise c.err("'codebook' grid level beyond +-2^24")
            vals = entropy.grid_values(levels, step)
            if not np.all(np.isfinite(vals)) or np.any(vals[1:] <= vals[:-1]):
                raise c.err("'codebook' grid values are not finite and strictly increasing")
            table = vals.view("<u4")
        else:
            raise c.err(f"unknown 'codebook' form {form}")
        counts, stream = [n], 0
        if m > 1:
            counts = [c.var(n + 1) for _ in range(m)]
            if sum(counts) != n or min(counts) < 1:
                raise c.err("'codebook' histogram does not add up to the element count")
            stream = c.var(4 * (2 + (n * entropy.PRECISION + 31) // 32) + 1)
            if stream % 4:
                raise c.err("'codebook' stream is not whole 32-bit words")
        return "codebook", (table, counts, n, elem), stream


def layout(head: bytes | memoryview, body_len: int, path=None,
           limits: Limits = DEFAULT_LIMITS) -> tuple[int, list[tuple[str, int, int]]]:
    """``(header_end, [(key, start, end), ...])``: where the header ends and each payload lies in a body of
    ``body_len`` bytes, parsed from its first bytes ``head`` only (every structural check and rule, every length
    against ``body_len``; a header longer than ``head`` is a FormatError). The digest is NOT checked: this is for
    cutting a file whose bytes something else checks (freezepack.fleet.delta, against a signed full-file hash),
    and must not read a whole large body to find its payload boundaries."""
    if len(head) < 32 or body_len < len(head):
        raise FormatError("v2 body is shorter than its digest", path=path)
    p = _Parser(body_len, path, body_len + DERIVED_SLACK, limits)
    c = In(memoryview(head)[32:], path)
    p.parse(c, limits)
    return 32 + c.i, [(key, start, end) for key, (_, _, start, end) in p.parts.items()]


def parse_body(body: bytes, path=None,
               limits: Limits = DEFAULT_LIMITS) -> tuple[Header, dict[str, Part], dict[str, int]]:
    """``(header, parts, model_bytes)`` of a whole v2 body: its digest checked, its header parsed and judged;
    ``parts``: key -> (coder, params, start, end) in the body; ``model_bytes``: header bytes that are coder
    parameters, by role."""
    if len(body) < 32 or hashlib.sha256(memoryview(body)[32:]).digest() != body[:32]:
        raise IntegrityError("file is corrupted (v2 body SHA-256 mismatch)", path=path)
    # names may cost up to the body's size again, plus a little: a 1 MB file cannot claim a GB of names
    p = _Parser(len(body), path, len(body) + DERIVED_SLACK, limits)
    header = p.parse(In(memoryview(body)[32:], path), limits)  # (the rules applied as each field is read)
    return header, p.parts, p.model_bytes


def coding_name(coder: str | None, params: Any) -> str:
    """How a part is coded, for humans: ``raw``, ``planes``, ``cast:BF16[+planes]``, ``codebook:16``."""
    if coder == "cast":
        return f"cast:{params[0]}" + ("+planes" if params[1] == "planes" else "")
    if coder == "codebook":
        return f"codebook:{len(params[0])}"
    return coder or "raw"


class V2Reader(Reader):
    """An open v2 file: the body read and its digest checked once, the header parsed and judged, parts decoded on
    demand."""

    version = VERSION

    def __init__(self, f: IO[bytes], path: str, file_size: int, raw_header: bytes, limits: Limits):
        super().__init__(f, path, file_size, 8 + len(raw_header), limits)
        body_len = file_size - 8 - len(raw_header)
        if body_len < 32 or outer_header(body_len) != struct.pack("<Q", len(raw_header)) + raw_header:
            raise FormatError("v2 safetensors header is not the one its length implies (corrupted or edited)",
                              path=path)
        self.body = read_exact(f, body_len, path)
        self.header, self.parts, self.model_bytes = parse_body(self.body, path, limits)

    @property
    def header_bytes(self) -> int:
        return self.data_start + min((s for _, _, s, _ in self.parts.values()), default=len(self.body))

    def breakdown(self) -> dict[str, int]:
        """Bytes by role: structure (safetensors JSON, digest, names, shapes, ...), coder models, payloads."""
        pay = {"mask": 0, "values": 0, "whole": 0}
        for key, (_, _, start, end) in self.parts.items():
            pay["mask" if key.endswith(MASK_SUFFIX) else "values" if key.endswith(VALUES_SUFFIX) else "whole"] += \
                end - start
        first = min((s for _, _, s, _ in self.parts.values()), default=len(self.body))
        outer = self.data_start
        return {"file": outer + len(self.body),
                "structure": outer + first - self.model_bytes["mask"] - self.model_bytes["values"],
                "mask_model": self.model_bytes["mask"], "value_model": self.model_bytes["values"],
                "mask_payload": pay["mask"], "values_payload": pay["values"], "whole_payload": pay["whole"]}

    def raw(self, key: str) -> memoryview:
        _, _, start, end = self.parts[key]
        return memoryview(self.body)[start:end]

    def _read_part(self, key: str, tensor: str | None) -> bytearray:
        """Decoded little-endian tensor bytes of a values/whole part, or the coded payload of a mask part (the body
        digest was checked on open)."""
        coder, params, start, end = self.parts[key]
        return self._decode(coder, params, self.raw(key), tensor)

    def _decode(self, coder, params, payload, tensor: str | None) -> bytearray:
        if coder == "planes":
            tables, elem, n = params
            return entropy.decode_planes(n, elem, tables, payload, where=self.path, tensor=tensor)
        if coder == "cast":  # widening F16/BF16 -> F32 is exact
            target, inner, inner_params, n = params
            half = self._decode(inner, inner_params, payload, tensor)
            if len(half) != 2 * n:
                raise FormatError("'cast' values payload has the wrong length", path=self.path, tensor=tensor)
            h = np.frombuffer(half, dtype="<u2")
            out = bytearray(4 * n)  # widened in place: the dense bytes once, not three temporaries of them
            wide = np.frombuffer(out, dtype="<u4")
            if target == "BF16":
                wide[:] = h
                wide <<= 16
            else:
                wide.view("<f4")[:] = h.view("<f2")
            return out
        if coder == "codebook":  # the dense bytes are written once (a tiny file may expand to the reader's limit)
            table, counts, n, elem = params
            out = bytearray(n * elem)
            dense = np.frombuffer(out, dtype=f"<u{elem}")
            table = table.astype(dense.dtype, copy=False)
            if len(counts) == 1:
                dense[:] = table[0]
                return out
            words = np.frombuffer(payload, dtype="<u4")
            sym = entropy.decode_symbols(words, counts, n, "'codebook' values", self.path, tensor)
            for i in range(0, n, 1 << 16):  # in chunks: take() widens the uint8 symbols to 8-byte indices
                np.take(table, sym[i:i + (1 << 16)], out=dense[i:i + (1 << 16)], mode="clip")  # all < m
            return out
        return bytearray(payload)

    def part_nbytes(self, key: str | None) -> int:
        if key is None or key not in self.parts:
            return 0
        return self.parts[key][3] - self.parts[key][2]

    def part_coding(self, key: str | None) -> str | None:
        """How a stored part is coded, for humans: ``raw``, ``planes``, ``cast:BF16``, ``codebook:16``, ..."""
        return None if key is None else coding_name(*self.parts[key][:2])
