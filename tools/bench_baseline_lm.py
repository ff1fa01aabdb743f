"""FreezeNet vs a narrow dense model with as many trainable numbers, in two more regimes (issue 22), in one run.

lm      a byte-level causal transformer (pre-LN, 2 layers, d = 128, 4 heads, FFN 4d, context 64, learned positions,
        UNTIED input embedding and output head, no head bias) on Python source that ships with Python: the
        top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]`` in sorted name order, concatenated until
        --corpus-bytes (file list and sha256 are printed; the corpus differs between Python versions). First 90 %
        trains, last 10 % is held out. AdamW (lr 2e-3, betas 0.9/0.95, weight decay 0.01, 50 warm-up steps then
        cosine to 10 %, gradient norm 1), batch 32 random windows of 64 bytes.
resnet  a small ResNet on the shipped MNIST subset: stem conv 3x3, three stages of one basic block each (widths
        16/32/64, stride 1/2/2, 1x1 projection shortcuts), BatchNorm, global average pool, fc; freezepack's MNIST
        recipe (freezepack.experiments.train.train: SGD lr 0.1, momentum 0.9, cosine, weight decay 5e-4, gradient
        norm 1, 9/1 split with early stopping), --resnet-epochs epochs.

Per regime, freezing rate q and seed:
  freezenet  make_freezenet (SNIP mask on one training batch, xavier-normal frozen weights from freezepack's
             generator; the LM's SNIP loss is its next-byte cross-entropy) at the full width.
  narrow     dense, same depth, every width scaled by one factor (LM: d, multiple of 4, heads fixed at 4, FFN 4d;
             ResNet: 16k/32k/64k): the widest whose trainable numbers (all parameters: embeddings, norms, biases
             included) are at most the FreezeNet's. Same initializer, steps/epochs, batches, schedule and seed.

Reported: held-out loss (LM, nats/byte and bits/byte, mean over every position of 64-byte windows) or test accuracy
(ResNet), trainable numbers, .fpk bytes (lossless, and kmeans:4 with the loss/accuracy of the model loaded back
from that file), training seconds (one thread, this machine), multiply-adds per inference (LM: per token at full
context, 12d^2 + 2*64*d per layer + the 256-way head; ResNet: Conv/Linear by hooks). A FreezeNet computes with all
its weights, so it costs what its full-width architecture costs.

    .venv/bin/python tools/bench_baseline_lm.py --regimes lm --seeds 2 --json runs/lm.json          # ~11 CPU-min
    .venv/bin/python tools/bench_baseline_lm.py --regimes resnet --seeds 2 --json runs/resnet.json  # ~9 CPU-min
    .venv/bin/python tools/bench_baseline_lm.py --regimes lm --first-seed 2 --json runs/lm2.json    # one more seed
    .venv/bin/python tools/bench_baseline_lm.py --from-json runs/lm.json runs/lm2.json              # re-render
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import statistics
import sys
import sysconfig
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import freezepack  # noqa: E402
from freezepack.experiments.data import load_mnist, split_train_val  # noqa: E402
from freezepack.experiments.narrow import count_macs  # noqa: E402
from freezepack.experiments.train import SNIP_BATCH, evaluate, train  # noqa: E402
from freezepack.method.freezenet import init_weights, make_freezenet, trainable_count  # noqa: E402

VOCAB, CONTEXT, LAYERS, HEADS, FULL_D = 256, 64, 2, 4, 128
RESNET_FULL = (16, 32, 64)


# ---------------------------------------------------------------- the language model

class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(nn.Module):
    def __init__(self, d: int = FULL_D):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(CONTEXT, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(LAYERS))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)  # untied from self.tok

    def forward(self, idx):
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def lm_params(d: int) -> int:
    return sum(p.numel() for p in ByteLM(d).parameters())


def lm_macs(d: int) -> int:
    return LAYERS * (12 * d * d + 2 * CONTEXT * d) + VOCAB * d


def corpus(limit: int) -> tuple[bytes, list[str]]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    out, used = bytearray(), []
    for f in files:
        if len(out) >= limit:
            break
        with open(f, "rb") as fh:
            out += fh.read()
        used.append(os.path.basename(f))
    return bytes(out[:limit]), used


def lm_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def lm_batch(data: torch.Tensor, n: int, gen: torch.Generator):
    start = torch.randint(0, len(data) - CONTEXT - 1, (n,), generator=gen)
    idx = start[:, None] + torch.arange(CONTEXT + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def lm_eval(model, data: torch.Tensor) -> float:
    """Mean next-byte loss (nats) over non-overlapping 64-byte windows of ``data``, every position counted."""
    model.eval()
    n = (len(data) - 1) // CONTEXT
    total, count = 0.0, 0
    for i in range(0, n, 256):
        starts = torch.arange(i, min(n, i + 256)) * CONTEXT
        w = data[starts[:, None] + torch.arange(CONTEXT + 1)].long()
        total += F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


def lm_train(model, train_data, steps: int, batch: int, lr: float, seed: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = lm_loss(model, lm_batch(train_data, batch, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return time.perf_counter() - t0


def lm_narrow_d(budget: int) -> int | None:
    ds = [d for d in range(HEADS, FULL_D + 1, HEADS) if lm_params(d) <= budget]
    return ds[-1] if ds else None


# ---------------------------------------------------------------- the ResNet

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.short(x))


class SmallResNet(nn.Module):
    def __init__(self, widths=RESNET_FULL):
        super().__init__()
        w1, w2, w3 = widths
        self.stem, self.bn = nn.Conv2d(1, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1)
        self.stages = nn.Sequential(BasicBlock(w1, w1, 1), BasicBlock(w1, w2, 2), BasicBlock(w2, w3, 2))
        self.fc = nn.Linear(w3, 10)

    def forward(self, x):
        x = self.stages(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def resnet_widths(k: int) -> tuple[int, int, int]:
    return (k, 2 * k, 4 * k)


def resnet_narrow(budget: int) -> tuple[int, int, int] | None:
    ws = [resnet_widths(k) for k in range(1, RESNET_FULL[0] + 1)
          if sum(p.numel() for p in SmallResNet(resnet_widths(k)).parameters()) <= budget]
    return ws[-1] if ws else None


# ---------------------------------------------------------------- runs

def stored(model, build, score, tmp: str) -> dict:
    """{coding: [file bytes, score of the model loaded back from that file]}: save, verify, load into a fresh
    plain model (the lossless file is checked to give the trained model's score exactly)."""
    out = {}
    for coding in ("f32", "kmeans:4"):
        path = os.path.join(tmp, "m.fpk")
        freezepack.save(path, model, values=None if coding == "f32" else coding)
        if not freezepack.verify(path)["ok"]:
            raise SystemExit(f"{path} does not verify")
        net = build()
        freezepack.load_into(net, path)
        out[coding] = [os.path.getsize(path), score(net)]
    return out


def run_lm(q: float, seed: int, args, data, tmp: str) -> list[dict]:
    train_data, held = data
    gen = torch.Generator().manual_seed(seed)
    snip = lm_batch(train_data, args.batch, gen)
    rows = []
    torch.manual_seed(seed)
    fz = make_freezenet(ByteLM(), snip, q, seed, "snip", loss_fn=lm_loss, biases="zeros")
    budget = trainable_count(fz)
    d = lm_narrow_d(budget)
    plan = [("freezenet", fz, FULL_D)]
    if d is not None:
        torch.manual_seed(seed)
        plan.append(("narrow", init_weights(ByteLM(d), seed), d))
    for variant, model, width in plan:
        secs = lm_train(model, train_data, args.steps, args.batch, args.lr, seed)
        loss = lm_eval(model, held)
        files = stored(model, lambda w=width: ByteLM(w), lambda m: lm_eval(m, held), tmp)
        if files["f32"][1] != loss:
            raise SystemExit(f"lm {variant}: the lossless file scores {files['f32'][1]} != {loss}")
        rows.append({"regime": "lm", "q": q, "seed": seed, "variant": variant, "width": f"d {width}",
                     "trainable": trainable_count(model), "budget": budget, "macs": lm_macs(width),
                     "seconds": round(secs, 1), "score": loss, "files": files})
    if d is None:
        rows.append({"regime": "lm", "q": q, "seed": seed, "variant": "narrow", "infeasible": lm_params(HEADS)})
    return rows


def run_resnet(q: float, seed: int, args, datasets, tmp: str) -> list[dict]:
    train_full, test = datasets
    tr, va = split_train_val(train_full, seed)
    torch.manual_seed(seed)
    fz = make_freezenet(SmallResNet(), (tr.images[:SNIP_BATCH], tr.labels[:SNIP_BATCH]), q, seed, "snip",
                        biases="zeros")
    budget = trainable_count(fz)
    w = resnet_narrow(budget)
    plan = [("freezenet", fz, RESNET_FULL)]
    if w is not None:
        torch.manual_seed(seed)
        plan.append(("narrow", init_weights(SmallResNet(w), seed), w))
    rows = []
    for variant, model, widths in plan:
        t0 = time.perf_counter()
        train(model, tr, va, epochs=args.resnet_epochs, seed=seed)
        secs = time.perf_counter() - t0
        acc = evaluate(model, test)
        files = stored(model, lambda w=widths: SmallResNet(w), lambda m: evaluate(m, test), tmp)
        rows.append({"regime": "resnet", "q": q, "seed": seed, "variant": variant,
                     "width": "/".join(map(str, widths)), "trainable": trainable_count(model), "budget": budget,
                     "macs": count_macs(SmallResNet(widths)), "seconds": round(secs, 1), "score": acc,
                     "files": files})
    if w is None:
        rows.append({"regime": "resnet", "q": q, "seed": seed, "variant": "narrow",
                     "infeasible": sum(p.numel() for p in SmallResNet(resnet_widths(1)).parameters())})
    return rows


def dump(path, settings, rows) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=1)
        os.replace(path + ".tmp", path)


