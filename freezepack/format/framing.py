"""The safetensors frame every .fpk has (both versions): an 8-byte little-endian header length N, N bytes of JSON
padded with spaces to a multiple of 8, then the tensor data. Also what a file that is not a .fpk probably is.
"""
from __future__ import annotations

import struct

from ..errors import FormatError
from .model import DEFAULT_LIMITS, MAX_HEADER_BYTES, Limits, limit_error

ALIGNMENT = 8


def frame(json_text: str) -> bytes:
    """The 8-byte prefix and the space-padded safetensors JSON header."""
    raw = json_text.encode("ascii")
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


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
            raise limit_error("header length", n, "max_header_bytes", limits or DEFAULT_LIMITS, path)
        raise FormatError(f"declares a {n}-byte header, over the cap of {MAX_HEADER_BYTES} bytes (not a .fpk "
                          "file)", path=path)
    if n < 2 or (8 + n) % ALIGNMENT:
        raise FormatError(f"header length {n} is not padded to a multiple of {ALIGNMENT}", path=path)
    return n
