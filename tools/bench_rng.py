"""Benchmark: regenerate a 15M-element xavier_normal tensor (VGG16-D size) with freezepack, against torch.randn.

One run measures, on each device, in the same process:
  native   freezepack.format.init.generate through the compiled kernel (CPU only; freezepack/format/_philox.c),
           with torch's thread count and with one thread
  eager    freezepack.format.init.generate through the torch path (FREEZEPACK_NO_NATIVE=1: what a machine without
           a C compiler runs, and what CUDA runs; freezepack/format/eager.py), with torch's threads and with one
  randn    torch.randn of the same size: what a user would otherwise call (not reproducible across platforms), with
           torch's threads and with one (each ``*_1thread`` ratio is against ``randn_1thread``)
  fill     out.fill_(1.0): a pure memory write of the same size, the bandwidth floor (CUDA only)
and reports the median time of each, elements/s, ratios to torch.randn and the goals (CPU: eager <= 3x randn at
one thread and at torch's threads; native <= 0.3x randn at two threads or more). It also checks that native and
eager gave the same bits.

    .venv/bin/python tools/bench_rng.py              # CPU, and CUDA when present
    .venv/bin/python tools/bench_rng.py --json       # machine-readable
    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_rng.py --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from freezepack.format import init, native


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns: dict, device: str, repeat: int) -> dict:
    """Median and min time of each function. They run interleaved (one of each per round), so a machine whose
    load changes during the run (shared CI runners) affects all of them alike and the ratios stay meaningful."""
    for fn in fns.values():  # warm-up: first-use costs (kernel build/load, tables, allocator) are not measured
        fn()
    _sync(device)
    times: dict = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "runs": repeat} for name, ts in times.items()}


def _one_thread(fn):
    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(old)
    return run


def bench_device(device: str, shape, repeat: int, eager_repeat: int) -> dict:
    """eager_repeat=0 skips the (slow) torch eager path."""
    n = int(np.prod(shape))
    spec = init.make_init("xavier_normal", shape)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    res: dict = {"device": device, "numel": n, "shape": list(shape), "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        res["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        res["cpu"] = platform.processor() or platform.machine()
    results = {}
    fast = {"randn": lambda: torch.randn(shape, device=device)}
    if device == "cpu":
        fast["randn_1thread"] = _one_thread(fast["randn"])
    regen = lambda: init.generate(spec, shape, 1, "features.weight", out=out)  # noqa: E731
    if device == "cpu":
        if native.available():
            fast["native"] = regen
            fast["native_1thread"] = _one_thread(regen)
        else:
            res["native_unavailable"] = native.unavailable_reason()
    else:
        fast["fill"] = lambda: out.fill_(1.0)
    results.update(timed(fast, device, repeat))
    native_out = None
    if "native" in fast:
        regen()
        native_out = out.clone()

    saved = os.environ.get("FREEZEPACK_NO_NATIVE")
    os.environ["FREEZEPACK_NO_NATIVE"] = "1"
    try:
        if eager_repeat > 0:
            eager = {"eager": regen}
            if device == "cpu":
                eager["eager_1thread"] = _one_thread(regen)
                eager["randn_1thread"] = fast["randn_1thread"]  # again, interleaved with the eager runs
            results.update(timed(eager, device, eager_repeat))
    finally:
        if saved is None:
            del os.environ["FREEZEPACK_NO_NATIVE"]
        else:
            os.environ["FREEZEPACK_NO_NATIVE"] = saved
    if native_out is not None and eager_repeat > 0:
        res["native_equals_eager_bitwise"] = bool(torch.equal(native_out.view(torch.int32), out.view(torch.int32)))

    for name, r in results.items():
        base = results["randn_1thread" if name.endswith("_1thread") else "randn"]["median_s"]
        r["elements_per_s"] = n / r["median_s"]
        r["ratio_to_randn"] = r["median_s"] / base
    if device == "cpu":
        res["goals"] = _goals(results, res["torch_threads"])
    if "fill" in results and "eager" in results:  # fraction of the write bandwidth a plain fill reaches
        for key in ("eager",):
            results[key]["write_bandwidth_fraction_of_fill"] = results["fill"]["median_s"] / results[key]["median_s"]
            results[key]["write_GB_per_s"] = 4 * n / results[key]["median_s"] / 1e9
    res["results"] = results
    return res


EAGER_GOAL = 3.0  # the torch path (no C compiler): at most this many times torch.randn, at 1 thread and at torch's
NATIVE_GOAL = 0.3  # the compiled kernel at two threads or more


def _goals(results: dict, threads: int) -> list:
    """(what, measured ratio, goal, met) for each goal this run measured."""
    goals = []
    for name in ("eager_1thread", "eager"):
        if name in results:
            what = f"eager, {1 if name.endswith('_1thread') else threads} thread(s): <= {EAGER_GOAL:g}x randn"
            ratio = results[name]["ratio_to_randn"]
            goals.append((what, ratio, EAGER_GOAL, ratio <= EAGER_GOAL))
    if "native" in results and threads >= 2:
        ratio = results["native"]["ratio_to_randn"]
        what = f"native, {threads} threads: <= {NATIVE_GOAL:g}x randn"
        goals.append((what, ratio, NATIVE_GOAL, ratio <= NATIVE_GOAL))
    return goals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=15_000_000, help="elements (a 2-D shape rows x 4000 is used)")
    p.add_argument("--repeat", type=int, default=7, help="timed runs of the fast methods (median reported)")
    p.add_argument("--eager-repeat", type=int, default=3, help="timed runs of the torch eager path (0: skip it)")
    p.add_argument("--device", action="append", help="cpu / cuda (repeatable); default cpu, and cuda if present")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    cols = 4000
    shape = (max(1, args.numel // cols), cols) if args.numel >= cols else (1, args.numel)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    report = {"torch": torch.__version__, "python": sys.version.split()[0],
              "devices": [bench_device(d, shape, args.repeat, args.eager_repeat) for d in devices]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for d in report["devices"]:
        head = d.get("device_name") or d.get("cpu")
        print(f"{d['device']} ({head}), {d['numel']:,} elements xavier_normal {tuple(d['shape'])}, "
              f"torch threads {d['torch_threads']}, torch {report['torch']}")
        print(f"  {'method':<16}{'median ms':>11}{'M elem/s':>11}{'x randn':>9}")
        for name, r in d["results"].items():
            print(f"  {name:<16}{r['median_s'] * 1e3:>11.1f}{r['elements_per_s'] / 1e6:>11.1f}"
                  f"{r['ratio_to_randn']:>9.2f}")
        if "native_equals_eager_bitwise" in d:
            print(f"  native == eager bitwise: {d['native_equals_eager_bitwise']}")
        if "native_unavailable" in d:
            print(f"  native kernel unavailable: {d['native_unavailable']}")
        for what, ratio, _goal, met in d.get("goals", []):
            print(f"  goal: {what}: {ratio:.2f}x, {'met' if met else 'NOT met'}")
        if "write_GB_per_s" in d["results"].get("eager", {}):
            e = d["results"]["eager"]
            print(f"  eager writes {e['write_GB_per_s']:.1f} GB/s = {e['write_bandwidth_fraction_of_fill']:.0%} "
                  f"of a plain fill_")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
