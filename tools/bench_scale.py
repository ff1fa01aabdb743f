"""Scale benchmark, one run: GPT-2-shaped FreezeNets (tied head, q = 0.99) made, saved and loaded with freezepack,
against what a user does otherwise, at one or more sizes.

Every size runs in fresh subprocesses (one for making + saving, one for the random mask, one for loading), so no
step inherits another's memory. Inside a process each step starts with a reset of the peak-RSS counter
(``/proc/self/clear_refs`` = 5, then VmHWM), so "peak" is the step's own high-water mark. Reported per step:

  make (SNIP)     make_freezenet with SNIP on one batch    vs  build the model (torch init) + one forward/backward
  make (random)   make_freezenet with a random mask        vs  build the model (torch init)
  save            freezepack.save (coded + read-back proof) vs  safetensors save_file of the dense state_dict
  load verified   freezepack.load(verify=True)             vs  read the file + safetensors.torch.load
  load unverified freezepack.load(verify=False)            vs  the same
  load_into meta  load_into a model built on the meta device (no dense init at all), onto CPU
  convert         freezepack.convert of the model's dense safetensors  vs  read + load + save_file it again
and for each: seconds, the ratio, peak RSS above the step's start (x the dense float32 size), and with two or more
sizes, the growth of each step's seconds per parameter from the smallest to the largest (1.0 = linear).

The model is plain torch (no transformers needed): token + position embeddings, n_layer pre-LN blocks (qkv, proj,
fc, fc-proj Linears), a final LayerNorm and a head tied to the token embedding.

    .venv/bin/python tools/bench_scale.py                       # GPT-2 small (124 M), a few minutes on 2 cores
    .venv/bin/python tools/bench_scale.py --sizes small,x3.5    # and a 430 M model (3.5x; needs ~8 GB, long)
    .venv/bin/python tools/bench_scale.py --sizes tiny          # a 10 M smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# (n_layer, d_model, vocab, n_ctx): GPT-2 small, a 3.5x one (GPT-2-medium width, 30 layers), and a smoke size
SIZES = {"tiny": (2, 256, 8192, 256), "small": (12, 768, 50257, 1024), "x3.5": (30, 1024, 50257, 1024)}
BATCH, SEQ = 2, 128  # the scoring batch: 256 tokens


def build_model(size: str, device=None):
    import torch
    from torch import nn
    from torch.nn import functional as F

    n_layer, d, vocab, n_ctx = SIZES[size]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.heads = d // 64

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, self.heads, 64).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.c_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(n_ctx, d)
            self.h = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.lm_head.weight = self.wte.weight  # tied, as GPT-2

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for block in self.h:
                x = block(x)
            return self.lm_head(self.ln_f(x))

    with torch.device(device or "cpu"):
        return GPT()


def lm_loss(model, batch):
    from torch.nn import functional as F

    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _batch(size):
    import torch

    return torch.randint(0, SIZES[size][2], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------------
# inside a worker process
# ---------------------------------------------------------------------------------------------------------------

def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Step:
    """Time and peak RSS above the start of one step (VmHWM reset first; on kernels without it, the process peak)."""

    def __init__(self, out: dict, key: str):
        self.out, self.key = out, key

    def __enter__(self):
        import ctypes
        import gc

        gc.collect()
        try:  # hand freed heap back to the OS, so the step's peak above its start is its own
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.rss0 = _rss_kb("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        self.out[self.key] = {"s": dt, "peak_above_start_mb": (_rss_kb("VmHWM") - self.rss0) / 1024}
        return False


def worker(kind: str, size: str, workdir: str) -> dict:
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save_file

    import freezepack
    from freezepack.method.freezenet import dense_state_dict, make_freezenet

    res: dict = {}
    fpk, st = os.path.join(workdir, f"{size}.fpk"), os.path.join(workdir, f"{size}.safetensors")
    batch = _batch(size)
    if kind == "make":
        with Step(res, "baseline_make_snip"):  # what a user pays anyway: build + one forward/backward
            model = build_model(size)
            lm_loss(model, batch).backward()
        del model
        with Step(res, "baseline_build"):
            model = build_model(size)
        res["parameters"] = sum(p.numel() for p in model.parameters())
        with Step(res, "make_snip"):
            make_freezenet(model, batch, q=0.99, seed=1, method="snip", loss_fn=lm_loss)
        dense = {k: v.contiguous() for k, v in dense_state_dict(model).items() if k != "lm_head.weight"}
        with Step(res, "baseline_save"):
            save_file(dense, st)
        del dense
        with Step(res, "save"):
            freezepack.save(fpk, model)
        res["fpk_bytes"], res["safetensors_bytes"] = os.path.getsize(fpk), os.path.getsize(st)
    elif kind == "random":
        model = build_model(size)
        with Step(res, "make_random"):
            make_freezenet(model, None, q=0.99, seed=1, method="random")
    elif kind == "load":
        for _ in range(2):  # the second of each: a warm page cache for both, as a user's repeated load sees
            with Step(res, "baseline_load"):
                with open(st, "rb") as f:
                    sd = st_load(f.read())
            del sd
            with Step(res, "load_verified"):
                sd = freezepack.load(fpk)
            del sd
            with Step(res, "load_unverified"):
                sd = freezepack.load(fpk, verify=False)
            del sd
        with Step(res, "baseline_convert"):  # a dense format conversion: read, load, write again
            with open(st, "rb") as f:
                sd = st_load(f.read())
            save_file(sd, os.path.join(workdir, "resaved.safetensors"))
        del sd
        with Step(res, "convert"):  # the dense FreezeNet back to a .fpk: match, code, prove
            freezepack.convert(st, os.path.join(workdir, "converted.fpk"), seed=1)
        with torch.device("meta"):  # torch's first meta init (normal_) imports sympy & co (~2 s): not ours to time
            torch.nn.Embedding(2, 2)
        try:
            with Step(res, "load_into_meta"):
                model = build_model(size, device="meta")
                freezepack.load_into(model, fpk, device="cpu")
        except (TypeError, freezepack.FreezepackError) as e:  # a freezepack without meta-device load_into
            res.pop("load_into_meta", None)
            res["load_into_meta_error"] = str(e)
    res["threads"] = torch.get_num_threads()
    return res


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------

ROWS = [  # (label, freezepack step, baseline step, goal ratio)
    ("make (SNIP)", "make_snip", "baseline_make_snip", 3.0),
    ("make (random mask)", "make_random", "baseline_build", 2.0),
    ("save", "save", "baseline_save", 2.0),
    ("load, verified", "load_verified", "baseline_load", 1.0),
    ("load, unverified", "load_unverified", "baseline_load", 0.5),
    ("load_into (meta model)", "load_into_meta", "baseline_load", None),
    ("convert (dense -> .fpk)", "convert", "baseline_convert", None),
]


def _run(kind, size, workdir, timeout):
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--size", size, "--workdir", workdir],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"worker {kind}/{size} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small", help=f"comma-separated, from {', '.join(SIZES)} (default: small)")
    ap.add_argument("--no-random", action="store_true", help="skip the random-mask make (slow before issue 19)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:  # the freezepack of this checkout, not whichever one is installed
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        print(json.dumps(worker(args.worker, args.size, args.workdir)))
        return
    sizes = [s for s in args.sizes.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"unknown size {s!r} (known: {', '.join(SIZES)})")
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for s in sizes:
            r = _run("make", s, workdir, args.timeout)
            if not args.no_random:
                r.update(_run("random", s, workdir, args.timeout))
            r.update(_run("load", s, workdir, args.timeout))
            os.remove(os.path.join(workdir, f"{s}.safetensors"))
            results[s] = r
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for s, r in results.items():
        dense_mb = r["safetensors_bytes"] / 2**20
        print(f"\n{s}: {r['parameters'] / 1e6:.1f} M parameters, dense {dense_mb:.0f} MB, .fpk "
              f"{r['fpk_bytes'] / 2**20:.2f} MB ({r['safetensors_bytes'] / r['fpk_bytes']:.0f}x smaller), "
              f"{r['threads']} torch threads")
        print(f"{'step':24} {'freezepack':>11} {'otherwise':>10} {'ratio':>7} {'goal':>6} {'peak/dense':>11}")
        for label, mine, base, goal in ROWS:
            if mine not in r:
                continue
            ratio = r[mine]["s"] / r[base]["s"]
            peak = r[mine]["peak_above_start_mb"] / dense_mb
            print(f"{label:24} {r[mine]['s']:10.2f}s {r[base]['s']:9.2f}s {ratio:6.2f}x "
                  f"{'' if goal is None else f'<={goal:g}x':>6} {peak:10.2f}x")
        for label, base in (("baseline make+fwd/bwd", "baseline_make_snip"), ("baseline save", "baseline_save"),
                            ("baseline read+load", "baseline_load")):
            print(f"{label:24} peak/dense {r[base]['peak_above_start_mb'] / dense_mb:.2f}x")
    if len(results) > 1:
        lo, hi = results[sizes[0]], results[sizes[-1]]
        print(f"\ngrowth of seconds per parameter, {sizes[0]} -> {sizes[-1]} "
              f"({hi['parameters'] / lo['parameters']:.2f}x the parameters; 1.00 = linear):")
        for label, mine, _, _ in ROWS:
            if mine in lo and mine in hi:
                g = (hi[mine]["s"] / hi["parameters"]) / (lo[mine]["s"] / lo["parameters"])
                print(f"  {label:24} {g:.2f}")


if __name__ == "__main__":
    main()
