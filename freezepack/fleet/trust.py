"""Signed releases with The Update Framework (python-tuf Metadata API on the publisher, ngclient on devices).

Roles (TUF spec): **root** lists the keys and thresholds of every role and is pinned on each device by a local
trusted root file; **targets** signs each model's full-file length + SHA-256 and its release number and piece
layout; **snapshot** pins the targets version (no mix-and-match); **timestamp** pins the snapshot version and
expires quickly (no freeze). Every version number only grows on a device (no rollback). Consistent snapshots are
on, so a repository can be updated while devices read it.

Keys are Ed25519 PEM files in a key directory (``<role>-<keyid[:16]>.pem``, mode 600). Which key signs which role
is decided by root metadata alone: a role is signed by every key in the directory that root lists for it.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from ..atomic import atomic_write
from ..errors import FleetError, IntegrityError
from .delta import layout_from_json
from .repo import Store

ROLES = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRY = {"root": timedelta(days=365), "targets": timedelta(days=90),
                  "snapshot": timedelta(days=7), "timestamp": timedelta(days=1)}
TARGET_SUFFIX = ".fpk"
_META_PREFIX = "fpk-store:/metadata/"   # ngclient builds URLs on it; our fetcher maps them to the store


def _tuf():
    try:
        from securesystemslib.signer import CryptoSigner  # noqa: F401
        from tuf.api import metadata
    except ImportError:
        raise FleetError("fleet commands need the 'fleet' extra (pip install 'freezepack[fleet]')") from None
    return metadata


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def check_model_name(name: str) -> str:
    import re

    if not isinstance(name, str) or not re.match(r"^[a-z0-9][a-z0-9._-]{0,63}$", name):
        raise FleetError(f"model name {name!r} must be 1-64 of a-z 0-9 . _ - (it becomes a file name and OCI tag)")
    return name


# ------------------------------------------------------------------------------------------------------ keys
class KeyRing:
    """A directory of Ed25519 private keys. Keep root's offline; snapshot/timestamp's live on the publisher."""

    def __init__(self, keys_dir: str | os.PathLike):
        self.dir = os.path.abspath(os.fspath(keys_dir))

    def create(self, role: str):
        _tuf()
        from securesystemslib.signer import CryptoSigner

        if role not in ROLES:
            raise FleetError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        signer = CryptoSigner.generate_ed25519()
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o700)
        path = os.path.join(self.dir, f"{role}-{signer.public_key.keyid[:16]}.pem")
        atomic_write(path, signer.private_bytes)
        os.chmod(path, 0o600)
        return signer

    def signers(self) -> dict:
        """keyid -> CryptoSigner for every key file in the directory."""
        _tuf()
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from securesystemslib.signer import CryptoSigner

        out = {}
        for path in sorted(glob.glob(os.path.join(self.dir, "*.pem"))):
            try:
                with open(path, "rb") as f:
                    signer = CryptoSigner(load_pem_private_key(f.read(), password=None))
            except (ValueError, TypeError) as e:
                raise FleetError(f"not an unencrypted PEM private key ({e})", path=path) from None
            out[signer.public_key.keyid] = signer
        return out

    def retire(self, keyid: str) -> None:
        """Rename a revoked key's file so it is never used again (kept for the audit trail)."""
        for path in glob.glob(os.path.join(self.dir, f"*-{keyid[:16]}.pem")):
            os.replace(path, path + ".revoked")


