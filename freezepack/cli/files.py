"""``freezepack inspect | verify | unpack | convert``: thin shells over freezepack.api for .fpk files.

Every refusal is one line on stderr (``error: <file>: <tensor>: <reason>``) and a non-zero exit status:
1 = the file is bad or does not verify, 2 = wrong usage (click's convention).
"""
from __future__ import annotations

import json
import sys

import click

from .common import FilePath, ProgressBar, one_line_errors, parse_pairs, printable


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.command("inspect")
@click.argument("path", type=FilePath())
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON (for scripts).")
@one_line_errors
def inspect_cmd(path, as_json):
    """Show what a .fpk file holds, without regenerating anything.

    \b
    Per tensor: kind (frozen = regenerated from seed + initializer, whole = stored as is), shape, initializer,
    freezing rate q (share of entries frozen), the mask coder and its size next to the mask's entropy, how the
    values are stored (raw, planes, cast:BF16, codebook:N; lossy files say so on top), and the stored bytes. The
    last line compares the file with the dense float model.

    \b
    Example:  freezepack inspect lenet.fpk
              freezepack inspect --json lenet.fpk | jq .compression_factor
    """
    from .. import api

    info = api.inspect(path)
    if as_json:
        click.echo(json.dumps(info, indent=1, sort_keys=True))
        return
    # Everything read from the file (names, metadata, producer) is shown through printable(): a crafted file
    # must not drive the terminal with escape sequences.
    click.echo(f"{printable(info['path'])}: freezepack format v{info['format_version']}, "
               f"{printable(info['producer'])}, generator {printable(info['generator'])}, seed {info['seed']}")
    if "lossless" not in info["values"]:
        click.echo(f"  trained values: {printable(info['values'])} (lossy: quantized when saved; verified as stored)")
    for k, v in sorted(info["metadata"].items()):
        click.echo(f"  metadata {printable(k)} = {printable(v)}")
    names = {t["name"]: printable(t["name"]) for t in info["tensors"]}
    w = max([len(s) for s in names.values()] + [6])
    click.echo(f"  {'tensor':<{w}}  {'kind':<6} {'shape':<18} {'init':<16} {'q':>8} {'coder':<14} "
               f"{'mask':>9} {'entropy':>9} {'values':<14} {'stored':>10}")
    for t in info["tensors"]:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        name = names[t["name"]]
        if t["kind"] == "frozen":
            click.echo(f"  {name:<{w}}  {'frozen':<6} {shape:<18} {printable(t['init']):<16} {t['q']:>8.4f} "
                       f"{t['coder']:<14} {t['mask_bytes']:>9} {t['mask_entropy_bytes']:>9.0f} "
                       f"{t['values_coding'] or '-':<14} {_human(t['stored_bytes']):>10}")
        elif t["kind"] == "alias":
            click.echo(f"  {name:<{w}}  {'alias':<6} {shape:<18} {'= ' + printable(t['of'])}")
        else:
            click.echo(f"  {name:<{w}}  {'whole':<6} {shape:<18} {t['dtype']:<16} {'':>8} {'':<14} {'':>9} "
                       f"{'':>9} {t['values_coding'] or '-':<14} {_human(t['stored_bytes']):>10}")
    click.echo(f"file {_human(info['file_bytes'])} (header {_human(info['header_bytes'])}), dense "
               f"{_human(info['dense_bytes'])}: compression factor {info['compression_factor']:.1f}x; frozen share q = "
               f"{info['q']:.4f}")


@click.command("verify")
@click.argument("path", type=FilePath())
@click.option("--device", default=None, help="Regenerate on this torch device (e.g. cuda) instead of the CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for scripts).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@one_line_errors
def verify_cmd(path, device, as_json, progress):
    """Regenerate every tensor and check it against the digests in the file.

    \b
    Exit status 0 only when every stored byte and every reconstructed tensor matches bit for bit; 1 when
    anything is corrupted, truncated, or not regenerated exactly on this device.

    \b
    Example:  freezepack verify model.fpk && echo intact
              freezepack verify --device cuda model.fpk
    """
    from .. import api

    bar = ProgressBar("verifying", progress)
    try:
        report = api.verify(path, device, progress=bar)
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(report, indent=1, sort_keys=True))
    else:
        for t in report["tensors"]:
            if not t["ok"]:
                click.echo(f"error: {path}: tensor {t['name']!r}: {t['error']}", err=True)
        if report["ok"]:
            lossy = f" (trained values lossy: {report['values']}, as stored)" if report.get("values") else ""
            click.echo(f"{path}: OK, {report['checked']} tensors bit-exact on {report['device']}{lossy}")
    if not report["ok"]:
        sys.exit(1)


