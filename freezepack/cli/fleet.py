"""``freezepack fleet ...``: publish signed model releases and install them on devices (docs/FLEET.md)."""
from __future__ import annotations

import json
import os
from datetime import timedelta

import click

from .common import FilePath, ProgressBar, one_line_errors, parse_pairs

_ROLES = ("root", "targets", "snapshot", "timestamp")


def _out(as_json: bool, obj, text: str) -> None:
    click.echo(json.dumps(obj, indent=1, sort_keys=True, default=str) if as_json else text)


def _bar(label: str, quiet: bool) -> ProgressBar:
    """A byte progress bar fed by ``progress(done, total)`` callbacks (hidden with --json/--quiet)."""
    return ProgressBar(label, show=not quiet, show_pos=True)


def _parse_pairs(pairs, kind):
    return parse_pairs(pairs, form="ROLE=VALUE", keys=_ROLES, convert=kind)


def _expiry(pairs):
    return {r: timedelta(days=d) for r, d in _parse_pairs(pairs, float).items()}


repo_arg = click.argument("repo", metavar="REPO")
keys_opt = click.option("--keys", "keys_dir", required=True, type=FilePath(file_okay=False),
                        help="Directory of private keys (created by 'fleet init').")
json_opt = click.option("--json", "as_json", is_flag=True, help="Print a JSON result for scripts.")
expires_opt = click.option("--expires", "expires", multiple=True, metavar="ROLE=DAYS",
                           help="Validity of a role's new metadata, e.g. timestamp=1 (defaults: root 365, "
                                "targets 90, snapshot 7, timestamp 1). Repeatable.")
device_opt = click.option("--dir", "device_dir", required=True, type=FilePath(file_okay=False),
                          help="The device's model directory (holds NAME.fpk, NAME.prev.fpk and .fleet/).")


@click.group()
def fleet():
    """Ship models to a fleet: signed releases, small delta updates, atomic installs.

    \b
    REPO is a directory (the default; serve it with any static HTTP server), an http(s):// URL of such a
    directory (read-only: devices install from it), or an OCI registry repository:
    oci://registry/namespace/name (oci+http:// for a plain-HTTP registry).
    \b
    Publisher:  fleet init REPO --keys K --root-out root.json
                fleet publish REPO model.fpk --name detector --keys K
                fleet timestamp REPO --keys K          (cron, before timestamp metadata expires)
                fleet keys rotate|revoke|list ...
    Device:     fleet install REPO detector --dir /var/lib/models --root root.json
                fleet status detector --dir /var/lib/models
    Trust is The Update Framework: see docs/FLEET.md for keys, rotation and revocation.
    """


@fleet.command()
@repo_arg
@keys_opt
@click.option("--root-out", type=FilePath(dir_okay=False), required=True,
              help="Write the trusted root file here; copy it to every device (--root).")
@click.option("--threshold", multiple=True, metavar="ROLE=N",
              help="Signatures required for a role (default 1 each); N keys are created. Repeatable.")
@expires_opt
@json_opt
@one_line_errors
def init(repo, keys_dir, root_out, threshold, expires, as_json):
    """Create a fleet repository in REPO with fresh Ed25519 keys in --keys."""
    from ..atomic import atomic_write
    from ..fleet import Publisher, open_store

    pub = Publisher(open_store(repo), keys_dir)
    root = pub.init(thresholds=_parse_pairs(threshold, int), expiry=_expiry(expires))
    atomic_write(root_out, root, make_parents=True)
    info = pub.describe()
    _out(as_json, info, f"created fleet repository {info['location']}\n"
                        f"keys in {os.path.abspath(keys_dir)} (move the root-* keys offline)\n"
                        f"trusted root written to {root_out}: install it on every device with --root")


@fleet.command()
@repo_arg
@click.argument("model", type=FilePath(exists=True, dir_okay=False))
@click.option("--name", required=True, help="Model name on the fleet (a-z 0-9 . _ -).")
@keys_opt
@click.option("--release", type=int, default=None, help="Release number (default: latest + 1).")
@expires_opt
@json_opt
@one_line_errors
def publish(repo, model, name, keys_dir, release, expires, as_json):
    """Sign MODEL (.fpk or any safetensors file) as the newest release of --name and upload what is new."""
    from ..fleet import Publisher, open_store

    pub = Publisher(open_store(repo), keys_dir).load()
    with _bar(f"publishing {name}", as_json) as progress:
        info = pub.publish(model, name, release=release, expiry=_expiry(expires), progress=progress)
    _out(as_json, info, f"published {name} release {info['release']} ({info['length']} bytes, "
                        f"{info['uploaded_bytes']} new) sha256:{info['sha256']}")


