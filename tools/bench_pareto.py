"""Size-accuracy trade-off of FreezeNet files: LeNet-5-Caffe on the shipped MNIST subset, freezing rate q x value
coding, several seeds, measured in one run (real files: every size is a saved, verified .fpk).

    .venv/bin/python tools/bench_pareto.py                      # q 0.99 0.995 0.999, 3 seeds (~10 min, 2 cores)
    .venv/bin/python tools/bench_pareto.py --q 0.99 --seeds 1 --epochs 3   (a quick look)

Value codings (freezepack.method.quantize): f32 is the lossless file; bf16, int8, kmeans:K are opt-in lossy; "+ft"
= Deep Compression's fine-tuning of the shared values (one epoch of plain SGD on the training split, each value
tied to its cluster's mean after every step). Accuracy is on the 2,000 test images; "drop" is against the same
seed's lossless file. The dense safetensors reference is the same network's float32 tensors.

The competitor lines are the issue's measurements of the ISO/IEC 15938-17 reference codec (nncodec 2.1.3,
DeepCABAC) on a SNIP-pruned LeNet-5-Caffe at q = 0.99 on the same subset; they are cited, not re-measured here
(nncodec needs torchvision, which does not load against the CPU torch of this project).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import freezepack
from freezepack.experiments.data import load_mnist, split_train_val
from freezepack.experiments.train import TrainConfig, evaluate, finetune_quantized, run

CODINGS = ["f32", "bf16", "int8", "kmeans:5", "kmeans:4", "kmeans:3", "kmeans:2"]
FINETUNED = ["kmeans:4", "kmeans:3", "kmeans:2"]
NNC = [("nncodec (DeepCABAC) qp -38, SNIP q=0.99", 11_360, 0.9575), ("nncodec (DeepCABAC) qp -26, SNIP q=0.99",
                                                                       9_646, 0.9550)]


def measure(model, coding: str, test, tmp: str, tag: str) -> tuple[int, float]:
    """(file bytes, test accuracy of what the file holds): save, verify, load back into a fresh LeNet, test."""
    from freezepack.experiments.models import make_model

    path = os.path.join(tmp, f"{tag}.fpk")
    freezepack.save(path, model, values=None if coding == "f32" else coding)
    if not freezepack.verify(path)["ok"]:
        raise SystemExit(f"{path} does not verify")
    stored = freezepack.load_freezenet(make_model("lenet5"), path).eval()
    return os.path.getsize(path), evaluate(stored, test)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q", type=float, nargs="+", default=[0.99, 0.995, 0.999])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--data", default=None, help="IDX directory (default: the shipped MNIST subset)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the raw rows here")
    args = ap.parse_args(argv)
    train_full, test = load_mnist(args.data)
    t0 = time.perf_counter()
    rows = []  # (q, coding, seed, bytes, acc)
    dense = None
    with tempfile.TemporaryDirectory() as tmp:
        for q in args.q:
            for seed in range(args.seeds):
                r = run(TrainConfig(model="lenet5", q=q, seed=seed, epochs=args.epochs), datasets=(train_full, test))
                if dense is None:
                    sd = freezepack.load(_save(tmp, r.model))
                    dense = sum(v.numel() * v.element_size() for v in sd.values())
                for coding in CODINGS:
                    size, acc = measure(r.model, coding, test, tmp, f"{q}-{seed}-{coding}")
                    rows.append((q, coding, seed, size, acc))
                tr, _ = split_train_val(train_full, seed)
                for coding in FINETUNED:
                    m = copy.deepcopy(r.model)
                    finetune_quantized(m, coding, tr, seed=seed)
                    size, acc = measure(m, coding, test, tmp, f"{q}-{seed}-{coding}-ft")
                    rows.append((q, coding + "+ft", seed, size, acc))
                print(f"  q={q} seed={seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    report(rows, dense, args)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"dense_bytes": dense, "rows": rows}, f, indent=1)


def _save(tmp, model) -> str:
    p = os.path.join(tmp, "dense-ref.fpk")
    freezepack.save(p, model)
    return p


def report(rows, dense: int, args) -> None:
    by = {}
    for q, coding, seed, size, acc in rows:
        by.setdefault((q, coding), []).append((seed, size, acc))
    base = {(q, seed): acc for q, coding, seed, size, acc in rows if coding == "f32"}
    print(f"LeNet-5-Caffe on the shipped MNIST subset, {args.seeds} seeds, {args.epochs} epochs; dense float32 "
          f"safetensors tensors {dense:,} B\n")
    print("| q | values | file bytes (mean) | x smaller than dense | test accuracy % (mean ± sd) "
          "| drop vs lossless (pp) |")
    print("|---|---|---|---|---|---|")
    points = []
    for (q, coding), xs in by.items():
        sizes = [s for _, s, _ in xs]
        accs = [100 * a for _, _, a in xs]
        drops = [100 * (base[(q, seed)] - a) for seed, _, a in xs]
        size = statistics.fmean(sizes)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        points.append((size, statistics.fmean(accs), q, coding))
        print(f"| {q} | {coding} | {size:,.0f} | {dense / size:.0f}x | {statistics.fmean(accs):.2f} ± {sd:.2f} | "
              f"{statistics.fmean(drops):+.2f} |".replace("+-", "-"))
    for name, size, acc in NNC:
        print(f"| (cited) | {name} | {size:,} | {dense / size:.0f}x | {100 * acc:.2f} | |")
    front = [p for p in points if not any(o[0] <= p[0] and o[1] > p[1] or o[0] < p[0] and o[1] >= p[1]
                                          for o in points)]
    print("\nPareto front (smallest file for its accuracy):")
    for size, acc, q, coding in sorted(front):
        beats = [n for n, s, a in NNC if size < s and acc >= 100 * a]
        print(f"  q={q} {coding}: {size:,.0f} B, {acc:.2f} %" + (f"  (smaller and at least as accurate as "
                                                                 f"{len(beats)} NNC point(s))" if beats else ""))


if __name__ == "__main__":
    main()
