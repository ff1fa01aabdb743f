"""When do FreezeNets pay off? Each FreezeNet beside the dense baseline a skeptic asks for, in one run.

Per model (LeNet-5-Caffe, LeNet-300-100), freezing rate q and seed, on the shipped MNIST subset, all trained with
the same recipe (freezepack.experiments.train: SGD lr 0.1, momentum 0.9, cosine, weight decay 5e-4, gradient
norm 1, 9/1 split with early stopping) and the same seed:

  freezenet   the paper's FreezeNet (SNIP mask, frozen weights at their generator values)
  narrow      dense, same depth, every width scaled by one factor: the widest model with at most the FreezeNet's
              trainable numbers (trainable weight entries + biases; freezepack train --method narrow)
  narrow=B    dense, narrowed to the widest model whose lossless file is at most the FreezeNet's lossless file
              (its budget from the narrow run's bytes per number, 2 % margin; bytes as measured)
  freezenet xK  (--wider K) a FreezeNet of the K-times-wider model (every width x K) at the q' that gives it the
              same trainable numbers: do more frozen random weights buy accuracy at equal trainable numbers?
  dense       (--full-dense) the full-width dense model: what a runtime with a fixed architecture would store

Each trained model is saved as .fpk with each value coding (f32 = lossless; int8, kmeans:K lossy: a FreezeNet's
trained values, a dense model's Linear/Conv weights; biases exact), verified, loaded back and tested: "bytes" and
"acc" are of the real files. Also reported: trainable numbers, multiply-adds of one inference (Linear/Conv, by
hooks; a FreezeNet computes with all its weights) and training seconds (this machine, one thread, one run).

--fleet: the bytes a fleet ships per update (freezepack.fleet deltas between two releases; release 2 = release
1 fine-tuned for one epoch at lr 0.01): FreezeNet vs narrow.

    .venv/bin/python tools/bench_baseline.py                          # LeNet-5 + LeNet-300, q 0.9/0.99/0.999, 3 seeds
    .venv/bin/python tools/bench_baseline.py --models lenet300 --q 0.99 --seeds 1 --epochs 2    (a quick look)
    .venv/bin/python tools/bench_baseline.py --from-json runs/baseline.json     (re-render a previous run)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from fractions import Fraction

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import freezepack  # noqa: E402
from freezepack.experiments.data import load_mnist, split_train_val  # noqa: E402
from freezepack.experiments.models import INPUT_SHAPES, WIDTHS, make_model  # noqa: E402
from freezepack.experiments.narrow import (  # noqa: E402
    base_widths,
    count_macs,
    count_trainable,
    plan,
    plan_for,
    scale,
)
from freezepack.experiments.train import TrainConfig, evaluate, run, train  # noqa: E402

NAMES = {"lenet5": "LeNet-5-Caffe", "lenet300": "LeNet-300-100"}


def stored(model, name: str, widths, coding: str, test, tmp: str) -> tuple[int, float]:
    """(file bytes, test accuracy of what the file holds): save, verify, load into a fresh plain model, test."""
    path = os.path.join(tmp, "m.fpk")
    freezepack.save(path, model, values=None if coding == "f32" else coding)
    if not freezepack.verify(path)["ok"]:
        raise SystemExit(f"{path} does not verify")
    net = make_model(name, **(widths or {}))
    freezepack.load_into(net, path)
    return os.path.getsize(path), evaluate(net, test)


def one(cfg: TrainConfig, variant: str, datasets, codings, tmp: str, extra=None) -> dict:
    r = run(cfg, datasets=datasets)
    row = {"model": cfg.model, "q": cfg.q, "seed": cfg.seed, "variant": variant, "widths": cfg.widths,
           "trainable": r.trainable, "macs": count_macs(r.model, INPUT_SHAPES[cfg.model]),
           "seconds": round(r.seconds, 2), "acc": r.test_acc, "files": {}, **(extra or {})}
    for c in codings:
        row["files"][c] = stored(r.model, cfg.model, cfg.widths, c, datasets[1], tmp)
    row["_model"] = r.model
    return row


def narrowest_bytes(name: str, tmp: str) -> int:
    from freezepack.method.freezenet import init_weights

    path = os.path.join(tmp, "narrowest.fpk")
    freezepack.save(path, init_weights(make_model(name, **scale(base_widths(name), Fraction(0))), 0))
    return os.path.getsize(path)


def wider_q(name: str, widths: dict, budget: int) -> float:
    """The freezing rate at which the model at ``widths`` trains about ``budget`` numbers (floor((1-q)|W|) weights
    + its biases; freezepack.method.saliency)."""
    from freezepack.method.saliency import prunable_weights

    m = make_model(name, **widths)
    weights = sum(w.numel() for w in prunable_weights(m).values())
    others = sum(p.numel() for p in m.parameters()) - weights
    return float(f"{1 - (budget - others) / weights:.9f}") if budget > others else None  # None: biases alone exceed


def _wide(name: str, k: int) -> dict:
    return {n: tuple(k * x for x in v) if isinstance(v, tuple) else k * v for n, v in WIDTHS[name].items()}


def delta_bytes(old: str, new: str) -> int:
    from freezepack.fleet import file_pieces

    have = {p.sha256 for p in file_pieces(old)}
    return sum(p.length for p in file_pieces(new) if p.sha256 not in have)


def fleet_update(row: dict, datasets, tmp: str) -> dict:
    """Release 1 = the trained model; release 2 = it fine-tuned one epoch (lr 0.01, constant): bytes shipped."""
    model = row["_model"]
    r1, r2 = os.path.join(tmp, "r1.fpk"), os.path.join(tmp, "r2.fpk")
    freezepack.save(r1, model)
    tr, va = split_train_val(datasets[0], row["seed"] + 1000)
    train(model, tr, va, epochs=1, lr=0.01, cosine=False, seed=row["seed"] + 1000)
    freezepack.save(r2, model)
    return {"model": row["model"], "q": row["q"], "variant": row["variant"], "trainable": row["trainable"],
            "release_bytes": os.path.getsize(r2), "delta_bytes": delta_bytes(r1, r2),
            "acc_after": evaluate(model, datasets[1])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet5", "lenet300"], choices=sorted(NAMES))
    ap.add_argument("--q", type=float, nargs="+", default=[0.9, 0.99, 0.999])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--codings", nargs="+", default=["f32", "int8", "kmeans:4"])
    ap.add_argument("--full-dense", action="store_true", help="also the full-width dense model (fixed architecture)")
    ap.add_argument("--dense-seeds", type=int, default=None, help="seeds of the full dense model (default --seeds)")
    ap.add_argument("--dense-codings", nargs="+", default=["f32", "kmeans:4", "kmeans:2", "kmeans:1"])
    ap.add_argument("--wider", type=int, default=0, metavar="K", help="also a K-times-wider FreezeNet, same budget")
    ap.add_argument("--variants", nargs="+", default=["freezenet", "narrow", "narrow=B"],
                    help="which of freezenet, narrow, narrow=B to run (the narrow ones need freezenet)")
    ap.add_argument("--hand-picked", nargs=2, action="append", default=[], metavar=("Q", "WIDTHS"),
                    help="also a dense model of these widths beside the FreezeNet at Q, e.g. "
                         "--hand-picked 0.99 conv1=6,conv2=8,fc3=24 (refused if it trains more numbers)")
    ap.add_argument("--fleet", action="store_true", help="also per-update bytes of a fine-tune (seed 0, each q)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the raw rows here")
    ap.add_argument("--from-json", default=None, help="re-render the tables of a previous --json run")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        report(saved["rows"], saved["fleet"], saved["settings"])
        return
    torch.set_num_threads(args.threads)
    datasets = load_mnist()
    rows, fleet, t0 = [], [], time.perf_counter()
    settings = {"epochs": args.epochs, "seeds": list(range(args.seeds)), "threads": args.threads,
                "torch": torch.__version__, "train_images": len(datasets[0]), "test_images": len(datasets[1])}

    def say(row):
        print(f"  {row['model']} q={row['q']} seed={row['seed']} {row['variant']}: {100 * row['acc']:.2f} %, "
              f"{row['trainable']:,} numbers, {row['files'].get('f32', (0,))[0]:,} B ({row['seconds']:.0f} s; "
              f"{time.perf_counter() - t0:.0f} s so far)", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if args.full_dense:
                for seed in range(args.seeds if args.dense_seeds is None else args.dense_seeds):
                    rows.append(one(TrainConfig(name, "dense", 0.0, seed, epochs=args.epochs), "dense", datasets,
                                    args.dense_codings, tmp))
                    say(rows[-1])
                    dump(args.json_out, settings, rows, fleet)
            for q in args.q:
                for seed in range(args.seeds):
                    cfg = TrainConfig(name, "freezenet", q, seed, epochs=args.epochs)
                    fz = one(cfg, "freezenet", datasets, args.codings, tmp)
                    new = [fz]
                    narrowest = count_trainable(name, scale(base_widths(name), Fraction(0)))
                    if "narrow" in args.variants and narrowest > fz["trainable"]:  # no dense model of this depth fits
                        new.append({"model": name, "q": q, "seed": seed, "variant": "narrow", "widths": None,
                                    "infeasible": narrowest, "trainable": narrowest, "files": {}})
                    elif "narrow" in args.variants:
                        p, facts = plan_for(cfg, datasets=datasets)
                        assert facts["max_trainable"] == fz["trainable"], "the budget is the FreezeNet's count"
                        nw = one(TrainConfig(name, "dense", q, seed, epochs=args.epochs, widths=p.widths), "narrow",
                                 datasets, args.codings, tmp, {"budget": facts["max_trainable"],
                                                              "next_trainable": p.next_trainable})
                        new.append(nw)
                    if "narrow=B" in args.variants:
                        # bytes per number of the narrow file (no narrow: of the narrowest model, untrained)
                        per_number = narrowest_bytes(name, tmp) / narrowest if "infeasible" in new[-1] else \
                            nw["files"]["f32"][0] / nw["trainable"]
                        budget = int(0.98 * fz["files"]["f32"][0] / per_number)
                        if budget < narrowest:
                            new.append({"model": name, "q": q, "seed": seed, "variant": "narrow=B", "widths": None,
                                        "infeasible": narrowest, "trainable": narrowest, "files": {}})
                        else:
                            pb = plan(name, budget)
                            new.append(one(TrainConfig(name, "dense", q, seed, epochs=args.epochs,
                                                       widths=pb.widths), "narrow=B", datasets, args.codings, tmp,
                                           {"budget": pb.max_trainable}))
                    for hq, text in args.hand_picked:
                        if float(hq) == q:
                            w = {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}
                            if count_trainable(name, w) > fz["trainable"]:
                                raise SystemExit(f"--hand-picked {text}: more trainable numbers than the FreezeNet")
                            new.append(one(TrainConfig(name, "dense", q, seed, epochs=args.epochs, widths=w),
                                           "narrow, hand-picked", datasets, args.codings, tmp))
                    if args.wider and wider_q(name, _wide(name, args.wider), fz["trainable"]) is not None:
                        wide = _wide(name, args.wider)
                        qw = wider_q(name, wide, fz["trainable"])
                        new.append(one(TrainConfig(name, "freezenet", qw, seed, epochs=args.epochs, widths=wide),
                                       f"freezenet x{args.wider} (q={qw:.5g})",
                                       datasets, args.codings, tmp, {"budget": fz["trainable"], "q_of": q}))
                    for r in new:
                        if "infeasible" not in r:
                            say(r)
                    rows += new
                    if args.fleet and seed == 0:
                        fleet += [fleet_update(r, datasets, tmp) for r in new[:2] if "infeasible" not in r]
                    for r in new:
                        r.pop("_model", None)
                    dump(args.json_out, settings, rows, fleet)
    settings["seconds"] = round(time.perf_counter() - t0)
    report(rows, fleet, settings)
    dump(args.json_out, settings, rows, fleet)


def dump(path, settings, rows, fleet) -> None:
    """Write what is measured so far (a long run that fails late keeps its rows)."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump({"settings": settings, "rows": [{k: v for k, v in r.items() if k != "_model"} for r in rows],
                       "fleet": fleet}, f, indent=1)
        os.replace(path + ".tmp", path)


