"""Device side of trust: refresh signed TUF metadata through python-tuf's ngclient and return a model's signed
release facts. Every metadata file is bounded (size, nesting, number of values) before anything parses it.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from .. import atomic
from ..atomic import atomic_write, remove_stale_temps
from ..errors import FleetError, IntegrityError
from . import safejson
from .names import check_model_name, meta_role
from .release import TARGET_SUFFIX, release_info, tuf_metadata
from .store import Store, read_file_capped

_META_PREFIX = "fpk-store:/metadata/"   # ngclient builds URLs on it; our fetcher maps them to the store


@dataclass
class Counter:
    """What fetching the signed metadata cost (reported by installs)."""

    metadata_bytes: int = 0
    requests: int = 0


def _fetcher(store: Store, counter: Counter):
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient import FetcherInterface

    class StoreFetcher(FetcherInterface):
        def _fetch(self, url):
            name = url[len(_META_PREFIX):] if url.startswith(_META_PREFIX) else url
            limits = safejson.TUF_LIMITS[meta_role(name)]
            counter.requests += 1
            data = store.get_metadata(name, limits.max_bytes)
            if data is None:
                raise DownloadHTTPError(f"{name} not found", 404)
            counter.metadata_bytes += len(data)
            # bounded before ngclient's json.loads sees it (a FleetError here reaches the caller as the cause)
            safejson.check_structure(data, limits, what=f"metadata {name}", path=store.location)
            return iter([data])

    return StoreFetcher()


_ROOT_LINK = re.compile(r"root_history/[1-9][0-9]{0,11}\.root\.json")
_NGCLIENT_TEMP = re.compile(r"tmp[a-z0-9_]{8}")     # tempfile.NamedTemporaryFile in ngclient's _persist_file


def check_metadata_dir(metadata_dir: str) -> None:
    """The TUF directory must hold only what ngclient writes there: regular files, a ``root_history/`` directory
    of regular files, and ``root.json`` as a regular file or ngclient's relative link into ``root_history/``.
    Anything else (a symlinked directory or file planted there) is refused: ngclient reads the trusted root
    from here and writes metadata here. Leftover ngclient temp files of a killed run are removed."""
    parent = os.path.dirname(metadata_dir)
    for p in (parent, metadata_dir, os.path.join(metadata_dir, "root_history")):
        if os.path.islink(p):
            raise FleetError("refusing to follow a symlink in the device's fleet directory", path=p)
        if os.path.lexists(p) and not os.path.isdir(p):
            raise FleetError("expected a directory", path=p)
    os.makedirs(metadata_dir, exist_ok=True)
    for e in os.scandir(metadata_dir):
        if e.name == "root.json" and e.is_symlink() and _ROOT_LINK.fullmatch(os.readlink(e.path)):
            target = os.path.join(metadata_dir, os.readlink(e.path))
            if os.path.islink(target) or not os.path.isfile(target):
                raise FleetError("trusted root link does not point to a regular file", path=e.path)
        elif e.name == "root_history" and e.is_dir(follow_symlinks=False):
            for h in os.scandir(e.path):
                if not h.is_file(follow_symlinks=False):
                    raise FleetError("refusing a symlink or non-file in the TUF metadata directory", path=h.path)
        elif not e.is_file(follow_symlinks=False):
            raise FleetError("refusing a symlink or non-file in the TUF metadata directory", path=e.path)
        elif _NGCLIENT_TEMP.fullmatch(e.name):
            st = e.stat(follow_symlinks=False)
            if time.time() - st.st_mtime > atomic.STALE_TEMP_AGE:
                os.unlink(e.path)
    remove_stale_temps(metadata_dir)


def pin_root(metadata_dir: str, root_file: str | os.PathLike | None) -> None:
    """Install the operator's root file as the device's trust anchor (first use only: later roots come
    through TUF's signed root chain)."""
    check_metadata_dir(metadata_dir)
    local = os.path.join(metadata_dir, "root.json")
    if os.path.lexists(local):
        return
    if root_file is None:
        raise FleetError("no trusted root pinned on this device: pass --root ROOT.json (the file "
                         "'freezepack fleet init' wrote)", path=metadata_dir)
    lim = safejson.TUF_LIMITS["root"]
    data = read_file_capped(os.fspath(root_file), lim.max_bytes, "trusted root file")
    if data is None:
        raise FleetError("trusted root file not found", path=root_file)
    root = safejson.loads(data, lim, what="trusted root file", path=root_file)
    signed = root.get("signed") if isinstance(root, dict) else None
    if not isinstance(signed, dict) or signed.get("_type") != "root":
        raise FleetError("not a TUF root metadata file", path=root_file)
    try:
        tuf_metadata().Metadata.from_bytes(data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FleetError(f"not a valid TUF root metadata file ({type(e).__name__}: {e})", path=root_file) from None
    atomic_write(local, data, make_parents=True)


def trusted_release(store: Store, metadata_dir: str, name: str, *, root_file=None,
                    counter: Counter | None = None) -> dict:
    """Refresh TUF metadata from the store (root chain, timestamp, snapshot, targets, each checked for
    signatures, thresholds, versions, expiry and hashes) and return the model's signed release facts."""
    tuf_metadata()
    from tuf.api import exceptions as tx
    from tuf.ngclient import Updater, UpdaterConfig

    name = check_model_name(name)
    counter = counter or Counter()
    pin_root(metadata_dir, root_file)
    where = store.location
    lim = safejson.TUF_LIMITS
    config = UpdaterConfig(root_max_length=lim["root"].max_bytes, timestamp_max_length=lim["timestamp"].max_bytes,
                           snapshot_max_length=lim["snapshot"].max_bytes,
                           targets_max_length=lim["targets"].max_bytes)
    try:
        updater = Updater(metadata_dir, _META_PREFIX, fetcher=_fetcher(store, counter), config=config,
                          bootstrap=None)
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
        if isinstance(cause, FleetError):
            raise FleetError(f"cannot download metadata: {cause.reason}", path=cause.path or where) from None
        raise FleetError(f"cannot download metadata: {getattr(cause, 'reason', None) or cause or e}",
                         path=where) from None
    except tx.RepositoryError as e:
        raise FleetError(f"refused: bad repository metadata ({type(e).__name__}: {e})", path=where) from None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        # deserialization and schema errors of tampered files (python-tuf raises these from its parsers)
        raise FleetError(f"refused: malformed metadata ({type(e).__name__}: {e})", path=where) from None
    if tf is None:
        raise FleetError(f"the repository has no model {name!r}", path=where)
    info = release_info(tf)
    if sum(length for _, length, _ in info["layout"]) != info["length"]:
        raise IntegrityError("signed layout does not add up to the signed file length", path=where)
    return info
