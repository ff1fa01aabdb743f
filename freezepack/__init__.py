"""freezepack: store and ship FreezeNets as seed + initializer + coded mask + trained values.

``import freezepack`` brings the file API (it needs torch anyway); the fleet, the CLI and the experiments load only
when imported themselves.
"""
from ._version import __version__
from .api import FpkFile, inspect, load, load_freezenet, load_into, open, safe_open, save, verify  # noqa: A004
from .conversion import convert
from .errors import (
                  DataError,
                  DistributedError,
                  FleetError,
                  FormatError,
                  FreezepackError,
                  IntegrityError,
                  MethodError,
                  SpecError,
                  UsageError,
)
from .format.rng import SPEC_VERSION

__all__ = ["save", "load", "load_into", "load_freezenet", "safe_open", "open", "FpkFile", "verify", "inspect",
           "convert", "FreezepackError", "UsageError", "MethodError", "SpecError", "FormatError", "IntegrityError",
           "DataError", "FleetError", "DistributedError", "SPEC_VERSION", "__version__"]
