"""One way to write a .fpk, whatever its version: the header (model) and its parts -> the file's byte chunks."""
from __future__ import annotations

from ..errors import UsageError
from .model import VERSIONS, Header, Parts
from .v1 import writer as v1_writer
from .v2 import writer as v2_writer

DEFAULT_VERSION = 2  # the format save() writes (spec/FORMAT.md §12; 1: §1-11)


def encode_file(h: Header, parts: Parts, version: int | None = None, threads: int | None = None) -> list[bytes]:
    """Byte chunks of the file (deterministic: same header and parts -> same bytes, for any ``threads``: the v2
    writer codes tensors at once); ``version`` default :data:`DEFAULT_VERSION`. ``parts``: see
    :data:`freezepack.format.model.Parts`."""
    version = DEFAULT_VERSION if version is None else version
    if version not in VERSIONS:
        raise UsageError(f"format version must be 1 or 2, got {version!r}")
    if version == 1:
        return v1_writer.encode_file(h, parts)
    return v2_writer.encode_file(h, parts, threads)
