"""Split a safetensors-layout file into content-addressed pieces, so an update ships only what changed.

A .fpk file is a valid safetensors file: 8-byte little-endian header length, a JSON header, then each tensor's
bytes at its ``data_offsets``. We cut the file at exactly those boundaries (the header is one piece, each tensor
one piece, split further above ``MAX_PIECE`` so a resumed download never repeats much). A piece is named by the
SHA-256 of its bytes. A release lists its pieces in file order inside the *signed* TUF target, so a device that
already holds the previous file rebuilds the new one from the pieces it has and fetches only the rest:

* fine-tuning (same seed, generator, masks; new trained values): only the values tensors + the new header move;
* a mask change: only the tensors whose bytes changed move.

Format v1 .fpk files and dense safetensors files are cut on the generic safetensors layout (for a dense file
fine-tuning changes every byte and the delta is the whole file). A format v2 .fpk (spec/FORMAT.md §12) is one
``U8`` tensor whose body is digest || binary header || payloads back to back, which that layout would ship whole;
it is cut inside the body instead (``_payload_ranges``): one ``__header__`` piece up to the first payload
(safetensors JSON, body digest, v2 header), then one piece per payload (a mask, a values or a whole tensor),
labelled with its stored key (``conv1.weight#values``). The cut parses the v2 header with the format's own
parser under its limits, from at most ``MAX_PIECE`` bytes; anything unexpected falls back to the generic cut.
The assembled file is always checked against the full-file hash in the signed target, so a wrong piece (or a
lying file) can never produce a silently wrong model: the cut only decides how much is reused.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass

from ..errors import FleetError, FormatError, FreezepackError
from ..format.model import MAX_HEADER_BYTES
from ..format.reader import payload_layout
from . import safejson

MAX_PIECE = 4 << 20            # resume granularity and largest blob a device holds in memory
MAX_HEADER = MAX_HEADER_BYTES  # one cap for every safetensors header freezepack reads (safetensors' own)
HEADER_LABEL = "__header__"
MAX_BLOB = 8 + MAX_HEADER      # the header piece; tensor pieces are at most MAX_PIECE, gaps/tails this
MAX_LAYOUT_PIECES = 200_000    # about 800 GB of tensors in 4 MiB pieces
MAX_LABEL = 512
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
# a safetensors header is bounded by its own length field (MAX_HEADER); nesting and counts bounded too, so a
# hostile header cannot exhaust memory or the interpreter's stack while we cut the file into pieces
HEADER_LIMITS = safejson.JsonLimits(MAX_HEADER, max_depth=16, max_containers=2_000_000, max_values=20_000_000)


@dataclass(frozen=True)
class Piece:
    """``length`` bytes at ``offset`` of a file, with SHA-256 ``sha256`` (hex); ``label`` says what they hold."""

    offset: int
    length: int
    sha256: str
    label: str

    def to_json(self) -> list:
        return [self.sha256, self.length, self.label]


def read_safetensors_header(f, size: int, path: str) -> tuple[int, dict]:
    """``(N, header)`` of any safetensors file (a .fpk or a dense model), bounded before parsing: the one parser of
    generic safetensors headers in the fleet (the .fpk readers' strict, canonical ones are freezepack.format's)."""
    head = f.read(8)
    if size < 8 or len(head) < 8:
        raise FormatError("not a safetensors file: shorter than its 8-byte header length", path=path)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise FormatError(f"not a safetensors file: header length {n} does not fit in {size} bytes (cap "
                          f"{MAX_HEADER})", path=path)
    raw = f.read(n)
    if len(raw) != n:
        raise FormatError("file shrank while being read", path=path)
    try:
        header = safejson.loads(raw, HEADER_LIMITS, what="safetensors header")
    except FleetError as e:
        raise FormatError(f"not a safetensors file: {e.reason}", path=path) from None
    if not isinstance(header, dict):
        raise FormatError("not a safetensors file: header is not a JSON object", path=path)
    return n, header


def _ranges(path: str, size: int, n: int, header: dict) -> list[tuple[int, int, str]]:
    """(offset, length, label) covering the whole file, cut at the safetensors header and tensor boundaries."""
    base = 8 + n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offs = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] or base + offs[1] > size):
            raise FormatError(f"bad data_offsets {offs!r}", path=path, tensor=name)
        spans.append((offs[0], offs[1], name))
    spans.sort()
    out = [(0, base, HEADER_LABEL)]
    pos = 0
    for start, end, name in spans:
        if start < pos:
            raise FormatError(f"data_offsets overlap the previous tensor at byte {start}", path=path, tensor=name)
        if start > pos:
            out.append((base + pos, start - pos, "__gap__"))
        for s in range(start, end, MAX_PIECE):
            out.append((base + s, min(MAX_PIECE, end - s), name))
        pos = end
    if base + pos < size:
        out.append((base + pos, size - base - pos, "__tail__"))
    return out


def _payload_ranges(f, size: int) -> list[tuple[int, int, str]] | None:
    """(offset, length, label) of a .fpk whose payloads sit in one body (format v2), cut at its payloads, or None
    when the file is not one (then it is cut at its safetensors tensors).

    Never trusts the file: the format's own reader parses the header (every structural check, every rule and the
    reader's limits) from at most ``MAX_PIECE`` bytes, and the payloads must tile the file exactly (no digest:
    the assembled file is checked against the signed hash). Any failure means "cut it generically"."""
    f.seek(0)
    head = f.read(min(size, MAX_PIECE))
    try:
        layout = payload_layout(head, size)
    except (FreezepackError, ValueError, IndexError, KeyError, TypeError, OverflowError, RecursionError):
        return None         # not a file we understand (hostile, newer, or a header over MAX_PIECE): generic cut
    if layout is None:
        return None
    out = [(0, layout[0][1], HEADER_LABEL)]
    for off, length, key in layout[1:]:
        for s in range(0, length, MAX_PIECE):
            out.append((off + s, min(MAX_PIECE, length - s), key[:MAX_LABEL]))
    return out


def file_pieces(path: str | os.PathLike) -> list[Piece]:
    """The file's pieces in order, each hashed. Raises ``FormatError`` when it is not a safetensors layout."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n, header = read_safetensors_header(f, size, path)
        ranges = _payload_ranges(f, size) or _ranges(path, size, n, header)
        pieces = []
        for off, length, label in ranges:
            f.seek(off)
            data = f.read(length)
            pieces.append(Piece(off, length, hashlib.sha256(data).hexdigest(), label))
    return pieces


