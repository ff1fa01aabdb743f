"""Strict, bounded JSON: one canonical serialization, one parser that refuses what a file must not hold.

Canonical: sorted keys, no whitespace, non-ASCII escaped as \\uXXXX, no NaN/Infinity (one text per value, so a
digest of the text is a digest of the value). Parsing counts values and depth *before* building anything, refuses
duplicate keys, NaN/Infinity and lone surrogates; any failure is a FormatError naming the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

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
    values = scan_text(text).values
    if values > limits.max_json_values:
        raise limit_error(f"{what}: number of JSON values", values, "max_json_values", limits, path)


@dataclass
class JsonShape:
    """What a bounded scan of a JSON text found outside its strings, before any parsing."""

    depth: int = 0           # deepest nesting of objects/arrays
    containers: int = 0      # '{' and '['
    commas: int = 0
    colons: int = 0
    unbalanced: bool = False  # a bracket closed below depth 0
    open_string: bool = False  # the text ends inside a string

    @property
    def values(self) -> int:
        """An upper bound on the values of a valid text (keys not counted): 1 + containers + commas."""
        return 1 + self.containers + self.commas


_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE = np.zeros(256, np.int8)
_CLOSE[[ord("]"), ord("}")]] = 1
_WINDOW = 1 << 16  # scan window: a few MB of numpy temporaries whatever the input's size


class _Scanner:
    """Quotes not escaped by an odd run of backslashes open and close strings; brackets, commas and colons outside
    strings give the nesting depth and the counts. Fed in windows (any cut: the state crosses them), vectorised,
    so memory stays a few MB whatever the text's size. Used by the format's parser and by freezepack.fleet."""

    def __init__(self) -> None:
        self.shape = JsonShape()
        self._level = 0
        self._run = 0      # backslashes ending the previous window
        self._inside = 0   # 1 when the previous window ended inside a string

    def feed(self, data) -> None:
        arr = np.frombuffer(data, np.uint8)
        for i in range(0, len(arr), _WINDOW):
            self._window(arr[i:i + _WINDOW])

    def _window(self, seg: np.ndarray) -> None:
        n, sh = len(seg), self.shape
        if not n:
            return
        bs = seg == _BACKSLASH
        pos = np.arange(n, dtype=np.int64)
        last_plain = np.maximum.accumulate(np.where(bs, -1, pos))     # last non-backslash at or before j
        before = np.empty(n, np.int64)                                # backslashes just before j
        before[0] = self._run
        prev = last_plain[:-1]
        before[1:] = np.where(prev < 0, pos[1:] + self._run, pos[:-1] - prev)
        quote = (seg == _QUOTE) & (before % 2 == 0)
        parity = (np.cumsum(quote, dtype=np.int64) + self._inside) % 2  # 1 inside a string (and on its opening quote)
        outside = parity == 0
        step = (_OPEN[seg].astype(np.int32) - _CLOSE[seg]) * outside
        level = np.cumsum(step) + self._level
        sh.depth = max(sh.depth, int(level.max()))
        sh.unbalanced = sh.unbalanced or int(level.min()) < 0
        self._level = int(level[-1])
        sh.containers += int(np.count_nonzero(_OPEN[seg].astype(bool) & outside))
        sh.commas += int(np.count_nonzero((seg == ord(",")) & outside))
        sh.colons += int(np.count_nonzero((seg == ord(":")) & outside))
        self._run = self._run + n if last_plain[-1] < 0 else n - 1 - int(last_plain[-1])
        self._inside = int(parity[-1])
        sh.open_string = bool(self._inside)


def scan(data: bytes | bytearray | memoryview) -> JsonShape:
    """The :class:`JsonShape` of a JSON text given as bytes, in bounded memory."""
    s = _Scanner()
    s.feed(data)
    return s.shape


def scan_text(text: str, step: int = _WINDOW) -> JsonShape:
    """The :class:`JsonShape` of a JSON text given as str, encoded ``step`` characters at a time (a UTF-8 sequence
    never holds a quote, backslash, bracket, comma or colon byte, so any cut is safe)."""
    s = _Scanner()
    for i in range(0, len(text), step):
        s.feed(text[i:i + step].encode("utf-8", "surrogatepass"))
    return s.shape


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
            if hole_here and hole is not None:  # only as the value of __metadata__.freezepack, never a key or string
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
