"""``./run demo`` (``python -m freezepack.cli.demo``): the command line of freezepack.experiments.demo.

It lives in the CLI layer so that imports point down the layer table only (README "Layout").
"""
from __future__ import annotations

import click

from .common import FilePath, one_line_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--data", "data_dir", type=FilePath(file_okay=False), default=None,
              help="Folder with the four MNIST IDX .gz files  [default: the shipped 10k subset]")
@click.option("--epochs", type=click.IntRange(1), default=15, show_default=True,
              help="Training epochs (about 2-6 s each on 2 CPU cores).")
@click.option("--out", type=FilePath(dir_okay=False), default="out/lenet5_freezenet_q0.99.fpk",
              show_default=True, help="Where to write the .fpk file.")
@click.option("--q", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.99, show_default=True,
              help="Freezing rate: the share of weights that stay frozen.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=7, show_default=True)
@one_line_errors
def main(data_dir, epochs, out, q, seed):
    """Train a LeNet-5-Caffe FreezeNet on MNIST, save it as .fpk, reload it bit-exactly and test it."""
    from ..experiments.demo import demo

    demo(data_dir, epochs, out, q, seed)


if __name__ == "__main__":
    main()
