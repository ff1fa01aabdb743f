"""Benchmark: a simulated fleet of N devices updating a model from v1 to v2 (a values-only fine-tune) over a
loopback static HTTP server, four ways, in one run:

  dense full    the whole dense safetensors v2 file to every device (what a user would otherwise ship)
  dense delta   dense safetensors through freezepack.fleet deltas (fine-tuning moves every weight: no gain)
  fpk full      the whole .fpk v2 file (seed + initializer + coded mask + trained values)
  fpk delta     .fpk through deltas: only the trained values + the header move; masks stay on the device

Every device does the real work of `freezepack fleet install`: TUF refresh (signatures, versions, expiry),
piece download with digest checks, file assembly against the signed SHA-256, model verification
(freezepack.api.verify for .fpk, which regenerates the frozen weights; a safetensors parse for dense), atomic
replace. Devices update one after another from their own directory (restored to its pre-update state, untimed),
the four scenarios taking turns device by device; the server counts the bytes it sends. Reported: bytes served
(model + metadata), device wall time, and ratios to "dense full".

    .venv/bin/python tools/bench_fleet.py                       # N=1000, LeNet-300-100, q=0.98 (2% trained)
    .venv/bin/python tools/bench_fleet.py --devices 100 --link-mbps 10     # each device on a 10 Mbit/s link
    .venv/bin/python tools/bench_fleet.py --devices 100 --model lenet5 --json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

import torch
from safetensors.torch import save_file

from freezepack import api
from freezepack.experiments import models
from freezepack.fleet import Device, Publisher, open_store
from freezepack.format.init import make_init
from freezepack.format.record import FreezeRecord, FrozenTensor

SERVER = textwrap.dedent("""
    import functools, http.server, json, sys, threading, time
    rate = float(sys.argv[2]) * 1e6 / 8 if float(sys.argv[2]) > 0 else 0.0   # bytes/s per connection, 0: no limit
    counts = {"bytes": 0, "requests": 0}
    lock = threading.Lock()
    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"          # keep-alive, as any production static server
        disable_nagle_algorithm = True         # headers and body are separate writes: no 40 ms delayed-ACK stalls
        def log_message(self, *a): pass
        def do_GET(self):
            if self.path == "/__counts__":
                body = json.dumps(counts).encode()
                self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
                self.wfile.write(body); return
            with lock: counts["requests"] += 1
            super().do_GET()
        def copyfile(self, src, dst):
            while chunk := src.read(1 << 14):
                dst.write(chunk)
                with lock: counts["bytes"] += len(chunk)
                if rate:
                    time.sleep(len(chunk) / rate)   # a slow link (cellular, satellite) for this connection
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=sys.argv[1]))
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()
""")

MODELS = {"lenet300": models.LeNet300100, "lenet5": models.LeNet5Caffe, "vgg16": models.VGG16D}


def make_records(model: str, q: float, seed: int = 2024):
    """v1: a FreezeNet of ``model`` at freezing rate ``q`` (a fraction 1 - q of each weight trained); v2: same seed,
    initializers and masks, every trained value moved a little (a fine-tune)."""
    torch.manual_seed(0)
    sd = MODELS[model]().state_dict()
    g = torch.Generator().manual_seed(1)
    frozen1, frozen2, whole = {}, {}, {}
    for name, t in sd.items():
        if t.dtype.is_floating_point and t.dim() > 1:
            mask = torch.rand(t.shape, generator=g) < 1 - q
            v1 = torch.randn(int(mask.sum()), generator=g) * 0.05
            v2 = v1 + torch.randn(v1.shape, generator=g) * 1e-3
            init = make_init("kaiming_uniform", tuple(t.shape))
            frozen1[name] = FrozenTensor(init, mask, v1)
            frozen2[name] = FrozenTensor(init, mask, v2)
        else:
            whole[name] = t.clone()
    return FreezeRecord(seed, frozen=frozen1, whole=whole), FreezeRecord(seed, frozen=frozen2, whole=whole)


def served(url: str) -> dict:
    with urllib.request.urlopen(url + "/__counts__") as r:
        return json.loads(r.read())


def run_fleet(url, scenarios: dict, work: str, n: int) -> dict:
    """N devices per scenario update one after another; only the install is timed. The scenarios take turns
    device by device, so load from other processes falls on all of them alike."""
    res = {k: {"devices": n, "model_bytes": 0, "metadata_bytes": 0, "wall_s": 0.0, "bytes_served": 0,
               "requests": 0} for k in scenarios}
    for _ in range(n):
        for key, (pristine, name) in scenarios.items():
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(pristine, work)
            before = served(url)
            t = time.perf_counter()
            r = Device(work).install(url, name)
            res[key]["wall_s"] += time.perf_counter() - t
            after = served(url)
            assert r.status == "installed" and r.release == 2
            res[key]["model_bytes"] += r.fetched_bytes
            res[key]["metadata_bytes"] += r.metadata_bytes
            res[key]["bytes_served"] += after["bytes"] - before["bytes"]
            res[key]["requests"] += after["requests"] - before["requests"]
            res[key]["file_bytes"] = r.full_bytes
    for r in res.values():
        r["per_device_ms"] = 1e3 * r["wall_s"] / n
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    ap.add_argument("--q", type=float, default=0.98, help="freezing rate: 1 - q of each weight tensor is trained")
    ap.add_argument("--link-mbps", type=float, default=0.0,
                    help="limit each connection to this many Mbit/s (a device's link); default: loopback, no limit")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    base = tempfile.mkdtemp(prefix="fpk-bench-fleet-")
    server = None
    try:
        rec1, rec2 = make_records(args.model, args.q)
        files = {"fpk": (os.path.join(base, "v1.fpk"), os.path.join(base, "v2.fpk")),
                 "dense": (os.path.join(base, "v1.safetensors"), os.path.join(base, "v2.safetensors"))}
        api.save(files["fpk"][0], rec1)
        api.save(files["fpk"][1], rec2)
        save_file(rec1.state_dict(), files["dense"][0])
        save_file(rec2.state_dict(), files["dense"][1])

        repo, keys = os.path.join(base, "repo"), os.path.join(base, "keys")
        root = Publisher(open_store(repo), keys).init()
        for kind, (v1, _) in files.items():
            Publisher(open_store(repo), keys).load().publish(v1, f"{args.model}-{kind}")

        server = subprocess.Popen([sys.executable, "-c", SERVER, repo, str(args.link_mbps)], stdout=subprocess.PIPE,
                                  text=True)
        url = f"http://127.0.0.1:{int(server.stdout.readline())}"

        # pristine device states: "delta" holds v1 (installed through the fleet), "full" holds only the pinned root
        pristine = {}
        root_file = os.path.join(base, "root.json")
        with open(root_file, "wb") as f:
            f.write(root)
        for kind in files:
            d = os.path.join(base, f"pristine-{kind}-delta")
            Device(d).install(url, f"{args.model}-{kind}", root_file=root_file)
            pristine[(kind, "delta")] = d
            d = os.path.join(base, f"pristine-{kind}-full")
            os.makedirs(os.path.join(d, ".fleet", "tuf"))
            shutil.copy(root_file, os.path.join(d, ".fleet", "tuf", "root.json"))
            pristine[(kind, "full")] = d
        for kind, (_, v2) in files.items():
            Publisher(open_store(repo), keys).load().publish(v2, f"{args.model}-{kind}")
        scenarios = {f"{kind} {mode}": (pristine[(kind, mode)], f"{args.model}-{kind}")
                     for kind in ("dense", "fpk") for mode in ("full", "delta")}
        results = run_fleet(url, scenarios, os.path.join(base, "work"), args.devices)
        ref = results["dense full"]
        for r in results.values():
            r["bytes_ratio_vs_dense_full"] = r["bytes_served"] / ref["bytes_served"]
            r["time_ratio_vs_dense_full"] = r["wall_s"] / ref["wall_s"]
        out = {"model": args.model, "q": args.q, "devices": args.devices, "link_mbps": args.link_mbps or None,
               "file_bytes": {"dense": os.path.getsize(files["dense"][1]), "fpk": os.path.getsize(files["fpk"][1])},
               "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
               "torch": torch.__version__, "results": results}
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            link = f"{args.link_mbps:g} Mbit/s per device link" if args.link_mbps else "no link limit"
            print(f"{args.model}, q={args.q:g} ({1 - args.q:.0%} trained), {args.devices} devices v1 -> v2 "
                  "(values-only), loopback HTTP "
                  f"({link}); "
                  f"v2 file: dense {out['file_bytes']['dense']:,} B, .fpk {out['file_bytes']['fpk']:,} B")
            print(f"{'':12s} {'bytes served':>14s} {'per device':>11s} {'vs dense full':>14s} "
                  f"{'device wall s':>14s} {'ms/device':>10s} {'vs dense full':>14s}")
            for k, r in results.items():
                print(f"{k:12s} {r['bytes_served']:>14,d} {r['bytes_served'] // args.devices:>11,d} "
                      f"{r['bytes_ratio_vs_dense_full']:>13.4f}x {r['wall_s']:>14.2f} {r['per_device_ms']:>10.2f} "
                      f"{r['time_ratio_vs_dense_full']:>13.3f}x")
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
