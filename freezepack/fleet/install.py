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

Hostile directory contents: the installer never follows a symlink in the paths it owns (``.fleet`` and all below
it, ``<model>.fpk``, ``<model>.prev.fpk``): directories are opened with ``O_NOFOLLOW`` and worked on through their
descriptors, files are opened with ``O_NOFOLLOW``, and anything that is not what it should be (a symlink, a
directory where a file belongs) is refused with a FleetError. Installs and rollbacks hold the device lock.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import signal
import stat
from dataclasses import asdict, dataclass

from ..atomic import TEMP_PREFIX, atomic_write, fsync_dir, remove_stale_temps
from ..errors import FleetError, FormatError, IntegrityError
from . import safejson
from .client import Counter, trusted_release
from .delta import file_pieces, plan
from .names import check_model_name
from .net import NetLimits
from .repo import open_store
from .store import Store, read_file_capped
from .verify import detect_format, verify_model_file  # noqa: F401  (detect_format: its old import path)

_READ = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW


def _failpoint(name: str) -> None:
    """Crash-test hook: ``FREEZEPACK_FLEET_FAILPOINT=<name>`` kills this process (SIGKILL) at that step."""
    if os.environ.get("FREEZEPACK_FLEET_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _writing(path: str, what: str):
    """An OSError while writing ``path`` (disk full, quota, ``ulimit -f``: no file name in the error) becomes a
    FleetError naming the file, not ``error: : File too large``."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
            raise FleetError(f"cannot write {what}: {e.strerror} (disk full, quota, or a file-size limit such as "
                             "ulimit -f); the installed release is unchanged: free space and run again (the "
                             "pieces already downloaded are kept)", path=path) from None
        raise


def _refuse_link(path: str) -> FleetError:
    return FleetError("refusing to follow a symlink (or use a non-directory) in a path the fleet installer owns; "
                      "remove it", path=path)


def _subdir(parent_fd: int | None, parent: str, name: str) -> int:
    """Open (creating it if missing) the real directory ``name`` under ``parent``, never through a symlink."""
    path = os.path.join(parent, name)
    where = name if parent_fd is not None else path
    for _ in range(2):
        try:
            return os.open(where, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(where, 0o777, dir_fd=parent_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise _refuse_link(path) from None
            raise
    raise FleetError("cannot create directory", path=path)


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
        self._meta_fd: int | None = None     # held while locked

    def model_path(self, name):
        return os.path.join(self.dir, check_model_name(name) + ".fpk")

    def prev_path(self, name):
        return os.path.join(self.dir, check_model_name(name) + ".prev.fpk")

    def staging(self, name):
        return os.path.join(self.meta, "staging", check_model_name(name))

    # -- files ------------------------------------------------------------------------------------------------
    def _model_file(self, path: str) -> bool:
        """True when ``path`` is a regular file, False when missing; FleetError for anything else."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(st.st_mode):
            raise _refuse_link(path)
        if not stat.S_ISREG(st.st_mode):
            raise FleetError("is not a regular file (a directory or device where a model file belongs): "
                             "remove it", path=path)
        return True

    # -- state ----------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        data = read_file_capped(self.state_path, safejson.STATE_LIMITS.max_bytes, "device state file")
        if data is None:
            return {"models": {}}
        try:
            st = safejson.loads(data, safejson.STATE_LIMITS, what="device state file", path=self.state_path)
        except FleetError:
            return {"models": {}}    # advisory only: rebuilt from the files' hashes below
        models = st.get("models") if isinstance(st, dict) else None
        if not isinstance(models, dict):
            return {"models": {}}
        return {"models": {k: v for k, v in models.items() if isinstance(v, dict)}}

    def _write_state(self, st: dict) -> None:
        import json

        with _writing(self.state_path, "the device state"):
            atomic_write(self.state_path, json.dumps(st, indent=1, sort_keys=True).encode(), make_parents=True)

    def status(self, name: str) -> dict:
        """What is installed, from the file itself: its SHA-256 matched against the releases this device
        recorded (the current, the pending one of an interrupted install, the previous)."""
        path = self.model_path(name)
        has_prev = self._model_file(self.prev_path(name))
        out = {"name": name, "path": path, "installed": self._model_file(path), "release": None, "sha256": None,
               "previous_release": None}
        if not out["installed"]:
            return out
        rec = self._state()["models"].get(name, {})
        sha = _file_sha256(path)
        out["sha256"] = sha
        known = {r.get("sha256"): r for r in (rec.get("current"), rec.get("pending"), rec.get("previous"))
                 if isinstance(r, dict) and isinstance(r.get("sha256"), str)}
        if sha in known:
            out["release"] = _release_number(known[sha].get("release"))
        if has_prev:
            psha = _file_sha256(self.prev_path(name))
            out["previous_release"] = _release_number(known.get(psha, {}).get("release"))
        return out

    # -- install ----------------------------------------------------------------------------------------------
    def install(self, source: str | Store, name: str, *, root_file=None, allow_downgrade: bool = False,
                download_only: bool = False, progress=None, limits: NetLimits | None = None) -> InstallReport:
        """Refresh trust, fetch what is missing and (unless ``download_only``) install atomically.
        ``progress(done_bytes, total_bytes)`` is called as pieces arrive. ``limits`` sets the network timeouts
        and minimum transfer rate of a URL ``source``."""
        name = check_model_name(name)
        store = source if isinstance(source, Store) else open_store(source, limits=limits)
        own = store is not source
        try:
            with self._lock():
                return self._install(store, name, root_file, allow_downgrade, download_only, progress)
        finally:
            if own:
                store.close()

    @contextlib.contextmanager
    def _lock(self):
        """One install or rollback at a time per device directory (cron and a person may both start one); the
        kernel drops the lock when its holder dies (or the descriptor is closed on any error), so a failed or
        killed install never blocks the next."""
        import fcntl

        os.makedirs(self.dir, exist_ok=True)
        meta_fd = _subdir(None, self.dir, ".fleet")
        fd = None
        try:
            try:
                fd = os.open("lock", os.O_RDWR | os.O_CREAT | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o644,
                             dir_fd=meta_fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EMLINK):
                    raise _refuse_link(os.path.join(self.meta, "lock")) from None
                raise
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FleetError("lock is not a regular file", path=os.path.join(self.meta, "lock"))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FleetError("another install is running on this device directory", path=self.dir) from None
            self._meta_fd = meta_fd
            remove_stale_temps(self.meta, dir_fd=meta_fd)   # leftovers of a killed state write
            yield
        finally:
            self._meta_fd = None
            if fd is not None:
                os.close(fd)
            os.close(meta_fd)

    def _stage_fd(self, name: str) -> int:
        staging = _subdir(self._meta_fd, self.meta, "staging")
        try:
            return _subdir(staging, os.path.join(self.meta, "staging"), name)
        finally:
            os.close(staging)

    def _install(self, store, name, root_file, allow_downgrade, download_only, progress) -> InstallReport:
        path, prev = self.model_path(name), self.prev_path(name)
        self._model_file(path)
        self._model_file(prev)
        counter = Counter()
        info = trusted_release(store, self.tuf_dir, name, root_file=root_file, counter=counter)
        self._remove_part_files(name)
        current = self.status(name)
        base = dict(name=name, release=info["release"], sha256=info["sha256"],
                    previous_release=current["release"], full_bytes=info["length"], path=path,
                    metadata_bytes=counter.metadata_bytes, pieces_total=len(info["layout"]))
        if current["sha256"] == info["sha256"]:
            recorded = self._state()["models"].get(name, {}).get("current")
            # a run killed after its switch: finish the record
            if not isinstance(recorded, dict) or recorded.get("sha256") != info["sha256"]:
                self._record(name, info, previous={"release": current["previous_release"],
                                                   "sha256": _file_sha256(prev)} if self._model_file(prev) else None)
            base["previous_release"] = current["previous_release"]
            return InstallReport(status="up-to-date", fetched_bytes=0, reused_bytes=info["length"],
                                 pieces_fetched=0, **base)
        if (current["release"] is not None and info["release"] < current["release"] and not allow_downgrade):
            raise FleetError(f"refused: the repository's release {info['release']} of {name!r} is older than the "
                             f"installed release {current['release']} (rollback)", path=store.location)

        stage_fd = self._stage_fd(name)
        try:
            return self._fetch_and_switch(store, name, info, current, base, stage_fd, download_only, progress)
        finally:
            os.close(stage_fd)

    def _fetch_and_switch(self, store, name, info, current, base, stage_fd, download_only, progress):
        path = self.model_path(name)
        stage = self.staging(name)
        remove_stale_temps(stage, dir_fd=stage_fd)          # pieces of a killed download, half written
        sources = self._local_pieces(name, stage_fd)
        todo = plan(info["layout"], set(sources))
        fetched = 0
        for sha, length in todo.need.items():
            self._fetch_piece(store, sha, length, stage_fd, name)
            sources[sha] = (sha, 0, length, stage_fd)
            fetched += length
            if progress:
                progress(fetched, todo.fetch_bytes)
        _failpoint("after-download")
        report = dict(fetched_bytes=fetched, reused_bytes=todo.full_bytes - sum(todo.need.values()),
                      pieces_fetched=len(todo.need), **base)
        if download_only:
            return InstallReport(status="pulled", **report)

        assembled = self._assemble(name, info, sources, store, stage_fd)
        tmp: str | None = assembled  # None once published
        try:
            _failpoint("after-assemble")
            verify_model_file(assembled, info.get("format"))
            st = self._state()
            st["models"].setdefault(name, {})["pending"] = _rec(info)
            self._write_state(st)
            _failpoint("after-pending")
            prev = self.prev_path(name)
            if self._model_file(path) and not (self._model_file(prev) and os.path.samefile(path, prev)):
                # keep the previous release; a hard link is atomic and copies nothing. (rename() between two
                # links of one file is a no-op that leaves the source, hence the samefile check.)
                prev_tmp = os.path.join(self.dir, f".{name}.fpk.part-prev")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(prev_tmp)
                os.link(path, prev_tmp, follow_symlinks=False)
                os.replace(prev_tmp, prev)
                _failpoint("after-keep-previous")
            os.replace(assembled, path)
            tmp = None
            fsync_dir(self.dir)
            _failpoint("after-replace")
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        self._record(name, info, previous=current)
        for e in list(os.scandir(stage_fd)):
            if _is_piece_name(e.name) and not e.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.name, dir_fd=stage_fd)     # unlink never follows a symlink
        return InstallReport(status="installed", **report)

    def _remove_part_files(self, name) -> None:
        """Temp files of a killed run in the device directory (never used: their pieces are in staging)."""
        prefix = f".{name}.fpk.part-"
        for e in os.scandir(self.dir):
            if e.name.startswith(prefix) and e.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)

    def _fetch_piece(self, store, sha, length, stage_fd, name) -> None:
        """Stream one piece into staging (temp name, digest checked while it arrives, then renamed)."""
        tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}-{sha}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666, dir_fd=stage_fd)
        try:
            with _writing(os.path.join(self.staging(name), sha), "a downloaded piece"), os.fdopen(fd, "wb") as f:
                store.fetch_blob(sha, length, f)
            os.replace(tmp, sha, src_dir_fd=stage_fd, dst_dir_fd=stage_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=stage_fd)
            raise

    def _record(self, name, info, previous):
        st = self._state()
        m = st["models"].setdefault(name, {})
        if previous is not None and previous.get("sha256"):
            m["previous"] = {"release": previous.get("release"), "sha256": previous["sha256"]}
        m["current"] = _rec(info)
        m.pop("pending", None)
        self._write_state(st)

    def _local_pieces(self, name, stage_fd) -> dict:
        """sha256 -> (file, offset, length, dir_fd) for every piece already on this device."""
        out = {}
        for p in (self.prev_path(name), self.model_path(name)):
            if self._model_file(p):
                try:
                    for piece in file_pieces(p):
                        out[piece.sha256] = (p, piece.offset, piece.length, None)
                except FormatError:
                    pass          # a file that is not safetensors contributes nothing
        for e in os.scandir(stage_fd):
            if _is_piece_name(e.name) and e.is_file(follow_symlinks=False):
                out[e.name] = (e.name, 0, e.stat(follow_symlinks=False).st_size, stage_fd)
        return out

    def _assemble(self, name, info, sources, store, stage_fd) -> str:
        """Write the new file into a temp file in the device dir, checking every piece and the whole; memory
        stays one read buffer whatever the piece sizes."""
        # mode 0o666 under the umask, like any file an application writes (mkstemp's 0600 would hide the model
        # from the service user that loads it)
        tmp = os.path.join(self.dir, f".{name}.fpk.part-{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
        full = hashlib.sha256()
        try:
            with _writing(self.model_path(name), "the new release"), os.fdopen(fd, "wb") as out:
                for sha, length, _label in info["layout"]:
                    if not _piece_ok(sources[sha], sha, length):
                        # a staged piece damaged on disk: fetch it again rather than fail the install
                        self._fetch_piece(store, sha, length, stage_fd, name)
                        sources[sha] = (sha, 0, length, stage_fd)
                    for chunk in _read_piece(sources[sha], length):
                        out.write(chunk)
                        full.update(chunk)
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
        """Swap the installed file and the kept previous one (each step atomic), under the device lock."""
        path, prev = self.model_path(name), self.prev_path(name)
        with self._lock():
            if not self._model_file(prev):
                raise FleetError(f"no previous release of {name!r} is kept on this device", path=prev)
            if not self._model_file(path):
                raise FleetError(f"{name!r} is not installed on this device", path=path)
            if os.path.samefile(path, prev):
                raise FleetError(f"the kept previous file of {name!r} is the installed release itself", path=prev)
            before = self.status(name)
            self._remove_part_files(name)
            swap = os.path.join(self.dir, f".{name}.fpk.part-swap")
            os.link(path, swap, follow_symlinks=False)
            os.replace(prev, path)
            os.replace(swap, prev)
            fsync_dir(self.dir)
            st = self._state()
            m = st["models"].setdefault(name, {})
            m["current"], m["previous"] = m.get("previous"), m.get("current")
            self._write_state(st)
            after = self.status(name)
        return {"name": name, "release": after["release"], "was": before["release"]}


def _is_piece_name(n: str) -> bool:
    return len(n) == 64 and all(c in "0123456789abcdef" for c in n)


def _open_source(src) -> int:
    path, _, _, dir_fd = src
    return os.open(path, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)


def _read_piece(src, length):
    with os.fdopen(_open_source(src), "rb") as f:
        f.seek(src[1])
        left = length
        while left > 0:
            chunk = f.read(min(_READ, left))
            if not chunk:
                raise IntegrityError("a local piece changed while the file was assembled", path=src[0])
            left -= len(chunk)
            yield chunk


def _piece_ok(src, sha, length) -> bool:
    h = hashlib.sha256()
    try:
        for chunk in _read_piece(src, length):
            h.update(chunk)
    except (IntegrityError, OSError):
        return False
    return h.hexdigest() == sha


def _rec(info) -> dict:
    return {"release": info["release"], "sha256": info["sha256"], "length": info["length"]}


def _release_number(v):
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with os.fdopen(os.open(path, os.O_RDONLY | _NOFOLLOW), "rb") as f:
        while chunk := f.read(_READ):
            h.update(chunk)
    return h.hexdigest()
