"""One error hierarchy for everything freezepack refuses.

Every message names the file (when there is one), the tensor (when there is one) and the fact that is wrong,
so that a user never has to read a traceback from deep inside to learn what happened.
"""
from __future__ import annotations


class FreezepackError(Exception):
    """Base class of every error freezepack raises on bad input."""

    def __init__(self, message: str, *, path: object | None = None, tensor: str | None = None):
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.reason = message
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if tensor is not None:
            parts.append(f"tensor {tensor!r}")
        parts.append(message)
        super().__init__(": ".join(parts))


class SpecError(FreezepackError):
    """A generator or initializer spec is unknown, malformed or out of range."""


class FormatError(FreezepackError):
    """A file is not a valid .fpk: bad magic, version, header, layout or sizes."""


class IntegrityError(FreezepackError):
    """A digest does not match: the file was corrupted or regeneration is not bit-exact."""


class DataError(FreezepackError):
    """A data set file (IDX) is malformed."""


class FleetError(FreezepackError):
    """A fleet repository, release or install was refused."""


class UsageError(FreezepackError, ValueError):
    """An argument of a freezepack call or command is wrong (a bad device, option, type or range)."""


class MethodError(FreezepackError):
    """The FreezeNet method cannot be applied to this model as asked (scoring failed, a tensor cannot be frozen,
    a model is already frozen, a saved file would not reproduce the model in memory)."""