@fleet.command()
@repo_arg
@keys_opt
@click.option("--snapshot", is_flag=True, help="Re-sign snapshot metadata too (default expiry 7 days).")
@click.option("--targets", is_flag=True, help="Re-sign targets metadata too (default expiry 90 days; needs the "
                                              "targets key): for a model not republished for months.")
@expires_opt
@json_opt
@one_line_errors
def timestamp(repo, keys_dir, snapshot, targets, expires, as_json):
    """Re-sign the online timestamp metadata with a fresh expiry (run it from cron).

    Devices refuse metadata past its expiry (freeze attack protection), so a repository whose timestamp is not
    refreshed stops updating devices.
    """
    from ..fleet import Publisher, open_store

    pub = Publisher(open_store(repo), keys_dir).load()
    v = pub.refresh_timestamp(expiry=_expiry(expires), snapshot=snapshot, targets=targets)
    _out(as_json, {"timestamp_version": v,
                   "expires": pub.timestamp.signed.expires.isoformat()},
         f"timestamp version {v}, valid until {pub.timestamp.signed.expires.isoformat()}")


@fleet.group()
def keys():
    """List, rotate and revoke the repository's signing keys (a new root version, chained by signatures)."""


@keys.command("list")
@repo_arg
@json_opt
@one_line_errors
def keys_list(repo, as_json):
    """Show each role's key ids, threshold and expiry, and the published models."""
    from ..fleet import Publisher, open_store

    info = Publisher(open_store(repo), ".").load().describe()
    lines = [f"{info['location']}  root version {info['root_version']}"]
    for role, r in info["roles"].items():
        lines.append(f"  {role:9s} threshold {r['threshold']}  expires {r['expires']}  keys "
                     + ", ".join(k[:16] for k in r["keyids"]))
    for name, m in info["models"].items():
        lines.append(f"  model {name}: release {m['release']}, {m['length']} bytes, sha256:{m['sha256'][:16]}")
    for m in info["models"].values():
        m.pop("layout", None)
    _out(as_json, info, "\n".join(lines))


@keys.command("rotate")
@repo_arg
@keys_opt
@click.option("--role", type=click.Choice(_ROLES), required=True)
@click.option("--revoke", multiple=True, metavar="KEYID",
              help="Key id (or unique prefix) to remove from the role. Default: all of its current keys.")
@expires_opt
@json_opt
@one_line_errors
def keys_rotate(repo, keys_dir, role, revoke, expires, as_json):
    """Replace a role's key(s) with a new one. Rotating root needs the old and the new root keys in --keys."""
    from ..fleet import Publisher, open_store

    pub = Publisher(open_store(repo), keys_dir).load()
    revoke = list(revoke) or list(pub.root.signed.roles[role].keyids)
    info = pub.rotate(role, revoke=revoke, add=max(1, len(revoke)), expiry=_expiry(expires))
    _out(as_json, info, f"root version {info['root_version']}: {role} key(s) "
                        f"{', '.join(k[:16] for k in info['added'])} added, "
                        f"{', '.join(k[:16] for k in info['revoked'])} revoked")


@keys.command("renew")
@repo_arg
@keys_opt
@expires_opt
@json_opt
@one_line_errors
def keys_renew(repo, keys_dir, expires, as_json):
    """Re-sign root with a fresh expiry and the same keys (a new root version; needs the root keys)."""
    from ..fleet import Publisher, open_store

    pub = Publisher(open_store(repo), keys_dir).load()
    info = pub.rotate("root", revoke=[], add=0, expiry=_expiry(expires))
    _out(as_json, info, f"root version {info['root_version']}, valid until "
                        f"{pub.root.signed.expires.isoformat()}")


@keys.command("revoke")
@repo_arg
@click.argument("keyid")
@keys_opt
@click.option("--role", type=click.Choice(_ROLES), required=True)
@click.option("--replace/--no-replace", default=True, show_default=True,
              help="Add a fresh key in its place (needed when the role would fall below its threshold).")
