"""What every freezepack command shares: one-line errors, KEY=VALUE options, progress bars.

Exit statuses: 0 = done, 1 = the input was refused (bad file, failed verify, refused update), 2 = wrong usage
(click's convention).
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from ..errors import FreezepackError


def printable(text: object) -> str:
    """``text`` safe for a terminal: control and format characters (ESC, C1 controls such as CSI U+009B, bidi
    overrides, ...) and the backslash become Python-style escapes (``\\x1b``, ``\\u202e``, ``\\\\``); printable text,
    non-ASCII included, stays as it is. Names and metadata come from files: a 200-byte file must not be able to
    clear the screen or retitle the window (``--json`` escapes the same characters as JSON)."""
    out = []
    for c in str(text):
        if c.isprintable() and c != "\\":
            out.append(c)
        elif c == "\\":
            out.append("\\\\")
        else:
            o = ord(c)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


class FilePath(click.Path):
    """click.Path that refuses a NUL byte before touching the file system: os.stat would raise a foreign
    ValueError ("embedded null byte") from inside click's own check."""

    def convert(self, value, param, ctx):
        if isinstance(value, (str, os.PathLike)) and "\0" in str(os.fspath(value)):
            self.fail(f"{value!r} holds a NUL byte, which no path can contain", param, ctx)
        return super().convert(value, param, ctx)


def one_line_errors(fn):
    """Turn a FreezepackError (or an unreadable path) into ``error: <file>: <tensor>: <reason>`` and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FreezepackError as e:
            message = str(e)
        except OSError as e:
            message = f"{e.filename or ''}: {e.strerror or e}"
        click.echo(f"error: {message}", err=True)
        sys.exit(1)

    return wrapper


def parse_pairs(pairs: Iterable[str], *, option: str | None = None, form: str = "KEY=VALUE",
                keys: Iterable[str] | None = None, convert: Callable[[str], object] = str) -> dict:
    """``["a=1", "b=x=y"]`` -> ``{"a": convert("1"), "b": convert("x=y")}`` (split at the first ``=``).

    A pair without ``=``, a key outside ``keys`` (when given) or a value ``convert`` rejects with ValueError is a
    usage error (exit status 2) naming ``option`` when given.
    """
    allowed = None if keys is None else tuple(keys)
    out = {}
    for p in pairs:
        key, eq, value = p.partition("=")
        if not eq or not key or (allowed is not None and key not in allowed):
            choice = "" if allowed is None else f" with {form.split('=')[0]} one of {', '.join(allowed)}"
            raise click.BadParameter(f"{p!r} is not {form}{choice}", param_hint=option)
        try:
            out[key] = convert(value)
        except ValueError:
            raise click.BadParameter(f"{p!r}: {value!r} is not a valid value", param_hint=option) from None
    return out


class ProgressBar:
    """A click progress bar on stderr, fed by ``progress(done, total)`` callbacks and created on the first one.

    ``show=None``: only when stderr is a terminal. A hidden bar is still a valid (silent) callback. Use it as a
    context manager or call :meth:`close`.
    """

    def __init__(self, label: str, show: bool | None = None, *, show_pos: bool = False):
        self.label, self.show_pos, self.done = label, show_pos, 0
        self.bar: Any = None  # a click progress bar once shown
        self.show = sys.stderr.isatty() if show is None else show

    def __call__(self, done: int, total: int) -> None:
        if not self.show:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=max(total, 1), label=self.label, file=sys.stderr,
                                         show_pos=self.show_pos)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
