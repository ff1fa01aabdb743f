"""``freezepack table2``: reproduce the paper's Table 2 (and Table 3 counts, Figure 2) from real saved files."""
from __future__ import annotations

from pathlib import Path

import click

from .common import FilePath, one_line_errors


@click.command("table2")
@click.option("--out", "out_dir", type=FilePath(file_okay=False, path_type=Path), default=Path("runs/table2"),
              show_default=True, help="Folder for the trained .fpk files, table2.json and plots.")
@click.option("--report", type=FilePath(dir_okay=False, path_type=Path), default=None,
              help="Also write the Markdown report here (e.g. docs/RESULTS.md).")
@click.option("--data", type=FilePath(exists=True, file_okay=False), default=None,
              help="IDX directory with the four MNIST files (default: the shipped 8,000/2,000 subset).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds (mean ± std over them).")
@click.option("--epochs", type=click.IntRange(1), default=15, show_default=True)
@click.option("--quick", is_flag=True, help="CI mode: 2 epochs, one seed, Table 3 at q=0.99 only.")
@click.option("--figure/--no-figure", default=False, help="Also sweep q for the Figure 2-style plots.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Beside each FreezeNet, train the narrow dense LeNet-5 with at most its trainable numbers "
                   "(same recipe and seeds; freezepack train --method narrow).")
@click.option("--from-json", "from_json", type=FilePath(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Re-render the report (and plots) from a previous run's table2.json instead of training.")
@one_line_errors
def table2(out_dir, report, data, seeds, epochs, quick, figure, baseline, from_json):
    """Train, save, reload and verify LeNet-5-Caffe FreezeNets, SNIP and dense; print Table 2 beside the paper's.

    \b
    Every "ours" number comes from a real .fpk on disk: trained counts from its header, sizes from the file,
    "bit-exact" from freezepack.verify. Differences to the printed table are explained by the rule that
    reproduces each printed value.
    \b
    Examples:
      freezepack table2 --quick                        # ~1 minute
      freezepack table2 --figure --report docs/RESULTS.md
    """
    from ..experiments.report import plot_figures, render_markdown
    from ..experiments.table2 import load_result, run_table2

    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"seeds must be comma-separated integers, got {seeds!r}") from None
    if quick:
        seed_list, epochs = seed_list[:1], 2
    if from_json is not None:
        res, out_dir = load_result(from_json), from_json.parent
        figure = figure or bool(res.figure_accuracy)
    else:
        res = run_table2(out_dir, seeds=seed_list, epochs=epochs, data=data, quick=quick, figure=figure,
                         baseline=baseline)
    text = render_markdown(res)
    click.echo(text)
    if figure:
        for p in plot_figures(res, out_dir):
            click.echo(f"wrote {p}", err=True)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text, encoding="utf-8")
        click.echo(f"wrote {report}", err=True)
