"""Format-v2 decoding speed, compiled decoder (freezepack/format/_ans.c) vs constriction, measured in one run:

  * lossless values ('planes'): MB/s of decoded float32 output for 1 M trained-like values (issue goal: >= 200 MB/s
    on one core), and ns per ANS symbol;
  * an 'ans-ctx' mask of LeNet-5-Caffe's fc1 (500 x 800, q = 0.99, SNIP-like): decode time, and the context bins
    alone against the full stable argsort they replace;
  * LeNet-5-Caffe frozen with SNIP at q = 0.99: load time of the v1 and the v2 file (best of --repeat, digests
    checked), v2 also with the ANS decoder forced to constriction.

    .venv/bin/python tools/bench_decode.py [--repeat 7]

The machine's load average is printed: on a shared machine the numbers are noisy, the ratios less so.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import numpy as np
import torch

import freezepack
from freezepack.experiments.models import INPUT_SHAPES, make_model
from freezepack.format import ans, entropy
from freezepack.format.init import generate, make_init
from freezepack.method.freezenet import make_freezenet


@contextlib.contextmanager
def constriction_only():
    """The ANS decoder and the context bins without the compiled code (the generator keeps its own kernel)."""
    saved = ans._lib, ans._failure
    ans._lib, ans._failure = None, "forced off by bench_decode"
    try:
        yield
    finally:
        ans._lib, ans._failure = saved


def best(fn, repeat: int) -> tuple[float, float]:
    """Best wall and best CPU (process) time over ``repeat`` runs: on a shared machine the CPU time is the steadier
    measure of one core's work."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def trained_like(n: int, seed: int = 0, zeros: float = 0.0) -> np.ndarray:
    """Values like trained weights: four layers with their own scales, heavy-ish tails; a fraction ``zeros`` of
    exact zeros (they skew the low bytes, so every plane gets coded: the slow case)."""
    rng = np.random.default_rng(seed)
    scale = np.repeat([0.005, 0.02, 0.05, 0.1], -(-n // 4))[:n]
    v = (rng.standard_t(5, size=n) * scale).astype(np.float32)
    v[rng.random(n) < zeros] = 0.0
    return v


def bench_values(repeat: int) -> None:
    n = 1 << 20
    for zeros in (0.0, 0.01):
        raw = trained_like(n, zeros=zeros).tobytes()
        tables, payload = entropy.encode_planes(raw, 4)
        symbols = n * sum(t is not None and len(t[0]) > 1 for t in tables)
        assert bytes(entropy.decode_planes(n, 4, tables, payload)) == raw
        rows = {}
        for name, ctx in (("compiled", contextlib.nullcontext()), ("constriction", constriction_only())):
            with ctx:
                assert name == "compiled" or not ans.available()
                rows[name] = best(lambda t=tables, p=payload: entropy.decode_planes(n, 4, t, p), repeat)
        print(f"values 'planes', {n:,} trained-like float32, {zeros:.0%} exact zeros ({len(payload) / len(raw):.3f}x "
              f"raw, {sum(t is not None for t in tables)} planes coded, {symbols:,} ANS symbols):")
        for name, (wall, cpu) in rows.items():
            print(f"  {name:13s} {len(raw) / wall / 1e6:5.0f} MB/s wall, {len(raw) / cpu / 1e6:5.0f} MB/s cpu  "
                  f"({1e3 * wall:6.2f} ms, {1e9 * cpu / max(symbols, 1):5.1f} cpu ns/symbol)")
        print(f"  speed-up {rows['constriction'][0] / rows['compiled'][0]:.1f}x wall, "
              f"{rows['constriction'][1] / rows['compiled'][1]:.1f}x cpu")


def bench_ctx(repeat: int) -> None:
    shape = (500, 800)
    init = make_init("xavier_normal", shape)
    w = generate(init, shape, 7, "fc1.weight").numpy().reshape(-1)
    n = w.size
    rng = np.random.default_rng(1)
    mask = np.zeros(n, bool)
    mask[np.argsort(-np.abs(w) * rng.lognormal(0, 0.7, n))[: n // 100]] = True
    keys = entropy.context_keys(w)
    params, words = min(entropy.encode_ctx(mask, keys, shape), key=lambda c: c[1].size)
    k = int(mask.sum())
    print(f"'ans-ctx' mask {shape[0]}x{shape[1]}, q = 0.99, bins = {params['bins']}, flags = {params['flags']}:")

    def argsort_bins():
        order = np.argsort(keys, kind="stable")
        out = np.empty(n, dtype=np.int64)
        out[order] = np.arange(n, dtype=np.int64) * params["bins"] // n
        return out

    t_old_bins = best(argsort_bins, repeat)[1]
    for name, ctx in (("compiled", contextlib.nullcontext()), ("constriction", constriction_only())):
        with ctx:
            got = entropy.decode_ctx(n, k, shape, params, words, keys)
            assert np.array_equal(got, np.flatnonzero(mask))
            t = best(lambda: entropy.decode_ctx(n, k, shape, params, words, keys), repeat)[1]
            tb = best(lambda: entropy.context_bins(keys, params["bins"]), repeat)[1]
        print(f"  {name:13s} decode {1e3 * t:6.2f} ms   context bins {1e3 * tb:6.2f} ms   (cpu)")
    print(f"  (context bins by a full stable argsort, as before: {1e3 * t_old_bins:.2f} ms cpu)")


def bench_lenet(repeat: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, *INPUT_SHAPES["lenet5"], generator=g)  # SNIP on random data: no MNIST offline
    y = torch.randint(0, 10, (16,), generator=g)
    model = make_freezenet(make_model("lenet5"), (x, y), 0.99, seed=7, biases="zeros")
    print(f"LeNet-5-Caffe, SNIP at q = 0.99, freezepack.load (best of {repeat}, digests checked):")
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for v in (1, 2):
            p = os.path.join(tmp, f"v{v}.fpk")
            freezepack.save(p, model, version=v)
            freezepack.load(p)
            times[f"v{v}"] = (os.path.getsize(p), *best(lambda p=p: freezepack.load(p), repeat))
            if v == 2:
                with constriction_only():
                    times["v2, ANS by constriction"] = (os.path.getsize(p),
                                                        *best(lambda p=p: freezepack.load(p), repeat))
        for name, (size, wall, cpu) in times.items():
            print(f"  {name:24s} {size:7,} B  load {1e3 * wall:6.1f} ms wall, {1e3 * cpu:6.1f} ms cpu")
        print(f"  v2/v1 load time {times['v2'][1] / times['v1'][1]:.2f}x wall, "
              f"{times['v2'][2] / times['v1'][2]:.2f}x cpu")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    if not ans.available():
        print(f"compiled ANS decoder unavailable ({ans.unavailable_reason()}): both rows use constriction")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, load average {load}")
    bench_values(args.repeat)
    bench_ctx(args.repeat)
    bench_lenet(args.repeat)
    if load is not None:
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
