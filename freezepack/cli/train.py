"""``freezepack train``: build a FreezeNet (or a baseline), train it on MNIST, test it, save it as .fpk."""
from __future__ import annotations

import dataclasses
import json

import click

from ..format.init import INITIALIZERS
from .common import FilePath, one_line_errors


@click.command("train")
@click.option("--model", "model_name", default="lenet5", show_default=True, metavar="NAME|module:Class",
              help="Architecture: lenet5 (LeNet-5-Caffe), lenet300 (LeNet-300-100), or your own model as "
                   "package.module:Class (a class or factory called with no arguments; it gets MNIST batches "
                   "(N, 1, 28, 28) and must return 10 logits). module:Class IMPORTS AND RUNS that module's code "
                   "with your permissions, like `python -c 'import module'`: use only code you trust.")
@click.option("--method", type=click.Choice(["freezenet", "freezenet-wd", "random", "snip", "grasp", "dense",
                                            "narrow"]),
              default="freezenet", show_default=True,
              help="freezenet: SNIP mask, frozen weights kept at their random init. freezenet-wd: also decays the "
                   "frozen weights. random: random mask. snip/grasp: pruning baselines (frozen = 0). "
                   "dense: train everything. narrow: the baseline to beat: a dense model of the same depth, every "
                   "width scaled by one factor, the widest with at most the trainable numbers of the FreezeNet "
                   "at --q (same seed), trained the same way.")
@click.option("--q", type=click.FloatRange(0.0, 1.0), default=0.99, show_default=True,
              help="Freezing rate: the share of weights kept frozen (biases and BatchNorm always train).")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
              help="Generator seed: the frozen weights, the split and the data order all follow from it.")
@click.option("--data", "data_dir", type=FilePath(file_okay=False), default=None,
              help="Folder with the four MNIST IDX .gz files  [default: the shipped 10k subset]")
