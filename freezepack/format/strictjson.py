"""Strict, bounded JSON: one canonical serialization, one parser that refuses what a file must not hold.

Canonical: sorted keys, no whitespace, non-ASCII escaped as \\uXXXX, no NaN/Infinity (one text per value, so a
digest of the text is a digest of the value). Parsing counts values and depth *before* building anything, refuses
duplicate keys, NaN/Infinity and lone surrogates; any failure is a FormatError naming the file.
"""
from __future__ import annotations

import json

import numpy as np

from ..errors import FormatError
from .model import DEFAULT_LIMITS, Limits, limit_error, short


def canonical_json(obj) -> str:
    """Sorted keys, no whitespace, non-ASCII escaped as \\uXXXX, no NaN/Infinity: one text per value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _json_values_bound(text: str, what: str, path, limits: Limits) -> None:
    """Refuse a text holding more JSON values than ``max_json_values`` *before* parsing it: a parsed value costs
    ~50-100 bytes of memory, its text as little as 2 ('{}'), so an unchecked header could cost ~40x its size."""
    structural = text.count("{") + text.count("[") + text.count(",")
    if structural < limits.max_json_values:
        return  # the common case: an upper bound already within the limit, no scan needed
    values = _values_outside_strings(text)
    if values > limits.max_json_values:
        raise limit_error(f"{what}: number of JSON values", values, "max_json_values", limits, path)


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
                raise limit_error(f"{what}: nesting depth", depth, "max_json_depth", limits, path)
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(k, str) and not valid_text(k):
                    raise FormatError(f"{what} holds a key with a lone surrogate {short(k)} (not valid Unicode)",
                                      path=path)
                if isinstance(x, (dict, list)):
                    stack.append((x, depth + 1))
                elif isinstance(x, str) and not valid_text(x):
                    raise FormatError(f"{what} holds a string with a lone surrogate {short(x)} (not valid "
                                      "Unicode)", path=path)


def valid_text(s: str) -> bool:
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
    if not valid_text(text):
        raise FormatError(f"{what} is not valid Unicode text", path=path)
    _json_values_bound(text, what, path, limits)
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_bad_constant)
    except RecursionError:
        raise limit_error(f"{what}: nesting depth", "too deep to parse", "max_json_depth", limits, path) from None
    except (ValueError, TypeError) as e:
        raise FormatError(f"{what} is not valid JSON: {str(e)[:200]}", path=path) from None
    _check_tree(value, what, path, limits)
    return value


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
HOLE = "\x00freezepack-hole\x00"


def is_canonical(value, text: str, pad: int = 0, hole: str | None = None, hole_key: str = "freezepack") -> bool:
    """``text == canonical_json(value) + up to ``pad`` spaces``, compared piece by piece (no full-size copy).

    ``hole``: a long string member of ``value`` that was replaced by :data:`HOLE`; its escaped form is compared
    in slices, so a 100 MB inner header is never escaped into one more 100 MB string.
    """
    pos = 0
    hole_chunk = json.encoder.encode_basestring_ascii(HOLE)
    key_chunk = json.encoder.encode_basestring_ascii(hole_key)
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
