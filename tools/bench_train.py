"""Training benchmark, one run: FreezeNet (q = 0.9 / 0.99 / 0.999) vs dense, LeNet-5-Caffe and VGG16-D.

What a user would otherwise do: train the dense model (``dense``), or emulate FreezeNet by masking the gradients
of dense weights with hooks (``hook``: optimizer state stays dense, and weight decay/momentum still move frozen
entries, so it is not even correct). Reported per model and q, as ratios to dense measured in the same process:

  * optimizer state (SGD momentum buffers): all of it (= 1 - q_beta, biases and BatchNorm always train) and the
    weights' part alone (= 1 - q, goal <= 1.1 x (1 - q));
  * training step time (forward + backward + SGD step), median (and best) of interleaved steps so machine load
    hits every variant alike (goal: no slower than dense).

    .venv/bin/python tools/bench_train.py [--steps 20] [--models lenet5,vgg16] [--device cuda] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from freezepack.experiments.models import INPUT_SHAPES, make_model
from freezepack.method.freezenet import freeze, init_weights, trainable_masks
from freezepack.method.saliency import global_mask, prunable_weights, random_scores

QS = (0.9, 0.99, 0.999)
BATCH = {"lenet5": 100, "vgg16": 32}


def build(model_name, variant, q, device):
    model = make_model(model_name)
    init_weights(model, 0)
    masks = None if variant == "dense" else global_mask(random_scores(model, 0), q, 0)
    if variant == "freezenet":
        freeze(model, masks, 0)
    elif variant == "hook":
        for name, w in prunable_weights(model).items():
            m = masks[name].to(torch.float32).to(device)
            w.register_hook(lambda g, m=m: g * m)
    model.to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          weight_decay=5e-4)
    return model, opt, masks


def step(model, opt, x, y, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def state_numel(opt, model, weights_only: bool):
    weight_params = set()
    for name, p in model.named_parameters():
        if "parametrizations" in name or (name.endswith("weight") and p.ndim >= 2):
            weight_params.add(id(p))
    return sum(s["momentum_buffer"].numel() for p, s in opt.state.items()
               if not weights_only or id(p) in weight_params)


def bench_model(model_name, steps, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH[model_name], *INPUT_SHAPES[model_name], generator=g).to(device)
    y = torch.randint(0, 10, (BATCH[model_name],), generator=g).to(device)
    variants = [("dense", None)] + [(v, q) for q in QS for v in ("freezenet", "hook")]
    built = {key: build(model_name, key[0], key[1], device) for key in variants}
    times = {key: [] for key in variants}
    for model, opt, _ in built.values():  # warm-up, also creates the optimizer state
        step(model, opt, x, y, device)
    for _ in range(steps):
        for key, (model, opt, _) in built.items():
            times[key].append(step(model, opt, x, y, device))
    med = {key: statistics.median(v) for key, v in times.items()}
    dense_model, dense_opt, _ = built[("dense", None)]
    dense_all, dense_w = state_numel(dense_opt, dense_model, False), state_numel(dense_opt, dense_model, True)
    rows = []
    for (variant, q), (model, opt, _masks) in built.items():
        best = min(times[(variant, q)])
        row = {"model": model_name, "variant": variant, "q": q, "step_ms": 1000 * med[(variant, q)],
               "step_vs_dense": med[(variant, q)] / med[("dense", None)],
               "best_step_vs_dense": best / min(times[("dense", None)]),
               "state_vs_dense": state_numel(opt, model, False) / dense_all,
               "weight_state_vs_dense": state_numel(opt, model, True) / dense_w}
        if q is not None:
            row["weight_state_over_1_minus_q"] = row["weight_state_vs_dense"] / (1 - q)
            if variant == "freezenet":
                assert sum(int(m.sum()) for m in trainable_masks(model).values()) == \
                    state_numel(opt, model, True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (interleaved)")
    ap.add_argument("--models", default="lenet5,vgg16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [r for m in args.models.split(",") for r in bench_model(m.strip(), args.steps, device)]
    if args.json:
        print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "steps": args.steps,
                          "rows": rows}, indent=1))
        return
    print(f"device {device}, {torch.get_num_threads()} threads, median of {args.steps} interleaved steps; "
          f"ratios are to dense in this run")
    print(f"{'model':7} {'variant':10} {'q':>6} {'step ms':>9} {'step/dense':>11} {'best/best':>10} {'opt state':>10} "
          f"{'weights':>9} {'weights/(1-q)':>14}")
    for r in rows:
        q = "-" if r["q"] is None else f"{r['q']:g}"
        w1q = f"{r['weight_state_over_1_minus_q']:.3f}" if r["q"] is not None else "-"
        print(f"{r['model']:7} {r['variant']:10} {q:>6} {r['step_ms']:9.2f} {r['step_vs_dense']:11.3f} "
              f"{r['best_step_vs_dense']:10.3f} {r['state_vs_dense']:10.5f} {r['weight_state_vs_dense']:9.5f} "
              f"{w1q:>14}")


if __name__ == "__main__":
    main()