@click.option("--out", type=FilePath(dir_okay=False, writable=True), default=None,
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
@click.option("--nproc", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Data-parallel ranks on this machine (torch DistributedDataParallel; gloo on CPU, nccl with "
                   "--device cuda: one GPU per rank). Each rank trains on its shard of every batch; only the "
                   "trainable values' gradients are all-reduced. For several machines start this command under "
                   "torchrun instead (docs/DISTRIBUTED.md).")
@click.option("--collective-timeout", "timeout", type=click.FloatRange(min=1.0), default=300.0, show_default=True,
              metavar="SECONDS",
              help="Data-parallel: how long a rank waits for the others (agreement check, all-reduce) before the "
                   "run ends with an error instead of hanging. The ranks first prove they share every option "
                   "that changes the result and the data's contents; a difference is a one-line error.")
@click.option("--values", "values", default="f32", show_default=True, metavar="CODING",
              help="How --out stores the trained values: f32 (lossless) or, lossy, bf16, f16, int8, kmeans:K, "
                   "uniform:K (the accuracy of the stored model is then reported too).")
@click.option("--finetune", type=click.IntRange(0), default=0, show_default=True, metavar="EPOCHS",
              help="With --values kmeans:K: epochs of Deep Compression's shared-value fine-tuning before saving.")
@click.option("--width-arg", "width_args", multiple=True, metavar="NAME[=FULL]",
              help="--method narrow with your own module:Class: a constructor argument that sets layer widths "
                   "(an int; FULL = its full width, default its default value). Repeat for several; all are "
                   "scaled by one factor. Default: an int argument named `width`.")
@click.option("--max-trainable", type=click.IntRange(1), default=None, metavar="N",
              help="--method narrow: budget of trainable numbers (default: the FreezeNet's at --q, i.e. its "
                   "trainable weight entries + biases + norm parameters).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.option("--quiet", is_flag=True, help="No per-epoch progress on stderr.")
@one_line_errors
def train(model_name, method, q, seed, data_dir, out, epochs, init, reinit, lr, weight_decay, cosine, device,
          nproc, timeout, values, finetune, width_args, max_trainable, as_json, quiet):
    """Train a FreezeNet on MNIST and report its test accuracy.

    \b
    The mask is chosen by SNIP saliency on one batch of 100 training images; the top (1-q) share of weights
    (one global threshold) is trained with SGD (momentum 0.9), everything else stays at the generator's values.
    A 9/1 train/validation split picks the best epoch (early stopping).

    \b
    Examples:
      freezepack train --model lenet5 --q 0.99 --seed 7 --out model.fpk
      freezepack train --method snip --q 0.999 --epochs 5 --json
      freezepack train --nproc 2 --q 0.99 --out model.fpk          (2 data-parallel ranks)
      freezepack train --q 0.99 --values kmeans:4 --out small.fpk  (lossy values, 16 per tensor)
      freezepack train --values kmeans:3 --finetune 1 --out tiny.fpk (+ 1 epoch of shared-value fine-tuning)
      torchrun --nproc-per-node 4 -m freezepack train --out model.fpk

    \b
    The baseline to compare with (same recipe, seed, and at most the FreezeNet's trainable numbers):
      freezepack train --method narrow --q 0.99 --out narrow.fpk       (LeNet-5 at 0.1x width, dense)
      freezepack train --method narrow --q 0.99 --values kmeans:4 --out narrow-k4.fpk
      freezepack train --method narrow --model mypkg.nets:MLP --width-arg hidden --q 0.9
    """
    from ..errors import DistributedError
    from ..experiments.launch import launch, under_torchrun
    from ..method.quantize import ValueCoding

    values = None if ValueCoding.parse(values).lossless else values
    if values is not None and out is None:
        raise click.BadParameter("--values says how --out stores the model: give --out too", param_hint="--values")
    if finetune and (values is None or ValueCoding.parse(values).kind != "kmeans"):
        raise click.BadParameter("fine-tuning shares values within k-means clusters: use it with --values kmeans:K",
                                 param_hint="--finetune")

    if finetune and method == "narrow":
        raise click.BadParameter("shared-value fine-tuning needs a FreezeNet's values; --method narrow stores its "
                                 "quantized weights without it", param_hint="--finetune")
    if (width_args or max_trainable) and method != "narrow":
        raise click.BadParameter("--width-arg and --max-trainable shape the narrow baseline: add --method narrow",
                                 param_hint="--width-arg/--max-trainable")
    opts = dict(model_name=model_name, method=method, q=q, seed=seed, data=data_dir, out=out, epochs=epochs,
                init=init, reinit=reinit, lr=lr, weight_decay=weight_decay, cosine=cosine, device=device,
                progress=not quiet, distributed=nproc > 1 or under_torchrun(), values=values,
                finetune=finetune, timeout=timeout, **({"width_args": width_args, "max_trainable": max_trainable}
                                                       if method == "narrow" else {}))
    if under_torchrun():
        if nproc > 1:
            raise DistributedError("--nproc starts its own workers; under torchrun leave it out")
        result = train_job(opts)
    elif nproc > 1:
        results = launch(nproc, train_job, opts)
        result = results[0]
        failed = [(r, v["error"]) for r, v in sorted(results.items()) if "error" in v]
        if failed and len(failed) == len(results) and len({m for _, m in failed}) == 1:
            raise DistributedError(failed[0][1])  # the same line on every rank (it names the ranks itself)
        if failed:
            raise DistributedError(f"rank {failed[0][0]}: {failed[0][1]}")
    else:
        result = train_job(opts)
    if "error" in result:
        raise DistributedError(result["error"])
    if not result.get("rank0", True):
        return  # a torchrun worker other than rank 0: rank 0 reports (and saved the file)
    result.pop("rank0", None)
    out, r = result.get("out"), result
    if as_json:
        click.echo(json.dumps(result))
        return
    rate = "" if method in ("dense", "narrow") else f" q={r['q']:.4g} (q_beta={r['q_beta']:.4f})"
    ranks = f", {r['ranks']} ranks" if "ranks" in r else ""
    click.echo(f"{model_name} {method}{rate} seed={seed}: test accuracy {100 * r['test_acc']:.2f}% "
               f"(best epoch {r['best_epoch']}/{r['epochs']}, {r['trainable']:,} of {r['parameters']:,} numbers "
               f"trained, {r['seconds']:.0f} s{ranks})")
    if method == "narrow":
        click.echo(f"narrow: {r['widths_text']} ({r['width_factor']:.3g}x the widths): {r['trainable']:,} trainable "
                   f"numbers <= {r['max_trainable']:,}{r['budget_from']}; one step wider: "
                   f"{r['next_trainable'] or 0:,}; {r['macs']:,} multiply-adds per image")
    if out is not None:
        click.echo(f"saved {out}: {result['file_bytes']:,} bytes, {result['compression_factor']:.1f}x smaller "
                   f"than the dense float32 tensors")
    if "stored_test_acc" in result:
        tuned = f" after {finetune} epoch(s) of fine-tuning" if finetune else ""
        click.echo(f"stored with {values} values{tuned}: test accuracy {100 * result['stored_test_acc']:.2f}% "
                   f"({100 * (result['stored_test_acc'] - r['test_acc']):+.2f} points)")


def train_job(opts: dict) -> dict:
    """Train, test and (on rank 0) save one network; returns the result as a dict.

    Runs in-process, in each ``--nproc`` worker (spawned by torch's launcher) and in each torchrun worker. A
    FreezepackError becomes ``{"error": message}`` so the parent can report it as one line.
    """
    from .. import api
    from ..errors import FreezepackError
    from ..experiments.train import TrainConfig, run

    opts = dict(opts)
    distributed, out, values = opts.pop("distributed"), opts.pop("out"), opts.pop("values", None)
    finetune, timeout = opts.pop("finetune", 0), opts.pop("timeout", None)
    narrow_opts = {k: opts.pop(k) for k in ("width_args", "max_trainable") if k in opts}
    model_name, method, q, seed = opts.pop("model_name"), opts["method"], opts["q"], opts["seed"]
    rank, world = 0, 1
    try:
        if distributed:
            import torch.distributed as dist

            from ..experiments.launch import init_worker

            opts["device"] = init_worker(opts["device"], timeout=timeout)
            rank, world = dist.get_rank(), dist.get_world_size()
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        config = TrainConfig(model=model_name, **{k: v for k, v in opts.items() if k in fields})
        narrow: dict = {}
        if method == "narrow":  # the dense baseline: same recipe and seed, narrowed to the FreezeNet's budget
            from ..experiments.narrow import plan_for

            plan, narrow = plan_for(config, opts["data"], **narrow_opts)
            config = dataclasses.replace(config, method="dense", widths=plan.widths)
        extra = {k: v for k, v in opts.items() if k not in fields}
        if distributed:  # what only rank 0 uses still changes the file: every rank must have been started alike
            extra.update(shared={"values": values, "finetune": finetune}, timeout=timeout)
        r = run(config, distributed=distributed, **extra)
        result = {"model": model_name, "method": method, "q": r.q, "q_beta": r.q_beta, "seed": seed,
                  "test_acc": r.test_acc, "val_acc": r.val_acc, "best_epoch": r.best_epoch, "epochs": r.epochs,
                  "trainable": r.trainable, "parameters": r.parameters, "seconds": round(r.seconds, 2),
                  "macs": _macs(r.model, model_name), **narrow}
        if distributed:
            from ..method.distributed import frozen_digest, state_digest

            result.update(ranks=world, rank0=rank == 0, state_sha256=state_digest(r.model),
                          frozen_sha256=frozen_digest(r.model))
        if out is not None and rank == 0:  # one writer; api.save is atomic (temp file, fsync, rename)
            init, reinit = opts["init"], opts["reinit"]
            meta = {"model": model_name, "method": method, "q": repr(q), "test_acc": f"{r.test_acc:.4f}",
                    "epochs": str(r.epochs), "init": init, **({"reinit": reinit} if reinit else {}),
                    **({"widths": json.dumps(narrow["widths"])} if narrow else {})}
            if finetune:  # Deep Compression: quantize, then train the shared values (clusters fixed)
                _finetune(r.model.cpu(), values, finetune, opts["data"], seed)
            from .common import ProgressBar

            with ProgressBar("saving", None if opts.get("progress", True) else False) as bar:  # a bar on a terminal
                api.save(out, r.model.cpu(), metadata=meta, values=values, progress=bar)
            info = api.inspect(out)
            result.update(out=out, file_bytes=info["file_bytes"], compression_factor=info["compression_factor"])
            if values is not None:  # the stored model is not the trained one: test what the file holds
                from ..experiments.data import load_mnist
                from ..experiments.models import make_model
                from ..experiments.train import evaluate

                stored = api.load_freezenet(make_model(model_name, **(config.widths or {})), out)
                result.update(values=values, stored_test_acc=evaluate(stored, load_mnist(opts["data"])[1]))
        return result
    except FreezepackError as e:
        if not distributed:
            raise
        return {"error": str(e), "rank0": rank == 0}
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()



def _macs(model, model_name: str) -> int:
    """Multiply-adds of one inference (a FreezeNet computes with all its weights: its architecture's count)."""
    from ..experiments.models import INPUT_SHAPES
    from ..experiments.narrow import count_macs

    return count_macs(model, INPUT_SHAPES.get(model_name, (1, 28, 28)))


def _finetune(model, values: str, epochs: int, data_dir, seed: int) -> None:
    from ..experiments.data import load_mnist, split_train_val
    from ..experiments.train import finetune_quantized

    train_split, _ = split_train_val(load_mnist(data_dir)[0], seed)
    finetune_quantized(model, values, train_split, epochs=epochs, seed=seed)