def _pm(xs) -> str:
    xs = [100 * x for x in xs]
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def _widths(w) -> str:
    if not w:
        return "full"
    return ", ".join(f"{k} {'/'.join(map(str, v)) if isinstance(v, list | tuple) else v}" for k, v in w.items())


def report(rows, fleet, settings) -> None:
    print(f"Shipped MNIST subset ({settings['train_images']:,} training / {settings['test_images']:,} test digits), "
          f"{settings['epochs']} epochs, seeds {settings['seeds']}, torch {settings['torch']}, "
          f"{settings['threads']} thread(s)" + (f"; {settings['seconds']} s in all" if settings.get("seconds") else "")
          + ".\n")
    codings = list(dict.fromkeys(c for r in rows for c in r["files"]))  # every coding, in order of appearance
    groups: dict = {}
    for r in rows:
        q = r.get("q_of", r["q"]) if r["variant"] != "dense" else None
        groups.setdefault((r["model"], q, r["variant"]), []).append(r)
    print("| model | q | variant | widths | trainable numbers | multiply-adds | train s | "
          + " | ".join(f"{c} bytes | {c} acc %" for c in codings) + " |")
    print("|---|---|---|---|---|---|---|" + "---|---|" * len(codings))
    for (model, q, variant), rs in groups.items():
        if "infeasible" in rs[0]:
            print(f"| {NAMES.get(model, model)} | {q:g} | {variant} | none fits: every width 1 trains "
                  f"{rs[0]['infeasible']:,} numbers, more than the FreezeNet's | | | |" + " | |" * len(codings))
            continue
        cells = []
        for c in codings:
            got = [r["files"][c] for r in rs if c in r["files"]]
            cells += [f"{statistics.fmean(b for b, _ in got):,.0f}", _pm([a for _, a in got])] if got else ["", ""]
        ws = {json.dumps(r["widths"]) for r in rs}
        tr = sorted({r["trainable"] for r in rs})
        print(f"| {NAMES.get(model, model)} | {'–' if q is None else f'{q:g}'} | {variant} | "
              f"{_widths(rs[0]['widths']) if len(ws) == 1 else 'per seed'} | "
              f"{tr[0]:,}{'' if len(tr) == 1 else f'–{tr[-1]:,}'} | {rs[0]['macs']:,} | "
              f"{statistics.fmean(r['seconds'] for r in rs):.0f} | " + " | ".join(cells) + " |")
    if fleet:
        print("\nPer-update bytes a fleet ships (freezepack.fleet deltas; release 2 = one epoch of fine-tuning at "
              "lr 0.01, seed 0):\n")
        print("| model | q | variant | trainable numbers | release file bytes | update (delta) bytes | acc after % |")
        print("|---|---|---|---|---|---|---|")
        for f in fleet:
            print(f"| {NAMES.get(f['model'], f['model'])} | {f['q']:g} | {f['variant']} | {f['trainable']:,} | "
                  f"{f['release_bytes']:,} | {f['delta_bytes']:,} | {100 * f['acc_after']:.2f} |")


if __name__ == "__main__":
    main()