def layout_from_json(obj, *, path: str = "") -> list[tuple[str, int, str]]:
    """Validate a signed layout (list of [sha256, length, label]) before trusting its numbers."""
    if not isinstance(obj, list) or not obj:
        raise FormatError("release layout is not a non-empty list", path=path)
    if len(obj) > MAX_LAYOUT_PIECES:
        raise FormatError(f"release layout has {len(obj)} pieces, more than {MAX_LAYOUT_PIECES}", path=path)
    out = []
    for item in obj:
        if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                or not _HEX64.fullmatch(item[0]) or not isinstance(item[1], int) or isinstance(item[1], bool)
                or not 0 <= item[1] <= MAX_BLOB or not isinstance(item[2], str) or len(item[2]) > MAX_LABEL):
            raise FormatError(f"bad layout entry {_short(item)}", path=path)
        out.append((item[0].lower(), item[1], item[2]))
    return out


def _short(obj) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:200] + "..."


@dataclass
class DeltaPlan:
    """Which pieces of a new release a device must fetch, given the pieces it already holds."""

    need: dict[str, int]          # sha256 -> length, each once
    have: dict[str, int]          # sha256 -> length, reused locally
    full_bytes: int               # the whole new file

    @property
    def fetch_bytes(self) -> int:
        return sum(self.need.values())


def plan(layout: list[tuple[str, int, str]], available: set[str]) -> DeltaPlan:
    need: dict[str, int] = {}
    have: dict[str, int] = {}
    for sha, length, _ in layout:
        (have if sha in available else need)[sha] = length
    return DeltaPlan(need=need, have=have, full_bytes=sum(length for _, length, _ in layout))