# ------------------------------------------------------------------------------------------------ publisher
class Publisher:
    """Writes signed metadata and blobs into a store. Load the current state with ``Publisher(store, keys)``."""

    def __init__(self, store: Store, keys_dir: str | os.PathLike):
        self.md = _tuf()
        self.store = store
        self.keys = KeyRing(keys_dir)
        self.root = self.targets = self.snapshot = self.timestamp = None

    # -- reading the repository's current state ----------------------------------------------------------------
    def _read(self, name: str):
        data = self.store.get_metadata(name, 5_000_000)
        if data is None:
            return None
        try:
            return self.md.Metadata.from_bytes(data)
        except Exception as e:
            raise FleetError(f"cannot parse repository metadata {name} ({e})", path=self.store.location) from None

    def load(self) -> Publisher:
        v, root = 1, None
        while (nxt := self._read(f"{v}.root.json")) is not None:
            root, v = nxt, v + 1
        if root is None:
            raise FleetError("no fleet repository here (1.root.json missing): run 'freezepack fleet init' first",
                             path=self.store.location)
        self.root = root
        incomplete = FleetError("repository metadata is incomplete (timestamp, snapshot or targets missing)",
                                path=self.store.location)
        self.timestamp = self._read("timestamp.json")
        if self.timestamp is None:
            raise incomplete
        self.snapshot = self._read(f"{self.timestamp.signed.snapshot_meta.version}.snapshot.json")
        if self.snapshot is None or "targets.json" not in self.snapshot.signed.meta:
            raise incomplete
        self.targets = self._read(f"{self.snapshot.signed.meta['targets.json'].version}.targets.json")
        if self.targets is None:
            raise incomplete
        return self

    # -- signing ------------------------------------------------------------------------------------------------
    def _sign(self, md, role: str, extra_roots=()) -> None:
        signers = self.keys.signers()
        roots = [self.root.signed] + list(extra_roots)
        keyids = set()
        for r in roots:
            keyids |= set(r.roles[role].keyids)
        md.signatures.clear()
        used = [signers[k] for k in sorted(keyids) if k in signers]
        for r in roots:
            have = len(set(r.roles[role].keyids) & set(signers))
            if have < r.roles[role].threshold:
                raise FleetError(f"role {role!r} needs {r.roles[role].threshold} signature(s), this key "
                                 f"directory holds {have} of its keys", path=self.keys.dir)
        for s in used:
            md.sign(s, append=True)

    def _bytes(self, md) -> bytes:
        from tuf.api.serialization.json import JSONSerializer

        return md.to_bytes(JSONSerializer(compact=False))

    def _commit(self, *, targets: bool, snapshot: bool, expiry: dict, bump: int = 1) -> None:
        """Bump and re-sign targets -> snapshot -> timestamp (writing in that order keeps readers consistent)."""
        now = _now()
        if targets:
            t = self.targets.signed
            t.version += bump
            t.expires = now + expiry.get("targets", DEFAULT_EXPIRY["targets"])
            self._sign(self.targets, "targets")
            self.store.put_metadata(f"{t.version}.targets.json", self._bytes(self.targets))
        if snapshot or targets:
            s = self.snapshot.signed
            s.meta["targets.json"] = self.md.MetaFile(version=self.targets.signed.version)
            s.version += bump
            s.expires = now + expiry.get("snapshot", DEFAULT_EXPIRY["snapshot"])
            self._sign(self.snapshot, "snapshot")
            self.store.put_metadata(f"{s.version}.snapshot.json", self._bytes(self.snapshot))
        ts = self.timestamp.signed
        ts.snapshot_meta = self.md.MetaFile(version=self.snapshot.signed.version)
        ts.version += bump
        ts.expires = now + expiry.get("timestamp", DEFAULT_EXPIRY["timestamp"])
        self._sign(self.timestamp, "timestamp")
        self.store.put_metadata("timestamp.json", self._bytes(self.timestamp))

    # -- operations -----------------------------------------------------------------------------------------------
    def init(self, *, thresholds: dict | None = None, expiry: dict | None = None) -> bytes:
        """Create keys (threshold-many per role, unless the key directory already has them) and version-1
        metadata. Returns the root file bytes to pin on devices."""
        md = self.md
        if self.store.get_metadata("1.root.json", 5_000_000) is not None:
            raise FleetError("a fleet repository already exists here", path=self.store.location)
        thresholds = {r: 1 for r in ROLES} | (thresholds or {})
        expiry = expiry or {}
        now = _now()
        existing = self.keys.signers()
        root = md.Root(expires=now + expiry.get("root", DEFAULT_EXPIRY["root"]), consistent_snapshot=True)
        for role in ROLES:
            root.roles[role].threshold = int(thresholds[role])
            have = [s for kid, s in existing.items()
                    if os.path.exists(os.path.join(self.keys.dir, f"{role}-{kid[:16]}.pem"))]
            while len(have) < thresholds[role]:
                have.append(self.keys.create(role))
            for s in have:
                root.add_key(s.public_key, role)
        self.root = md.Metadata(root)
        self.targets = md.Metadata(md.Targets(version=1, expires=now))
        self.snapshot = md.Metadata(md.Snapshot(version=1, expires=now))
        self.timestamp = md.Metadata(md.Timestamp(version=1, expires=now))
        self._sign(self.root, "root")
        root_bytes = self._bytes(self.root)
        self.store.put_metadata("1.root.json", root_bytes)
        self._commit(targets=True, snapshot=True, expiry=expiry, bump=0)
        return root_bytes

    def latest(self, name: str):
        tf = self.targets.signed.targets.get(check_model_name(name) + TARGET_SUFFIX)
        return None if tf is None else release_info(tf)

    def publish(self, model_path: str | os.PathLike, name: str, *, release: int | None = None,
                expiry: dict | None = None, progress=None) -> dict:
        """Upload the file's pieces (only those the store lacks) and sign it as the model's newest release.
        ``progress(done_bytes, total_bytes)`` is called as pieces are stored."""
        import hashlib

        from .delta import file_pieces
        from .install import detect_format, verify_model_file

        name = check_model_name(name)
        model_path = os.fspath(model_path)
        pieces = file_pieces(model_path)
        fmt = detect_format(model_path)
        verify_model_file(model_path, fmt)   # never sign a model that does not verify
        prev = self.latest(name)
        if release is None:
            release = 1 if prev is None else prev["release"] + 1
        if prev is not None and release <= prev["release"]:
            raise FleetError(f"release {release} is not newer than the published release {prev['release']} "
                             f"(devices refuse rollbacks)", path=model_path)
        full = hashlib.sha256()
        uploaded = done = 0
        size = pieces[-1].offset + pieces[-1].length
        with open(model_path, "rb") as f:
            for p in pieces:
                f.seek(p.offset)
                data = f.read(p.length)
                full.update(data)
                if not self.store.has_blob(p.sha256):
                    self.store.put_blob(data)
                    uploaded += len(data)
                done += len(data)
                if progress:
                    progress(done, size)
        layout = [p.to_json() for p in pieces]
        custom = {"freezepack": {"release": int(release), "format": fmt, "layout": layout,
                                 "published": _now().isoformat().replace("+00:00", "Z")}}
        path = name + TARGET_SUFFIX
        self.targets.signed.targets[path] = self.md.TargetFile(
            size, {"sha256": full.hexdigest()}, path, unrecognized_fields={"custom": custom})
        self.store.publish_release(name, release, layout, {"name": name, "release": release,
                                                           "sha256": full.hexdigest(), "length": size})
        self._commit(targets=True, snapshot=True, expiry=expiry or {})
        return {"name": name, "release": release, "sha256": full.hexdigest(), "length": size,
                "format": fmt, "pieces": len(pieces), "uploaded_bytes": uploaded,
                "targets_version": self.targets.signed.version}

    def refresh_timestamp(self, *, expiry: dict | None = None, snapshot: bool = False,
                          targets: bool = False) -> int:
        """Re-sign timestamp (and snapshot, targets) with a fresh expiry: run it from cron with the online
        keys; ``targets`` needs the targets key (for a repository with no release for a long time)."""
        self._commit(targets=targets, snapshot=snapshot, expiry=expiry or {})
        return self.timestamp.signed.version

    def rotate(self, role: str, *, revoke: list[str] | None = None, add: int = 1,
               expiry: dict | None = None) -> dict:
        """New root version: ``add`` fresh keys for ``role``, the ``revoke`` key ids removed. Signed by the old
        and the new root keys (TUF root chaining), then the affected online metadata is re-signed at once so
        devices never see metadata signed only by a revoked key."""
        import copy

        if role not in ROLES:
            raise FleetError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        old_root = copy.deepcopy(self.root.signed)
        r = self.root.signed
        revoked = []
        for kid in revoke or []:
            matches = [k for k in r.roles[role].keyids if k.startswith(kid)]
            if len(matches) != 1:
                raise FleetError(f"key id {kid!r} matches {len(matches)} keys of role {role!r}")
            revoked.append(matches[0])
        if len(r.roles[role].keyids) - len(set(revoked)) + add < r.roles[role].threshold:
            raise FleetError(f"role {role!r} would keep fewer keys than its threshold {r.roles[role].threshold}")
        new_keys = [self.keys.create(role) for _ in range(add)]
        for s in new_keys:
            r.add_key(s.public_key, role)
        for kid in set(revoked):
            r.revoke_key(kid, role)
        r.version += 1
        r.expires = _now() + (expiry or {}).get("root", DEFAULT_EXPIRY["root"])
        # signed by the old root's keys (devices trust them now) and the new root's (devices trust them next)
        self._sign(self.root, "root", extra_roots=[old_root])
        self.store.put_metadata(f"{r.version}.root.json", self._bytes(self.root))
        for kid in set(revoked):
            if not any(kid in r.roles[other].keyids for other in ROLES):   # a key may serve several roles
                self.keys.retire(kid)
        if role != "root":
            self._commit(targets=role == "targets", snapshot=role == "snapshot", expiry=expiry or {})
        return {"role": role, "root_version": r.version, "added": [s.public_key.keyid for s in new_keys],
                "revoked": sorted(set(revoked))}

    def describe(self) -> dict:
        r = self.root.signed
        return {
            "location": self.store.location,
            "root_version": r.version,
            "roles": {role: {"threshold": r.roles[role].threshold, "keyids": list(r.roles[role].keyids),
                             "expires": (self.root if role == "root" else getattr(self, role)).signed.expires
                             .isoformat()} for role in ROLES},
            "models": {tf.path[:-len(TARGET_SUFFIX)]: release_info(tf)
                       for tf in self.targets.signed.targets.values()},
        }


