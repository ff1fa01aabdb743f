"""The README's main job: train a FreezeNet, ship it as a tiny .fpk, reload it bit-exactly, check it still works.

    python -m freezepack.cli.demo     (or ./run demo; the command line lives in freezepack.cli.demo)

LeNet-5-Caffe with 99 % of its weights frozen at freezepack's generator values is trained on the shipped MNIST
subset, saved as seed + initializer + coded mask + trained values, reloaded (on CUDA when available) with the
frozen part regenerated, compared bit for bit with the trained model, and tested again.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
import torch


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"




def demo(data_dir, epochs, out, q, seed):
    from safetensors.torch import save_file

    from .. import api
    from ..method.freezenet import dense_state_dict
    from .data import load_mnist
    from .models import make_model
    from .train import TrainConfig, evaluate, run

    say = click.echo
    train_set, test_set = load_mnist(data_dir)
    say(f"1/4 data: {len(train_set):,} training and {len(test_set):,} test MNIST digits "
        f"({data_dir or 'shipped subset data/mnist-10k'})")
    say(f"2/4 training LeNet-5-Caffe FreezeNet, q={q}, seed={seed}, {epochs} epochs (SNIP mask, SGD, cosine) ...")
    r = run(TrainConfig("lenet5", "freezenet", q, seed, epochs=epochs), datasets=(train_set, test_set),
            progress=True)
    say(f"    {r.trainable:,} of {r.parameters:,} numbers trained (q_beta={r.q_beta:.4f}); "
        f"test accuracy {100 * r.test_acc:.2f}% in {r.seconds:.0f} s")

    model = r.model.cpu().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    api.save(out, model, metadata={"model": "lenet5", "method": "freezenet", "q": repr(q),
                                   "test_acc": f"{r.test_acc:.4f}"})
    trained = dense_state_dict(model)
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = os.path.join(tmp, "dense.safetensors")
        save_file({k: v.contiguous() for k, v in trained.items()}, dense_path)
        dense_bytes = os.path.getsize(dense_path)
    fpk_bytes = out.stat().st_size
    say(f"3/4 saved {out}: {_kib(fpk_bytes)} vs {_kib(dense_bytes)} as dense safetensors "
        f"-> {dense_bytes / fpk_bytes:.1f}x smaller")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    loaded = api.load(out, device=device)
    load_s = time.perf_counter() - t0
    same = set(loaded) == set(trained) and all(torch.equal(loaded[k].cpu(), trained[k]) for k in trained)
    report = api.verify(out, device=device)
    fresh = make_model("lenet5").to(device)
    fresh.load_state_dict(loaded)
    acc = evaluate(fresh, test_set)
    say(f"4/4 reloaded on {device} in {1000 * load_s:.0f} ms (frozen weights regenerated from the seed): "
        f"bit-exact {'yes' if same else 'NO'}, digests {'ok' if report['ok'] else 'FAILED'}, "
        f"test accuracy {100 * acc:.2f}%")
    say("")
    say(f"  LeNet-5-Caffe FreezeNet q={q}: {100 * acc:.2f}% test accuracy, {_kib(fpk_bytes)} on disk, "
        f"compression factor {dense_bytes / fpk_bytes:.1f}x vs dense safetensors ({_kib(dense_bytes)})")
    if not (same and report["ok"] and acc == r.test_acc):
        raise SystemExit("the reloaded model differs from the trained one")

