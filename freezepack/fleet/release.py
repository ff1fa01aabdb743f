"""What publisher and device share about a signed release: the TUF import, role names, the target naming and the
release record a target carries (``release_info``)."""
from __future__ import annotations

from datetime import timedelta

from ..errors import FleetError
from .delta import layout_from_json
from .names import ROLES, check_digest  # noqa: F401  (ROLES re-exported)

TARGET_SUFFIX = ".fpk"
DEFAULT_EXPIRY = {"root": timedelta(days=365), "targets": timedelta(days=90),
                  "snapshot": timedelta(days=7), "timestamp": timedelta(days=1)}
FORMATS = ("fpk", "safetensors")


def tuf_metadata():
    """python-tuf's Metadata API, or a FleetError saying which extra to install."""
    try:
        from securesystemslib.signer import CryptoSigner  # noqa: F401
        from tuf.api import metadata
    except ImportError:
        raise FleetError("fleet commands need the 'fleet' extra (pip install 'freezepack[fleet]')") from None
    return metadata


def release_info(tf) -> dict:
    """The signed facts of a target: release number, full length and digest, piece layout."""
    custom = tf.custom.get("freezepack") if isinstance(tf.custom, dict) else None
    release = custom.get("release") if isinstance(custom, dict) else None
    if not isinstance(custom, dict) or not isinstance(release, int) or isinstance(release, bool) \
            or not 0 <= release < 1 << 62:
        raise FleetError(f"target {tf.path!r} carries no valid freezepack release record")
    sha = tf.hashes.get("sha256")
    if not isinstance(sha, str):
        raise FleetError(f"target {tf.path!r} has no sha256 hash")
    check_digest(sha.lower())
    fmt = custom.get("format", "safetensors")
    if fmt not in FORMATS:
        raise FleetError(f"target {tf.path!r} has unknown format {fmt!r}")
    published = custom.get("published")
    return {"release": release, "length": tf.length, "sha256": sha.lower(),
            "layout": layout_from_json(custom.get("layout"), path=tf.path),
            "format": fmt, "published": published if isinstance(published, str) else None}
