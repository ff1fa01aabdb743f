"""Validation of every name that comes from outside and becomes a file name, URL part or tag.

``re.fullmatch`` throughout: ``re.match(r"^...$")`` accepts a trailing newline (``$`` matches before it), and a
name like ``"det\\n"`` would then become a file name and an OCI tag.
"""
from __future__ import annotations

import re

from ..errors import FleetError

_MODEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_META_NAME = re.compile(r"(?:[1-9][0-9]{0,11}\.)?(?:root|timestamp|snapshot|targets)\.json")
ROLES = ("root", "targets", "snapshot", "timestamp")


def check_model_name(name) -> str:
    if not isinstance(name, str) or not _MODEL.fullmatch(name) or name.endswith(".prev"):
        raise FleetError(f"model name {name!r} must be 1-64 of a-z 0-9 . _ -, start with a letter or digit, "
                         f"and not end in '.prev' (it becomes a file name and an OCI tag)")
    return name


def check_digest(sha256) -> str:
    if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
        raise FleetError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


def check_meta_name(name) -> str:
    if not isinstance(name, str) or not _META_NAME.fullmatch(name):
        raise FleetError(f"not a TUF metadata file name: {name!r}")
    return name


def meta_role(name: str) -> str:
    """``3.targets.json`` -> ``targets``."""
    return check_meta_name(name).rsplit(".", 2)[-2]
