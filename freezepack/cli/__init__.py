"""The ``freezepack`` command. Each concept's commands live in their own module and register here."""
from __future__ import annotations

import click

from .. import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="freezepack")
def cli():
    """Store and ship FreezeNets as seed + initializer + coded mask + trained values.

    \b
    A FreezeNet keeps most weights frozen at their random initial values and trains a few chosen by a SNIP
    saliency mask. A .fpk file stores the seed, the initializer, the ANS-coded mask and the trained numbers;
    loading regenerates the frozen part bit for bit (spec/RNG.md) and checks it against stored digests.
    """


def main() -> None:  # console-script entry point
    cli()

# Each concept's commands live in their own module and only register here.
from .files import COMMANDS as _file_commands  # noqa: E402  (inspect, verify, unpack, convert)
from .fleet import fleet as _fleet  # noqa: E402
from .table2 import table2 as _table2  # noqa: E402
from .train import train as _train  # noqa: E402

for _command in (_fleet, *_file_commands, _table2, _train):
    cli.add_command(_command)
