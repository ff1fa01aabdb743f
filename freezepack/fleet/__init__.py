"""Fleet distribution of models: signed releases (TUF), a directory / HTTP / OCI repository, delta updates,
atomic resumable installs. Needs the ``fleet`` extra (tuf, oras) only when used. Operator guide: docs/FLEET.md.

Publisher::

    pub = Publisher(open_store("repo/"), "keys/")
    root = pub.init()                         # pin these bytes on devices
    pub.load().publish("model.fpk", "detector")

Device::

    Device("/var/lib/models").install("http://repo.example/", "detector", root_file="root.json")

Modules: ``publish`` (keys, signing), ``client`` (device-side TUF refresh), ``install`` (the device directory),
``store``/``repo``/``oci`` (back ends), ``net`` (timeouts, rate and byte limits), ``safejson`` (bounded JSON),
``delta`` (pieces), ``verify`` (model checks), ``names`` (validation).
"""
from .client import trusted_release
from .delta import Piece, file_pieces
from .install import Device, InstallReport
from .net import NetLimits
from .publish import KeyRing, Publisher
from .repo import DirStore, HttpStore, open_store
from .store import Store

__all__ = ["Device", "InstallReport", "Publisher", "KeyRing", "trusted_release", "open_store", "Store",
           "DirStore", "HttpStore", "Piece", "file_pieces", "NetLimits"]
