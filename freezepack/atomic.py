"""Crash-safe file writes: the one implementation is :mod:`freezepack.format.io`; this name stays for the fleet and
the CLI, which import it from here."""
from .format.io import (  # noqa: F401
    STALE_TEMP_AGE,
    TEMP_PREFIX,
    atomic_write,
    fsync_dir,
    is_own_temp,
    remove_stale_temps,
)
