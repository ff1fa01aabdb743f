"""Publisher side of trust: signing keys and signed releases with The Update Framework (python-tuf Metadata API).

Roles (TUF spec): **root** lists the keys and thresholds of every role and is pinned on each device by a local
trusted root file; **targets** signs each model's full-file length + SHA-256 and its release number and piece
layout; **snapshot** pins the targets version (no mix-and-match); **timestamp** pins the snapshot version and
expires quickly (no freeze). Every version number only grows on a device (no rollback). Consistent snapshots are
on, so a repository can be updated while devices read it. The device side is ``client``.

Keys are Ed25519 PEM files in a key directory (``<role>-<keyid[:16]>.pem``, mode 600). Which key signs which role
is decided by root metadata alone: a role is signed by every key in the directory that root lists for it.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import os
import re
from datetime import datetime, timezone
from typing import Any

from ..atomic import atomic_write
from ..errors import FleetError
from . import safejson
from .delta import file_pieces, layout_from_json
from .names import check_model_name, meta_role
from .release import DEFAULT_EXPIRY, ROLES, TARGET_SUFFIX, release_info, tuf_metadata
from .store import Store
from .verify import detect_format, verify_model_file


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


# ------------------------------------------------------------------------------------------------------ keys
class KeyRing:
    """A directory of Ed25519 private keys. Keep root's offline; snapshot/timestamp's live on the publisher."""

    def __init__(self, keys_dir: str | os.PathLike):
        self.dir = os.path.abspath(os.fspath(keys_dir))

    def create(self, role: str):
        tuf_metadata()
        from securesystemslib.signer import CryptoSigner

        if role not in ROLES:
            raise FleetError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        signer = CryptoSigner.generate_ed25519()
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o700)
        path = os.path.join(self.dir, f"{role}-{signer.public_key.keyid[:16]}.pem")
        # a secret: owner-only whatever the umask
        atomic_write(path, signer.private_bytes, mode=0o600, make_parents=True)
        return signer

    def signers(self) -> dict:
        """keyid -> CryptoSigner for every key file in the directory."""
        tuf_metadata()
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from securesystemslib.signer import CryptoSigner

        out = {}
        for path in sorted(glob.glob(os.path.join(self.dir, "*.pem"))):
            try:
                with open(path, "rb") as f:
                    signer = CryptoSigner(load_pem_private_key(f.read(1 << 20), password=None))
            except (ValueError, TypeError) as e:
                raise FleetError(f"not an unencrypted PEM private key ({e})", path=path) from None
            out[signer.public_key.keyid] = signer
        return out

    def retire(self, keyid: str) -> None:
        """Rename a revoked key's file so it is never used again (kept for the audit trail)."""
        if not re.fullmatch(r"[0-9a-f]{16,64}", keyid):     # it becomes a glob pattern: hex only
            raise FleetError(f"not a key id: {keyid!r}")
        for path in glob.glob(os.path.join(self.dir, f"*-{keyid[:16]}.pem")):
            os.replace(path, path + ".revoked")


# ------------------------------------------------------------------------------------------------ publisher
class Publisher:
    """Writes signed metadata and blobs into a store. Load the current state with ``Publisher(store, keys)``."""

    def __init__(self, store: Store, keys_dir: str | os.PathLike):
        self.md = tuf_metadata()
        self.store = store
        self.keys = KeyRing(keys_dir)
        # tuf Metadata objects once loaded (python-tuf is an optional extra: typed loosely)
        self.root: Any = None
        self.targets: Any = None
        self.snapshot: Any = None
        self.timestamp: Any = None

    # -- reading the repository's current state ----------------------------------------------------------------
    def _read(self, name: str):
        limits = safejson.TUF_LIMITS[meta_role(name)]
        data = self.store.get_metadata(name, limits.max_bytes)
        if data is None:
            return None
        safejson.check_structure(data, limits, what=f"repository metadata {name}", path=self.store.location)
        try:
            return self.md.Metadata.from_bytes(data)
        except (ValueError, KeyError, TypeError, AttributeError) as e:   # python-tuf's parse/schema errors
            raise FleetError(f"cannot parse repository metadata {name} ({type(e).__name__}: {e})",
                             path=self.store.location) from None

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

    def _checked(self, md, role: str) -> bytes:
        """The metadata's bytes, refused here if devices would refuse them (their size and structure limits)."""
        data = self._bytes(md)
        safejson.check_structure(data, safejson.TUF_LIMITS[role], what=f"{role} metadata to publish (too large "
                                 f"for devices: publish fewer models per repository)", path=self.store.location)
        return data

    def _commit(self, *, targets: bool, snapshot: bool, expiry: dict, bump: int = 1) -> None:
        """Bump and re-sign targets -> snapshot -> timestamp (writing in that order keeps readers consistent)."""
        now = _now()
        if targets:
            t = self.targets.signed
            t.version += bump
            t.expires = now + expiry.get("targets", DEFAULT_EXPIRY["targets"])
            self._sign(self.targets, "targets")
            self.store.put_metadata(f"{t.version}.targets.json", self._checked(self.targets, "targets"))
        if snapshot or targets:
            s = self.snapshot.signed
            s.meta["targets.json"] = self.md.MetaFile(version=self.targets.signed.version)
            s.version += bump
            s.expires = now + expiry.get("snapshot", DEFAULT_EXPIRY["snapshot"])
            self._sign(self.snapshot, "snapshot")
            self.store.put_metadata(f"{s.version}.snapshot.json", self._checked(self.snapshot, "snapshot"))
        ts = self.timestamp.signed
        ts.snapshot_meta = self.md.MetaFile(version=self.snapshot.signed.version)
        ts.version += bump
        ts.expires = now + expiry.get("timestamp", DEFAULT_EXPIRY["timestamp"])
        self._sign(self.timestamp, "timestamp")
        self.store.put_metadata("timestamp.json", self._checked(self.timestamp, "timestamp"))

    # -- operations -----------------------------------------------------------------------------------------------
    def init(self, *, thresholds: dict | None = None, expiry: dict | None = None) -> bytes:
        """Create keys (threshold-many per role, unless the key directory already has them) and version-1
        metadata. Returns the root file bytes to pin on devices."""
        md = self.md
        if self.store.get_metadata("1.root.json", safejson.TUF_LIMITS["root"].max_bytes) is not None:
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
        root_bytes = self._checked(self.root, "root")
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
        layout_from_json(layout, path=model_path)     # never sign a layout that devices would refuse
        custom = {"freezepack": {"release": int(release), "format": fmt, "layout": layout,
                                 "published": _now().isoformat().replace("+00:00", "Z")}}
        path = name + TARGET_SUFFIX
        self.targets.signed.targets[path] = self.md.TargetFile(
            size, {"sha256": full.hexdigest()}, path, unrecognized_fields={"custom": custom})
        self.store.publish_release(name, release, layout, {"name": name, "release": release,
                                                           "sha256": full.hexdigest(), "length": size})
        self._commit(targets=True, snapshot=True, expiry=expiry or {})
        return {"name": name, "release": release, "sha256": full.hexdigest(), "length": size, "format": fmt,
                "pieces": len(pieces), "uploaded_bytes": uploaded,
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
        self.store.put_metadata(f"{r.version}.root.json", self._checked(self.root, "root"))
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