@click.command("unpack")
@click.argument("src", type=FilePath())
@click.argument("dst", type=FilePath())
@click.option("--device", default=None, help="Regenerate on this torch device (the output is written from the CPU).")
@click.option("--parents", is_flag=True, help="Create DST's missing parent directories (else that is an error).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@one_line_errors
def unpack_cmd(src, dst, device, parents, progress):
    """Expand a .fpk into a dense .safetensors file that any safetensors reader loads.

    \b
    Every tensor is regenerated and checked against its digest first; the output is written atomically and
    carries the .fpk's user metadata.

    \b
    Example:  freezepack unpack model.fpk model.safetensors
    """
    from .. import api
    from ..checkpoint import SHARED_KEY
    from ..format.dense import safetensors_chunks
    from ..format.io import atomic_write

    _check_text("DST", dst)
    if device is not None and device.split(":")[0] == "meta":
        raise click.BadParameter("the meta device holds no values to write; use cpu or a GPU", param_hint="--device")
    bar = ProgressBar("unpacking", progress)
    with api.open(src, device=device) as f:
        names = f.keys()
        # tied names are stored once, as safetensors.torch.save_model stores shared tensors
        shared = {n: f.entry(n).of for n in names if f.entry(n).kind == "alias"}
        layout = [(n, f.entry(n).dtype, tuple(f.entry(n).shape)) for n in names if n not in shared]
        meta = f.metadata()
        if shared:  # say which names share, for readers that re-tie (transformers does from its config)
            meta[SHARED_KEY] = json.dumps(shared, sort_keys=True)
        done = [len(shared)]

        def tensor(name):  # regenerated (and checked against its digest) one at a time, as the file is written
            t = f.get_tensor(name).contiguous()
            done[0] += 1
            bar(done[0], len(names))
            return t

        def readable(tmp):  # what we publish, safetensors itself must open with the header we meant to write
            from safetensors import safe_open

            from ..errors import FormatError

            try:
                with safe_open(tmp, "pt") as g:
                    got = {k: (g.get_slice(k).get_dtype(), tuple(g.get_slice(k).get_shape())) for k in g.keys()}
            except Exception:  # safetensors' own error type: any refusal is ours to report
                got = None
            if got != {n: (d, s) for n, d, s in layout}:
                raise FormatError("the dense file does not read back as written (a bug: please report it)", path=dst)

        try:
            atomic_write(dst, safetensors_chunks(layout, tensor, meta or None), make_parents=parents,
                         validate=readable)
        finally:
            bar.close()
    click.echo(f"{dst}: {len(layout)} tensors written")
    for name, of in shared.items():
        click.echo(f"  {name} shares {of} (stored once under {of!r})")


def _check_text(what: str, value: str) -> None:
    """Arguments come from argv, where undecodable bytes become lone surrogates: refuse them by name."""
    from ..format.strictjson import valid_text

    if not valid_text(value):
        raise click.BadParameter(f"{value!r} is not valid text in this locale", param_hint=what)


def _parse_inits(pairs):
    for p in pairs:
        _check_text("--init-for", p)
    inits = parse_pairs(pairs, option="--init-for", form="NAME=INIT")
    return {name: None if init in ("whole", "none") else init for name, init in inits.items()}


def _fpk_seed(src) -> int:
    from ..errors import UsageError
    from ..format.reader import open_file

    with open(src, "rb") as f:
        magic = f.read(64)
    if b'"freezepack"' not in magic and b"__metadata__" not in magic:
        raise UsageError("--seed is required (SRC is not a .fpk file, whose seed would be the default)", path=src)
    with open_file(src) as r:
        return r.header.seed


@click.command("convert")
@click.argument("src", type=FilePath())
@click.argument("dst", type=FilePath())
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None,
              help="The seed the model was initialized with (required unless SRC is a .fpk: then its seed).")
@click.option("--init", "init", default="xavier_normal", show_default=True,
              help="Initializer every tensor started from (xavier_normal, kaiming_uniform, pm_sigma, ...).")
@click.option("--init-for", "init_for", multiple=True, metavar="NAME=INIT",
              help="Per-tensor initializer; INIT 'whole' stores that tensor as is. Repeatable.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE",
              help="User metadata to store (added to the source's own metadata, which is kept). Repeatable.")
