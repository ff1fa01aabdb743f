"""``freezepack train``: build a FreezeNet (or a baseline), train it on MNIST, test it, save it as .fpk."""
from __future__ import annotations

import json

import click

from ..format.init import INITIALIZERS
from .common import one_line_errors


@click.command("train")
@click.option("--model", "model_name", type=click.Choice(["lenet5", "lenet300"]), default="lenet5",
              show_default=True, help="Architecture: LeNet-5-Caffe or LeNet-300-100 (MNIST).")
@click.option("--method", type=click.Choice(["freezenet", "freezenet-wd", "random", "snip", "grasp", "dense"]),
              default="freezenet", show_default=True,
              help="freezenet: SNIP mask, frozen weights kept at their random init. freezenet-wd: also decays the "
                   "frozen weights. random: random mask. snip/grasp: pruning baselines (frozen = 0). "
                   "dense: train everything.")
@click.option("--q", type=click.FloatRange(0.0, 1.0), default=0.99, show_default=True,
              help="Freezing rate: the share of weights kept frozen (biases and BatchNorm always train).")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
              help="Generator seed: the frozen weights, the split and the data order all follow from it.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="Folder with the four MNIST IDX .gz files  [default: the shipped 10k subset]")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Save the trained network here as .fpk (regenerated bit-exactly on load).")
@click.option("--epochs", type=click.IntRange(1), default=15, show_default=True)
@click.option("--init", type=click.Choice(INITIALIZERS), default="xavier_normal", show_default=True,
              help="Initializer of the weights the mask is computed on (and, without --reinit, trained from).")
@click.option("--reinit", type=click.Choice(INITIALIZERS), default=None,
              help="Re-initialise all weights with this initializer after the mask is chosen (paper sect. 4.5).")
@click.option("--lr", type=float, default=0.1, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True,
              help="On trainable numbers (and on frozen weights with --method freezenet-wd).")
@click.option("--cosine/--constant-lr", default=True, show_default=True, help="Cosine learning-rate schedule.")
@click.option("--device", default=None, help="torch device, e.g. cuda  [default: cpu]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.option("--quiet", is_flag=True, help="No per-epoch progress on stderr.")
@one_line_errors
def train(model_name, method, q, seed, data_dir, out, epochs, init, reinit, lr, weight_decay, cosine, device,
          as_json, quiet):
    """Train a FreezeNet on MNIST and report its test accuracy.

    \b
    The mask is chosen by SNIP saliency on one batch of 100 training images; the top (1-q) share of weights
    (one global threshold) is trained with SGD (momentum 0.9), everything else stays at the generator's values.
    A 9/1 train/validation split picks the best epoch (early stopping).

    \b
    Examples:
      freezepack train --model lenet5 --q 0.99 --seed 7 --out model.fpk
      freezepack train --method snip --q 0.999 --epochs 5 --json
    """
    from .. import api
    from ..experiments.train import TrainConfig, run

    config = TrainConfig(model=model_name, method=method, q=q, seed=seed, epochs=epochs, lr=lr,
                         weight_decay=weight_decay, cosine=cosine, init=init, reinit=reinit)
    r = run(config, data=data_dir, device=device, progress=not quiet)
    result = {"model": model_name, "method": method, "q": r.q, "q_beta": r.q_beta, "seed": seed,
              "test_acc": r.test_acc, "val_acc": r.val_acc, "best_epoch": r.best_epoch, "epochs": r.epochs,
              "trainable": r.trainable, "parameters": r.parameters, "seconds": round(r.seconds, 2)}
    if out is not None:
        meta = {"model": model_name, "method": method, "q": repr(q), "test_acc": f"{r.test_acc:.4f}",
                "epochs": str(r.epochs), "init": init, **({"reinit": reinit} if reinit else {})}
        api.save(out, r.model.cpu(), metadata=meta)
        info = api.inspect(out)
        result.update(out=out, file_bytes=info["file_bytes"], compression_factor=info["compression_factor"])
    if as_json:
        click.echo(json.dumps(result))
        return
    rate = "" if method == "dense" else f" q={r.q:.4g} (q_beta={r.q_beta:.4f})"
    click.echo(f"{model_name} {method}{rate} seed={seed}: test accuracy {100 * r.test_acc:.2f}% "
               f"(best epoch {r.best_epoch}/{r.epochs}, {r.trainable:,} of {r.parameters:,} numbers trained, "
               f"{r.seconds:.0f} s)")
    if out is not None:
        click.echo(f"saved {out}: {result['file_bytes']:,} bytes, {result['compression_factor']:.1f}x smaller "
                   f"than the dense float32 tensors")
