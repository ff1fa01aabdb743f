"""Compatibility names: the publisher side now lives in ``publish``, the device side in ``client``."""
from .client import Counter, pin_root, trusted_release  # noqa: F401
from .names import check_model_name  # noqa: F401
from .publish import KeyRing, Publisher  # noqa: F401
from .release import DEFAULT_EXPIRY, ROLES, TARGET_SUFFIX, release_info  # noqa: F401
