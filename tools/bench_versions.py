"""Format v1 vs v2 on one SNIP-frozen model, measured in one run: file bytes, save time, best-of-3 load time.

    .venv/bin/python tools/bench_versions.py --model vgg16      (or lenet5)

v2 (the default writer) codes masks and values adaptively: smaller files, slower decoding. This prints the ratio.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import freezepack
from freezepack.experiments.models import INPUT_SHAPES, make_model
from freezepack.method.freezenet import make_freezenet


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vgg16", choices=sorted(INPUT_SHAPES))
    ap.add_argument("--q", type=float, default=0.99)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, *INPUT_SHAPES[args.model], generator=g)  # SNIP on random data: no CIFAR offline
    y = torch.randint(0, 10, (16,), generator=g)
    model = make_freezenet(make_model(args.model), (x, y), args.q, seed=7, biases="zeros")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in (1, 2):
            p = os.path.join(tmp, f"v{v}.fpk")
            t0 = time.perf_counter()
            freezepack.save(p, model, version=v)
            save_s = time.perf_counter() - t0
            loads = []
            for _ in range(3):
                t0 = time.perf_counter()
                freezepack.load(p)
                loads.append(time.perf_counter() - t0)
            rows[v] = (os.path.getsize(p), save_s, min(loads))
            print(f"{args.model} q={args.q} v{v}: {rows[v][0]:,} B  save {1e3 * save_s:.0f} ms  "
                  f"load {1e3 * min(loads):.0f} ms (best of 3, digests checked)")
    print(f"v2/v1: size {rows[2][0] / rows[1][0]:.2f}x, load time {rows[2][2] / rows[1][2]:.2f}x")


if __name__ == "__main__":
    main()
