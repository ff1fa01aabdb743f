"""Device side: fetch a signed release, rebuild it from local pieces + downloaded ones, install it atomically.

Device directory::

    <dir>/<model>.fpk              the installed release (what applications load)
    <dir>/<model>.prev.fpk         the release before it (``rollback`` swaps back)
    <dir>/.fleet/tuf/              TUF metadata; root.json is the pinned trust anchor
    <dir>/.fleet/state.json        installed release numbers (advisory: the file's own hash is the truth)
    <dir>/.fleet/staging/<model>/  verified downloaded pieces, named by SHA-256 (what a resumed install reuses)

Crash safety: the new file is assembled in a temp file in ``<dir>``, hashed while written and checked against the
signed length + SHA-256, fsynced and verified, then the old file is hard-linked to ``.prev.fpk`` and the new one
``os.replace``d over it, then ``<dir>`` is fsynced. A SIGKILL anywhere leaves the old or the new release, never a
torn one; a rerun reuses every piece already downloaded.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import signal
import tempfile
from dataclasses import asdict, dataclass

from ..atomic import atomic_write, fsync_dir
from ..errors import FleetError, FormatError, FreezepackError, IntegrityError
from .delta import file_pieces, plan
from .repo import Store, open_store
from .trust import Counter, check_model_name, trusted_release

_READ = 1 << 20


def _failpoint(name: str) -> None:
    """Crash-test hook: ``FREEZEPACK_FLEET_FAILPOINT=<name>`` kills this process (SIGKILL) at that step."""
    if os.environ.get("FREEZEPACK_FLEET_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class InstallReport:
    name: str
    release: int
    sha256: str
    previous_release: int | None
    status: str                  # "installed" | "up-to-date" | "pulled"
    full_bytes: int              # size of the whole new file
    fetched_bytes: int           # model bytes downloaded in this run
    reused_bytes: int            # bytes taken from the old file or an earlier interrupted run
    metadata_bytes: int          # TUF metadata downloaded
    pieces_fetched: int
    pieces_total: int
    path: str

    def to_json(self) -> dict:
        return asdict(self)


class Device:
    """One device directory."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.path.abspath(os.fspath(directory))
        self.meta = os.path.join(self.dir, ".fleet")
        self.tuf_dir = os.path.join(self.meta, "tuf")
        self.state_path = os.path.join(self.meta, "state.json")

    def model_path(self, name):
        return os.path.join(self.dir, check_model_name(name) + ".fpk")

    def prev_path(self, name):
        return os.path.join(self.dir, check_model_name(name) + ".prev.fpk")

    def staging(self, name):
        return os.path.join(self.meta, "staging", check_model_name(name))

    # -- state ----------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        try:
            with open(self.state_path, "rb") as f:
                st = json.loads(f.read(1 << 20))
            return st if isinstance(st, dict) and isinstance(st.get("models"), dict) else {"models": {}}
        except FileNotFoundError:
            return {"models": {}}
        except ValueError:
            return {"models": {}}    # advisory only: rebuilt from the files' hashes below

    def _write_state(self, st: dict) -> None:
        atomic_write(self.state_path, json.dumps(st, indent=1, sort_keys=True).encode())

    def status(self, name: str) -> dict:
        """What is installed, from the file itself: its SHA-256 matched against the releases this device
        recorded (the current, the pending one of an interrupted install, the previous)."""
        path = self.model_path(name)
        rec = self._state()["models"].get(name, {})
        out = {"name": name, "path": path, "installed": os.path.exists(path), "release": None, "sha256": None,
               "previous_release": None}
        if not out["installed"]:
            return out
        sha = _file_sha256(path)
        out["sha256"] = sha
        known = {r.get("sha256"): r for r in (rec.get("current"), rec.get("pending"), rec.get("previous"))
                 if isinstance(r, dict)}
        if sha in known:
            out["release"] = known[sha].get("release")
        if os.path.exists(self.prev_path(name)):
            psha = _file_sha256(self.prev_path(name))
            out["previous_release"] = known.get(psha, {}).get("release")
        return out

    # -- install ----------------------------------------------------------------------------------------------
    def install(self, source: str | Store, name: str, *, root_file=None, allow_downgrade: bool = False,
                download_only: bool = False, progress=None) -> InstallReport:
        """Refresh trust, fetch what is missing and (unless ``download_only``) install atomically.
        ``progress(done_bytes, total_bytes)`` is called as pieces arrive."""
        name = check_model_name(name)
        store = open_store(source) if not isinstance(source, Store) else source
        os.makedirs(self.meta, exist_ok=True)
        with self._lock():
            return self._install(store, name, root_file, allow_downgrade, download_only, progress)

    @contextlib.contextmanager
    def _lock(self):
        """One install at a time per device directory (cron and a person may both start one); the kernel
        drops the lock when its holder dies, so a killed install never blocks the next."""
        import fcntl

        fd = os.open(os.path.join(self.meta, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FleetError("another install is running on this device directory", path=self.dir) from None
            yield
        finally:
            os.close(fd)

    def _install(self, store, name, root_file, allow_downgrade, download_only, progress) -> InstallReport:
        counter = Counter()
        info = trusted_release(store, self.tuf_dir, name, root_file=root_file, counter=counter)
        for junk in glob.glob(os.path.join(self.dir, f".{name}.fpk.part-*")):
            os.unlink(junk)      # a temp file of a killed run: never used, its pieces are in staging
        current = self.status(name)
        path = self.model_path(name)
        base = dict(name=name, release=info["release"], sha256=info["sha256"],
                    previous_release=current["release"], full_bytes=info["length"], path=path,
                    metadata_bytes=counter.metadata_bytes, pieces_total=len(info["layout"]))
        if current["sha256"] == info["sha256"]:
            recorded = self._state()["models"].get(name, {}).get("current") or {}
            if recorded.get("sha256") != info["sha256"]:     # a run killed after its switch: finish the record
                prev = self.prev_path(name)
                self._record(name, info, previous={"release": current["previous_release"],
                                                   "sha256": _file_sha256(prev)} if os.path.exists(prev) else None)
            base["previous_release"] = current["previous_release"]
            return InstallReport(status="up-to-date", fetched_bytes=0, reused_bytes=info["length"],
                                 pieces_fetched=0, **base)
        if (current["release"] is not None and info["release"] < current["release"] and not allow_downgrade):
            raise FleetError(f"refused: the repository's release {info['release']} of {name!r} is older than the "
                             f"installed release {current['release']} (rollback)", path=store.location)

        sources = self._local_pieces(name)
        stage = self.staging(name)
        os.makedirs(stage, exist_ok=True)
        todo = plan(info["layout"], set(sources))
        fetched = 0
        for sha, length in todo.need.items():
            data = store.get_blob(sha, length)   # digest and length checked against the signed layout
            atomic_write(os.path.join(stage, sha), data, fsync=False)
            sources[sha] = (os.path.join(stage, sha), 0, length)
            fetched += length
            if progress:
                progress(fetched, todo.fetch_bytes)
        _failpoint("after-download")
        base["metadata_bytes"] = counter.metadata_bytes
        report = dict(fetched_bytes=fetched, reused_bytes=todo.full_bytes - sum(todo.need.values()),
                      pieces_fetched=len(todo.need), **base)
        if download_only:
            return InstallReport(status="pulled", **report)

        tmp = self._assemble(name, info, sources, store, stage)
        try:
            _failpoint("after-assemble")
            fmt = info.get("format")
            verify_model_file(tmp, fmt)
            st = self._state()
            st["models"].setdefault(name, {})["pending"] = _rec(info)
            self._write_state(st)
            _failpoint("after-pending")
            prev = self.prev_path(name)
            if os.path.exists(path) and not (os.path.exists(prev) and os.path.samefile(path, prev)):
                # keep the previous release; a hard link is atomic and copies nothing. (rename() between two
                # links of one file is a no-op that leaves the source, hence the samefile check.)
                prev_tmp = os.path.join(self.dir, f".{name}.fpk.part-prev")
                if os.path.exists(prev_tmp):
                    os.unlink(prev_tmp)
                os.link(path, prev_tmp)
                os.replace(prev_tmp, prev)
                _failpoint("after-keep-previous")
            os.replace(tmp, path)
            tmp = None
            fsync_dir(self.dir)
            _failpoint("after-replace")
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        self._record(name, info, previous=current)
        for f in glob.glob(os.path.join(stage, "*")):
            os.unlink(f)
        return InstallReport(status="installed", **report)

    def _record(self, name, info, previous):
        st = self._state()
        m = st["models"].setdefault(name, {})
        if previous is not None and previous.get("sha256"):
            m["previous"] = {"release": previous.get("release"), "sha256": previous["sha256"]}
        m["current"] = _rec(info)
        m.pop("pending", None)
        self._write_state(st)

    def _local_pieces(self, name) -> dict:
        """sha256 -> (file, offset, length) for every piece already on this device."""
        out = {}
        for p in (self.prev_path(name), self.model_path(name)):
            if os.path.exists(p):
                try:
                    for piece in file_pieces(p):
                        out[piece.sha256] = (p, piece.offset, piece.length)
                except FormatError:
                    pass          # a file that is not safetensors contributes nothing
        stage = self.staging(name)
        for f in glob.glob(os.path.join(stage, "*")):
            sha = os.path.basename(f)
            if len(sha) == 64 and not sha.startswith(".tmp"):
                out[sha] = (f, 0, os.path.getsize(f))
        return out

    def _assemble(self, name, info, sources, store, stage) -> str:
        """Write the new file into a temp file in the device dir, checking every piece and the whole."""
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.fpk.part-")
        full = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                for sha, length, _label in info["layout"]:
                    src, off, _ = sources[sha]
                    with open(src, "rb") as f:
                        f.seek(off)
                        data = f.read(length)
                    if len(data) != length or hashlib.sha256(data).hexdigest() != sha:
                        # a staged piece damaged on disk: fetch it again rather than fail the install
                        data = store.get_blob(sha, length)
                        atomic_write(os.path.join(stage, sha), data, fsync=False)
                        sources[sha] = (os.path.join(stage, sha), 0, length)
                    out.write(data)
                    full.update(data)
                out.flush()
                size = out.tell()
                if size != info["length"] or full.hexdigest() != info["sha256"]:
                    raise IntegrityError(f"assembled file ({size} bytes, sha256:{full.hexdigest()}) does not match "
                                         f"the signed release ({info['length']} bytes, sha256:{info['sha256']})",
                                         path=self.model_path(name))
                os.fsync(out.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def rollback(self, name: str) -> dict:
        """Swap the installed file and the kept previous one (each step atomic)."""
        path, prev = self.model_path(name), self.prev_path(name)
        if not os.path.exists(prev):
            raise FleetError(f"no previous release of {name!r} is kept on this device", path=prev)
        if os.path.samefile(path, prev):
            raise FleetError(f"the kept previous file of {name!r} is the installed release itself", path=prev)
        before = self.status(name)
        swap = os.path.join(self.dir, f".{name}.fpk.part-swap")
        os.link(path, swap)
        os.replace(prev, path)
        os.replace(swap, prev)
        fsync_dir(self.dir)
        st = self._state()
        m = st["models"].setdefault(name, {})
        m["current"], m["previous"] = m.get("previous"), m.get("current")
        self._write_state(st)
        after = self.status(name)
        return {"name": name, "release": after["release"], "was": before["release"]}


def _rec(info) -> dict:
    return {"release": info["release"], "sha256": info["sha256"], "length": info["length"]}


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            h.update(chunk)
    return h.hexdigest()


def verify_model_file(path: str, fmt: str | None) -> None:
    """Model-level check after the digests: ``freezepack.api.verify`` for .fpk releases (when the api is
    available), a full safetensors parse otherwise."""
    if fmt == "fpk":
        try:
            from .. import api
        except ImportError:
            api = None
        if api is not None and hasattr(api, "verify"):
            try:
                report = api.verify(path)
            except FreezepackError:
                raise
            except Exception as e:   # never a deep traceback for a file that fails to verify
                raise IntegrityError(f"model does not verify ({type(e).__name__}: {e})", path=path) from None
            if not report.get("ok"):
                bad = [f"{t['name']}: {t.get('error')}" for t in report.get("tensors", []) if not t.get("ok")]
                raise IntegrityError("model does not verify: " + "; ".join(bad[:5]), path=path)
            return
    file_pieces(path)   # header and every tensor's byte range must be valid


def detect_format(path: str) -> str:
    """'fpk' when the safetensors header carries freezepack metadata, else 'safetensors'."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n)) if n < (100 << 20) else {}
    meta = header.get("__metadata__") or {}
    return "fpk" if isinstance(meta, dict) and "freezepack" in meta else "safetensors"