@click.option("--values", "values", default="f32", show_default=True, metavar="CODING",
              help="Trained values: f32 (lossless) or, lossy and opt-in, bf16, f16, int8, kmeans:K, uniform:K.")
@click.option("--lossy-whole", is_flag=True,
              help="With --values: also code mostly trained and whole float tensors (>= 2 dims) lossily.")
@click.option("--key", default=None, metavar="NAME",
              help="The state dict's entry in a nested .pt checkpoint (dotted: model.ema); found when unique.")
@click.option("--parents", is_flag=True, help="Create DST's missing parent directories (else that is an error).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for scripts).")
@click.option("--quiet", "-q", is_flag=True, help="No per-tensor lines and no summary; warnings still go to stderr.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@one_line_errors
def convert_cmd(src, dst, seed, init, init_for, meta, values, lossy_whole, key, parents, as_json, quiet, progress):
    """Pack a dense checkpoint into an exact .fpk, each tensor in its cheapest exact form.

    \b
    SRC is a .safetensors file, a .fpk, or a .pt/.pth state_dict (read with torch.load(weights_only=True), so
    no code in it can run). For each float32 tensor, entries that still equal the regenerated initial values
    (or all of them times one factor, as FreezeNet-WD leaves them) are frozen, entries that are exactly zero can
    be stored as pruned (the zeros initializer), and the rest are kept as trained values; each tensor is then
    stored frozen or whole, whichever takes fewer file bytes (header included). The output is read back and
    compared with the input bit for bit before it replaces DST; the source's metadata is kept.

    \b
    When almost nothing matches, the seed or the initializer is probably wrong: convert says so (the file is
    still exact, just not small).

    \b
    --values other than f32 quantizes the trained values (never the frozen ones, biases or norms): the file is
    then exact for the quantized model, records the coding, and is proven against it. SRC may be a .fpk, so
    this also shrinks an existing file (its seed is the default --seed).

    \b
    Example:  freezepack convert trained.safetensors model.fpk --seed 1234 --init xavier_normal
              freezepack convert model.fpk model-k4.fpk --values kmeans:4
    """
    from ..format.io import check_regular_file

    for m in meta:
        _check_text("--meta", m)
    metadata = parse_pairs(meta, option="--meta")
    inits = _parse_inits(init_for)
    _check_text("DST", dst)
    check_regular_file(src)
    from ..method.quantize import ValueCoding

    values = None if ValueCoding.parse(values).lossless else values
    if seed is None:
        seed = _fpk_seed(src)
    bar = ProgressBar("converting", progress)
    from ..conversion import convert_checkpoint

    try:
        report = convert_checkpoint(src, dst, seed, init, inits, metadata, progress=bar, make_parents=parents,
                                    values=values, key=key, lossy_whole=lossy_whole)
    finally:
        bar.close()
    for hint in report["hints"]:
        click.echo(f"warning: {dst}: {hint}", err=True)
    if as_json:
        click.echo(json.dumps(report, indent=1, sort_keys=True))
        return
    if quiet:
        return
    for t in report["tensors"]:
        if t["stored_as"] == "alias":
            click.echo(f"  {t['name']}: tied to {t['of']}, stored once")
            continue
        extra = f" q={t['q']:.4f} ({t['init']})" if t["stored_as"] != "whole" else ""
        if "frozen_scale" in t:
            extra += f" x frozen_scale {t['frozen_scale']:.6g}"
        if "values" in t:  # --values: how this tensor's numbers are coded
            extra += f"; values {t['values']}" + (f" ({t['why']})" if "why" in t else "")
        click.echo(f"  {t['name']}: {t['stored_as']}, {t['trainable']} of {t['numel']} stored{extra}")
    factor = report["compression_factor"]
    size = (f"{factor:.1f}x smaller" if factor >= 1.05 else
            f"{1 / factor:.2f}x larger" if factor < 1 else "about the same size")
    coded = sum(t.get("values") == report.get("values") for t in report["tensors"])
    proof = "verified bit-exact" if report.get("values") is None else \
        f"values of {coded} of {len(report['tensors'])} tensors quantized ({report['values']}, lossy), verified " \
        "bit-exact against the quantized checkpoint"
    click.echo(f"{dst}: {_human(report['file_bytes'])} from {_human(report['dense_bytes'])} dense "
               f"({size}), {proof}")


COMMANDS = (inspect_cmd, verify_cmd, unpack_cmd, convert_cmd)
