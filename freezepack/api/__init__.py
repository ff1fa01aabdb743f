"""save / load / load_into / load_freezenet / safe_open / verify / inspect: the .fpk files as a user sees them.

Composes the layers below through the format's version-neutral interface (freezepack.format: ``reader.open_file``
and ``writer.encode_file``, the typed entries of ``model``): ``init`` regenerates frozen values straight on the
target device, the reader hands out each entry's mask positions and values, already checked.

    saving       save, encode_record: a model or FreezeRecord -> bytes, proven before publishing
    loading      load, load_into, load_freezenet, safe_open / open / FpkFile
    checking     verify, inspect
    materialize  one dense tensor from an open file (shared by the above)
    matching     which module tensor each file tensor fills
"""
from ..format.dense import digest, tensor_bytes
from ..format.dtypes import DTYPE_NAMES, TORCH_DTYPES
from ..format.model import DEFAULT_LIMITS, Entry, Header, Limits
from ..format.reader import FpkReader
from ..format.writer import DEFAULT_VERSION
from .checking import VALUES_KEY, inspect, verify
from .loading import FpkFile, load, load_freezenet, load_into, open, safe_open  # noqa: A004
from .materialize import Device, PathLike, Progress
from .saving import encode_record, save

__all__ = ["save", "encode_record", "load", "load_into", "load_freezenet", "safe_open", "open", "FpkFile", "verify",
           "inspect", "tensor_bytes", "digest", "TORCH_DTYPES", "DTYPE_NAMES", "DEFAULT_VERSION", "VALUES_KEY",
           "DEFAULT_LIMITS", "Limits", "Entry", "Header", "FpkReader", "PathLike", "Device", "Progress"]