def release_info(tf) -> dict:
    """The signed facts of a target: release number, full length and digest, piece layout."""
    custom = tf.custom.get("freezepack") if isinstance(tf.custom, dict) else None
    if not isinstance(custom, dict) or not isinstance(custom.get("release"), int):
        raise FleetError(f"target {tf.path!r} carries no freezepack release record")
    sha = tf.hashes.get("sha256")
    if not isinstance(sha, str):
        raise FleetError(f"target {tf.path!r} has no sha256 hash")
    return {"release": custom["release"], "length": tf.length, "sha256": sha,
            "layout": layout_from_json(custom.get("layout"), path=tf.path),
            "format": custom.get("format", "safetensors"), "published": custom.get("published")}


# --------------------------------------------------------------------------------------------------- device
@dataclass
class Counter:
    metadata_bytes: int = 0
    blob_bytes: int = 0
    requests: int = 0
    files: list = field(default_factory=list)


def _fetcher(store: Store, counter: Counter):
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient import FetcherInterface

    class StoreFetcher(FetcherInterface):
        def _fetch(self, url):
            name = url[len(_META_PREFIX):]
            counter.requests += 1
            data = store.get_metadata(name, 5_000_000)
            if data is None:
                raise DownloadHTTPError(f"{name} not found", 404)
            counter.metadata_bytes += len(data)
            return iter([data])

    return StoreFetcher()


