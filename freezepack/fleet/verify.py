"""Model-level checks shared by the publisher (never sign a model that does not verify) and the device (never
install one): which format a file is, and whether it verifies."""
from __future__ import annotations

import os
import struct

from ..errors import FreezepackError, IntegrityError
from .delta import file_pieces, read_safetensors_header


def verify_model_file(path: str, fmt: str | None) -> None:
    """``freezepack.api.verify`` for .fpk releases, a full safetensors layout check otherwise."""
    if fmt == "fpk":
        from .. import api

        try:
            report = api.verify(path)
        except FreezepackError:
            raise
        except (OSError, ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error,
                RuntimeError) as e:
            # the container reader's own refusals are FreezepackErrors; anything else it lets through is
            # still a file that does not verify, said in one line
            raise IntegrityError(f"model does not verify ({type(e).__name__}: {e})", path=path) from None
        if not report.get("ok"):
            bad = [f"{t['name']}: {t.get('error')}" for t in report.get("tensors", []) if not t.get("ok")]
            raise IntegrityError("model does not verify: " + "; ".join(bad[:5]), path=path)
        return
    file_pieces(path)   # header and every tensor's byte range must be valid


def detect_format(path: str) -> str:
    """'fpk' when the safetensors header carries freezepack metadata, else 'safetensors'."""
    with open(path, "rb") as f:
        _, header = read_safetensors_header(f, os.fstat(f.fileno()).st_size, path)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return "fpk" if isinstance(meta, dict) and "freezepack" in meta else "safetensors"
