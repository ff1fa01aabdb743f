"""Fleet distribution of models: signed releases (TUF), a directory / HTTP / OCI repository, delta updates,
atomic resumable installs. Needs the ``fleet`` extra (tuf, oras) only when used. Operator guide: docs/FLEET.md.

Publisher::

    pub = Publisher(open_store("repo/"), "keys/")
    root = pub.init()                         # pin these bytes on devices
    pub.load().publish("model.fpk", "detector")

Device::

    Device("/var/lib/models").install("http://repo.example/", "detector", root_file="root.json")
"""
from .delta import Piece, file_pieces
from .install import Device, InstallReport
from .repo import DirStore, HttpStore, Store, open_store
from .trust import KeyRing, Publisher, trusted_release

__all__ = ["Device", "InstallReport", "Publisher", "KeyRing", "trusted_release", "open_store", "Store",
           "DirStore", "HttpStore", "Piece", "file_pieces"]