@json_opt
@one_line_errors
def keys_revoke(repo, keyid, keys_dir, role, replace, as_json):
    """Remove a (compromised) key from a role; devices reject its signatures from the next root on."""
    from ..fleet import Publisher, open_store

    pub = Publisher(open_store(repo), keys_dir).load()
    info = pub.rotate(role, revoke=[keyid], add=1 if replace else 0)
    _out(as_json, info, f"root version {info['root_version']}: revoked {keyid} from {role}")


def net_options(fn):
    """Network limits of an install from an http(s):// or oci:// repository (see freezepack.fleet.net)."""
    from ..fleet.net import DEFAULT_LIMITS as d

    opts = [
        click.option("--connect-timeout", type=float, default=d.connect_timeout, show_default=True,
                     help="Seconds to wait for a connection to the repository."),
        click.option("--read-timeout", type=float, default=d.read_timeout, show_default=True,
                     help="Seconds a read may wait for the next byte."),
        click.option("--min-rate", type=float, default=d.min_rate, show_default=True,
                     help="Bytes/s a response must average over each --rate-window, else it is cut off "
                          "(a mirror that trickles bytes). 0 turns the check off."),
        click.option("--rate-window", type=float, default=d.rate_window, show_default=True,
                     help="Seconds over which --min-rate is measured."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _limits(net: dict):
    from ..fleet.net import NetLimits

    return NetLimits(connect_timeout=net["connect_timeout"], read_timeout=net["read_timeout"],
                     min_rate=net["min_rate"], rate_window=net["rate_window"])


def _install_text(r) -> str:
    if r.status == "up-to-date":
        return f"{r.name} release {r.release} is already installed ({r.path})"
    verb = "installed" if r.status == "installed" else "downloaded (not installed)"
    pct = 100.0 * r.fetched_bytes / max(r.full_bytes, 1)
    return (f"{verb} {r.name} release {r.release} -> {r.path}\n"
            f"transferred {r.fetched_bytes} of {r.full_bytes} bytes ({pct:.1f}% of the full file; "
            f"{r.reused_bytes} reused locally) + {r.metadata_bytes} bytes of signed metadata")


def _device_command(download_only):
    @click.argument("repo", metavar="REPO")
    @click.argument("name")
    @device_opt
    @click.option("--root", "root_file", type=FilePath(exists=True, dir_okay=False),
                  help="Trusted root file from the operator; needed on first use, then kept in --dir.")
    @click.option("--allow-downgrade", is_flag=True,
                  help="Accept a signed release older than the installed one.")
    @net_options
    @json_opt
    @one_line_errors
    def cmd(repo, name, device_dir, root_file, allow_downgrade, as_json, **net):
        from ..fleet import Device

        limits = _limits(net)
        with _bar(f"fetching {name}", as_json) as progress:
            r = Device(device_dir).install(repo, name, root_file=root_file, allow_downgrade=allow_downgrade,
                                           download_only=download_only, progress=progress, limits=limits)
        _out(as_json, r.to_json(), _install_text(r))
    return cmd


install = fleet.command("install", help="""Verify and install the newest signed release of NAME from REPO.

    Checks the TUF metadata (signatures, thresholds, versions, expiry), fetches only the pieces the device does
    not hold (a fine-tuned release moves just its trained values), rebuilds the file, checks its signed SHA-256
    and the model itself, and replaces the installed file atomically, keeping the previous one
    (NAME.prev.fpk). An interrupted install resumes where it stopped.""")(_device_command(False))
pull = fleet.command("pull", help="""Verify and download the newest release of NAME into the device's staging area
    without installing it (a later 'install' then transfers nothing).""")(_device_command(True))


@fleet.command()
@click.argument("name")
@device_opt
@json_opt
@one_line_errors
def status(name, device_dir, as_json):
    """Show the installed release of NAME (from the file's own hash) and the kept previous one."""
    from ..fleet import Device

    st = Device(device_dir).status(name)
    if not st["installed"]:
        text = f"{name}: not installed in {device_dir}"
    else:
        text = (f"{name}: release {st['release'] if st['release'] is not None else 'unknown'} "
                f"sha256:{st['sha256'][:16]} at {st['path']}; previous kept: "
                f"{st['previous_release'] if st['previous_release'] is not None else 'none'}")
    _out(as_json, st, text)


@fleet.command()
@click.argument("name")
@device_opt
@json_opt
@one_line_errors
def rollback(name, device_dir, as_json):
    """Swap the installed release of NAME with the kept previous one."""
    from ..fleet import Device

    r = Device(device_dir).rollback(name)
    _out(as_json, r, f"{name}: release {r['release']} is installed again (was {r['was']})")
