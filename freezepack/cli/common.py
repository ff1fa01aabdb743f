"""What every freezepack command shares: bad input ends as one line on stderr and exit status 1, never a traceback.

Exit statuses: 0 = done, 1 = the input was refused (bad file, failed verify, refused update), 2 = wrong usage
(click's convention).
"""
from __future__ import annotations

import functools
import sys

import click

from ..errors import FreezepackError


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