def pin_root(metadata_dir: str, root_file: str | os.PathLike | None) -> None:
    """Install the operator's root file as the device's trust anchor (first use only: later roots come
    through TUF's signed root chain)."""
    os.makedirs(metadata_dir, exist_ok=True)
    local = os.path.join(metadata_dir, "root.json")
    if os.path.exists(local):
        return
    if root_file is None:
        raise FleetError("no trusted root pinned on this device: pass --root ROOT.json (the file "
                         "'freezepack fleet init' wrote)", path=metadata_dir)
    with open(root_file, "rb") as f:
        data = f.read(1 << 20)
    try:
        root = json.loads(data)
        assert root["signed"]["_type"] == "root"
    except Exception:
        raise FleetError("not a TUF root metadata file", path=root_file) from None
    atomic_write(local, data)


def trusted_release(store: Store, metadata_dir: str, name: str, *, root_file=None,
                    counter: Counter | None = None) -> dict:
    """Refresh TUF metadata from the store (root chain, timestamp, snapshot, targets, each checked for
    signatures, thresholds, versions, expiry and hashes) and return the model's signed release facts."""
    _tuf()
    from tuf.api import exceptions as tx
    from tuf.ngclient import Updater, UpdaterConfig

    name = check_model_name(name)
    counter = counter or Counter()
    pin_root(metadata_dir, root_file)
    where = store.location
    try:
        updater = Updater(metadata_dir, _META_PREFIX, fetcher=_fetcher(store, counter),
                          config=UpdaterConfig(), bootstrap=None)
        updater.refresh()
        tf = updater.get_targetinfo(name + TARGET_SUFFIX)
    except tx.ExpiredMetadataError as e:
        raise FleetError(f"refused: metadata has expired ({e}); the repository is stale or an attacker is "
                         "replaying old metadata (freeze attack)", path=where) from None
    except tx.BadVersionNumberError as e:
        raise FleetError(f"refused: metadata version went backwards ({e}): rollback attack", path=where) from None
    except tx.UnsignedMetadataError as e:
        raise FleetError(f"refused: signature check failed ({e}): signed by the wrong key, below threshold, "
                         "or tampered", path=where) from None
    except tx.LengthOrHashMismatchError as e:
        raise IntegrityError(f"refused: metadata does not match what its parent role signed ({e}): "
                             "tampered or mixed from different releases", path=where) from None
    except tx.DownloadError as e:
        cause = e.__cause__ or e.__context__      # ngclient hides why: a FleetError of the store says it
        raise FleetError(f"cannot download metadata: {getattr(cause, 'reason', None) or e}", path=where) from None
    except tx.RepositoryError as e:
        raise FleetError(f"refused: bad repository metadata ({type(e).__name__}: {e})", path=where) from None
    except ValueError as e:   # deserialization and schema errors of tampered files
        raise FleetError(f"refused: malformed metadata ({type(e).__name__}: {e})", path=where) from None
    if tf is None:
        raise FleetError(f"the repository has no model {name!r}", path=where)
    info = release_info(tf)
    if sum(length for _, length, _ in info["layout"]) != info["length"]:
        raise IntegrityError("signed layout does not add up to the signed file length", path=where)
    return info