def report(rows, settings) -> None:
    print(f"torch {settings['torch']}, {settings['threads']} thread(s), seeds {settings['seeds']}"
          + (f"; {settings['seconds']} s in all" if settings.get("seconds") else "") + ".")
    for regime in ("lm", "resnet"):
        rs = [r for r in rows if r["regime"] == regime]
        if not rs:
            continue
        if regime == "lm":
            print(f"\nByte-level LM, {settings['steps']} steps of batch {settings['batch']}, corpus "
                  f"{settings['corpus_bytes']:,} B ({settings['corpus_files']} stdlib files, sha256 "
                  f"{settings['corpus_sha256'][:12]}, Python {settings['python']}), held-out "
                  f"{settings['held_bytes']:,} B:\n")
            print("| q | seed | variant | width | trainable numbers | MACs/token | train s | held-out nats/byte | "
                  "bits/byte | f32 .fpk bytes | kmeans:4 bytes | kmeans:4 nats/byte |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        else:
            print(f"\nSmall ResNet on the shipped MNIST subset, {settings['resnet_epochs']} epochs:\n")
            print("| q | seed | variant | widths | trainable numbers | multiply-adds | train s | test acc % | "
                  "f32 .fpk bytes | kmeans:4 bytes | kmeans:4 acc % |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rs:
            if "infeasible" in r:
                print(f"| {r['q']:g} | {r['seed']} | {r['variant']} | none fits: the narrowest trains "
                      f"{r['infeasible']:,} numbers |" + " |" * (8 if regime == "lm" else 7))
                continue
            f32, km = r["files"]["f32"], r["files"]["kmeans:4"]
            if regime == "lm":
                print(f"| {r['q']:g} | {r['seed']} | {r['variant']} | {r['width']} | {r['trainable']:,} | "
                      f"{r['macs']:,} | {r['seconds']:.0f} | {r['score']:.4f} | {r['score'] / math.log(2):.4f} | "
                      f"{f32[0]:,} | {km[0]:,} | {km[1]:.4f} |")
            else:
                print(f"| {r['q']:g} | {r['seed']} | {r['variant']} | {r['width']} | {r['trainable']:,} | "
                      f"{r['macs']:,} | {r['seconds']:.0f} | {100 * r['score']:.2f} | {f32[0]:,} | {km[0]:,} | "
                      f"{100 * km[1]:.2f} |")


def summary(rows) -> None:
    """Mean ± standard deviation over seeds, per regime, q and variant."""
    print("\nMean ± sd over seeds (LM: held-out nats/byte, lower is better; ResNet: test accuracy %):\n")
    print("| regime | q | variant | width | seeds | trainable numbers | score | f32 .fpk bytes | kmeans:4 bytes | "
          "kmeans:4 score | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    groups: dict = {}
    for r in rows:
        if "infeasible" not in r:
            groups.setdefault((r["regime"], r["q"], r["variant"]), []).append(r)

    def pm(xs, scale):
        xs = [scale * x for x in xs]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.fmean(xs):.4f} ± {sd:.4f}" if scale == 1 else f"{statistics.fmean(xs):.2f} ± {sd:.2f}"

    for (regime, q, variant), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        scale = 1 if regime == "lm" else 100
        print(f"| {regime} | {q:g} | {variant} | {rs[0]['width']} | {len(rs)} | {rs[0]['trainable']:,} | "
              f"{pm([r['score'] for r in rs], scale)} | {statistics.fmean(r['files']['f32'][0] for r in rs):,.0f} | "
              f"{statistics.fmean(r['files']['kmeans:4'][0] for r in rs):,.0f} | "
              f"{pm([r['files']['kmeans:4'][1] for r in rs], scale)} | "
              f"{statistics.fmean(r['seconds'] for r in rs):.0f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", nargs="+", default=["lm", "resnet"], choices=["lm", "resnet"])
    ap.add_argument("--q", type=float, nargs="+", default=[0.9, 0.99])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--steps", type=int, default=1500, help="LM training steps")
    ap.add_argument("--batch", type=int, default=32, help="LM batch (windows of 64 bytes)")
    ap.add_argument("--lr", type=float, default=2e-3, help="LM peak AdamW learning rate")
    ap.add_argument("--corpus-bytes", type=int, default=1_500_000)
    ap.add_argument("--resnet-epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the raw rows here (as they come)")
    ap.add_argument("--from-json", nargs="+", default=None,
                    help="re-render the tables of previous --json runs (rows of all files, settings of the first)")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = []
        for path in args.from_json:
            with open(path) as f:
                saved.append(json.load(f))
        settings = {**saved[0]["settings"], "seconds": None,
                    "seeds": sorted({r["seed"] for s in saved for r in s["rows"]})}
        report([r for s in saved for r in s["rows"]], settings)
        summary([r for s in saved for r in s["rows"]])
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    settings = {"torch": torch.__version__, "threads": args.threads, "seeds": seeds,
                "steps": args.steps, "batch": args.batch, "lr": args.lr, "resnet_epochs": args.resnet_epochs,
                "python": sys.version.split()[0]}
    rows: list[dict] = []
    lm_data = mnist = None
    if "lm" in args.regimes:
        text, files = corpus(args.corpus_bytes)
        cut = len(text) * 9 // 10
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        lm_data = (data[:cut], data[cut:])
        settings.update(corpus_bytes=len(text), corpus_files=len(files), corpus_first=files[0],
                        corpus_last=files[-1], corpus_sha256=hashlib.sha256(text).hexdigest(),
                        held_bytes=len(text) - cut)
        print(f"corpus: {len(text):,} B from {files[0]} .. {files[-1]} ({len(files)} files)", file=sys.stderr)
    if "resnet" in args.regimes:
        mnist = load_mnist()
    with tempfile.TemporaryDirectory() as tmp:
        for regime in args.regimes:
            for seed in settings["seeds"]:  # seed outer: a run cut short keeps whole seeds
                for q in args.q:
                    new = run_lm(q, seed, args, lm_data, tmp) if regime == "lm" else \
                        run_resnet(q, seed, args, mnist, tmp)
                    for r in new:
                        print(f"  {regime} q={q} seed={seed} {r['variant']}: "
                              + ("infeasible" if "infeasible" in r else
                                 f"{r['score']:.4f}, {r['trainable']:,} numbers, {r['files']['f32'][0]:,} B, "
                                 f"{r['seconds']:.0f} s") + f" ({time.perf_counter() - t0:.0f} s so far)",
                              file=sys.stderr, flush=True)
                    rows += new
                    dump(args.json_out, settings, rows)
    settings["seconds"] = round(time.perf_counter() - t0)
    dump(args.json_out, settings, rows)
    report(rows, settings)
    summary(rows)


if __name__ == "__main__":
    main()
