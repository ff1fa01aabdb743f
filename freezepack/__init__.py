"""freezepack: store and ship FreezeNets as seed + initializer + coded mask + trained values.

``import freezepack`` brings the file API (it needs torch anyway); the fleet, the CLI and the experiments load only
when imported themselves.
"""
from ._version import __version__
from .api import FpkFile, convert, inspect, load, load_into, open, safe_open, save, verify  # noqa: A004
from .errors import DataError, FleetError, FormatError, FreezepackError, IntegrityError, SpecError, UsageError
from .format.rng import SPEC_VERSION

__all__ = ["save", "load", "load_into", "safe_open", "open", "FpkFile", "verify", "inspect", "convert",
           "FreezepackError", "UsageError", "SpecError", "FormatError", "IntegrityError", "DataError", "FleetError",
           "SPEC_VERSION", "__version__"]
