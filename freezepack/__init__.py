"""freezepack: store and ship FreezeNets as seed + initializer + coded mask + trained values.

The package imports with its core dependencies only (torch, numpy); heavier parts load on first use.
"""
from .errors import (DataError, FleetError, FormatError, FreezepackError, IntegrityError, MethodError, SpecError,
                     UsageError)
from .format.rng import SPEC_VERSION

__version__ = "0.1.0"

__all__ = ["FreezepackError", "UsageError", "MethodError", "SpecError", "FormatError", "IntegrityError", "DataError", "FleetError",
           "SPEC_VERSION", "__version__"]

# The file API (freezepack.api) loads on first use, so `import freezepack` stays light.
_API = ("save", "load", "load_into", "load_freezenet", "open", "verify", "inspect", "convert")
__all__ += list(_API)


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'freezepack' has no attribute {name!r}")
