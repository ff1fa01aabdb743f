"""Hand-made format v2 files (spec/FORMAT.md §12) for tests: a body re-digested after an edit (a file that lies
consistently, so only the parser's and the rules' checks can refuse it), minimal files around one value block,
and a front-coded name bomb."""
from __future__ import annotations

import hashlib
import os
import random
import struct

from ..errors import FreezepackError
from ..format.dtypes import DTYPES
from ..format.v2 import wire


def leb128(v: int) -> bytes:
    """Unsigned LEB128 as spec/FORMAT.md §12.2 writes it, by hand (not the writer's code): hand-made files built with
    it test the readers against the spec, not against the writer."""
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def resigned(data: bytes, rest: bytes) -> bytes:
    """A v2 file whose body after its digest is ``rest``, correctly digested (``data`` is unused: kept for the
    callers that pass the file ``rest`` came from)."""
    body = hashlib.sha256(rest).digest() + rest
    return wire.outer_header(len(body)) + body


def body_rest(data: bytes) -> bytes:
    """A v2 file's body after its 32-byte digest (header and payloads)."""
    n = struct.unpack("<Q", data[:8])[0]
    return data[8 + n + 32:]


def fuzz_resigned(tmp_path, data: bytes, seed: int, rounds: int = 300, max_changes: int = 4) -> None:
    """Change 1..max_changes random body bytes and re-digest (only the semantic checks can refuse such a file):
    loading either works or raises a FreezepackError, never anything else."""
    from ..api import load

    rest = body_rest(data)
    rnd = random.Random(seed)
    p = tmp_path / "f.fpk"
    for _ in range(rounds):
        bad = bytearray(rest)
        for _ in range(rnd.randint(1, max_changes)):
            bad[rnd.randrange(len(bad))] = rnd.randrange(256)
        p.write_bytes(resigned(data, bytes(bad)))
        try:
            load(p)
        except FreezepackError:
            pass


def header_start(count: int, producer: str = "t", seed: int = 1) -> wire.Out:
    """A v2 header up to its entries: generator 0, ``seed``, ``producer``, no metadata, ``count`` entries."""
    o = wire.Out()
    o.u8(0)
    o.var(seed)
    o.str(producer)
    o.var(0)
    o.var(count)
    return o


def body_with_whole(block: bytes, payload: bytes, dtype="F32", n=8) -> bytes:
    """A minimal v2 file holding one whole tensor ``x`` of ``n`` elements with a hand-made value block."""
    o = header_start(1)
    o.var(0)
    o.var(1)
    o.b += b"x"
    o.u8(wire.KINDS.index("whole"))
    o.u8(DTYPES.index(dtype))
    o.var(1)
    o.var(n)
    o.b += block
    return resigned(b"", bytes(o.b) + payload)


def codebook_head(form: int, m: int, body: bytes, counts=None, stream=0) -> bytes:
    """A 'codebook' value block: form (0 table, 1 grid), m symbols, the table or grid bytes, counts, stream."""
    o = wire.Out()
    o.u8(wire.VALUE_CODERS.index("codebook"))
    o.u8(form)
    o.u8(m - 1)
    o.b += body
    for c in counts or []:
        o.var(c)
    if counts:
        o.var(stream)
    return bytes(o.b)


def name_bomb(entries: int, name_len: int) -> bytes:
    """A v2 file of one 1-byte whole tensor and ``entries - 1`` aliases of it whose names share a ``name_len``-byte
    prefix: front coding makes each name cost a few bytes of file and ``name_len`` bytes of memory."""
    o = header_start(entries)
    prev = ""
    for i in range(entries):
        suffix = f"{i:07d}"
        shared = 0 if i == 0 else name_len + len(os.path.commonprefix([prev, suffix]))  # front coding, canonical
        raw = (b"a" * name_len + suffix.encode())[shared:] if i == 0 else suffix.encode()[shared - name_len:]
        o.var(shared)
        o.var(len(raw))
        o.b += raw
        prev = suffix
        if i == 0:
            o.u8(wire.KINDS.index("whole"))
            o.u8(DTYPES.index("U8"))
            o.var(0)                                   # a scalar
            o.u8(wire.VALUE_CODERS.index("raw"))
        else:
            o.u8(wire.KINDS.index("alias"))
            o.var(0)
    return resigned(b"", bytes(o.b) + b"\x07")
