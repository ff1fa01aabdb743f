"""Benchmark: a simulated fleet of N devices updating a model from release 1 to release 2 (a fine-tune) over a
loopback static HTTP server, six ways, in one run:

  dense full      the whole dense safetensors file to every device (what a user would otherwise ship)
  dense delta     dense safetensors through freezepack.fleet deltas (fine-tuning moves every weight: no gain)
  fpk-v1 full     the whole .fpk, format v1 (seed + initializer + coded mask + trained values)
  fpk-v1 delta    format v1 through deltas: one piece per stored tensor, unchanged masks stay on the device
  fpk-v2 full     the whole .fpk, format v2 (the default writer: binary header, entropy-coded masks/values)
  fpk-v2 delta    format v2 through deltas: cut at the payloads inside its one body tensor (docs/FLEET.md)

Release 1 is a FreezeNet at freezing rate q: random masks (``--masks random``) or SNIP on one random batch
(``--masks snip``, freezepack.make_freezenet). Release 2 keeps seed, initializers and masks and moves trained
values: of every layer (``--update all``), of the last layer only (``--update last``), or of the named layer(s)
(``--update conv2``); a layer's bias moves with its weight.

Every device does the real work of `freezepack fleet install`: TUF refresh (signatures, versions, expiry),
piece download with digest checks, file assembly against the signed SHA-256, model verification
(freezepack.api.verify for .fpk, which regenerates the frozen weights; a safetensors parse for dense), atomic
replace. Devices update one after another from their own directory (restored to its pre-update state, untimed),
the scenarios taking turns device by device; the server counts the bytes it sends. Reported: bytes served
(model + metadata), device wall time, and ratios to "dense full".

    .venv/bin/python tools/bench_fleet.py                       # N=1000, LeNet-300-100, q=0.98 (2% trained)
    .venv/bin/python tools/bench_fleet.py --devices 100 --link-mbps 10     # each device on a 10 Mbit/s link
    .venv/bin/python tools/bench_fleet.py --devices 20 --model lenet5 --q 0.99 --masks snip --update last
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
from freezepack.method.freezenet import freeze_record, make_freezenet

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


INPUTS = {"lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "vgg16": (3, 32, 32)}


def _layer(name: str) -> str:
    return name.rsplit(".", 1)[0]


def make_records(model: str, q: float, seed: int = 2024, masks: str = "random", update: str = "all"):
    """Release 1: a FreezeNet of ``model`` at freezing rate ``q``; release 2: same seed, initializers and masks,
    the trained values (and biases) of the ``update`` layers moved a little (a fine-tune)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if masks == "snip":
        net = MODELS[model]()
        batch = (torch.randn((64,) + INPUTS[model], generator=g), torch.randint(0, 10, (64,), generator=g))
        rec1 = freeze_record(make_freezenet(net, batch, q, seed, biases="zeros"))
    else:
        frozen, whole = {}, {}
        for name, t in MODELS[model]().state_dict().items():
            if t.dtype.is_floating_point and t.dim() > 1:
                mask = torch.rand(t.shape, generator=g) < 1 - q
                frozen[name] = FrozenTensor(make_init("kaiming_uniform", tuple(t.shape)), mask,
                                            torch.randn(int(mask.sum()), generator=g) * 0.05)
            else:
                whole[name] = t.clone()
        rec1 = FreezeRecord(seed, frozen=frozen, whole=whole)
    layers = [_layer(n) for n in rec1.frozen]
    chosen = set(layers) if update == "all" else {layers[-1]} if update == "last" else set(update.split(","))
    if not chosen <= set(layers):
        raise SystemExit(f"--update {update}: layers are {', '.join(layers)}")
    frozen2 = {n: FrozenTensor(t.init, t.mask, t.values + torch.randn(t.values.shape, generator=g) * 1e-3
                               if _layer(n) in chosen else t.values, frozen_scale=t.frozen_scale, stream=t.stream)
               for n, t in rec1.frozen.items()}
    whole2 = {n: t + torch.randn(t.shape, generator=g) * 1e-3
              if _layer(n) in chosen and t.dtype.is_floating_point and "running_" not in n else t
              for n, t in rec1.whole.items()}
    return rec1, FreezeRecord(rec1.seed, frozen=frozen2, whole=whole2, aliases=rec1.aliases)


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
    ap.add_argument("--masks", choices=("random", "snip"), default="random",
                    help="release 1's masks: random at rate q, or SNIP on one random batch (make_freezenet)")
    ap.add_argument("--update", default="all",
                    help="layers whose trained values release 2 moves: all, last, or comma-separated layer names")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    base = tempfile.mkdtemp(prefix="fpk-bench-fleet-")
    server = None
    try:
        rec1, rec2 = make_records(args.model, args.q, masks=args.masks, update=args.update)
        files = {"dense": (os.path.join(base, "r1.safetensors"), os.path.join(base, "r2.safetensors"))}
        for version in (1, 2):
            files[f"fpk-v{version}"] = (os.path.join(base, f"r1-v{version}.fpk"),
                                        os.path.join(base, f"r2-v{version}.fpk"))
            api.save(files[f"fpk-v{version}"][0], rec1, version=version)
            api.save(files[f"fpk-v{version}"][1], rec2, version=version)
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
                     for kind in files for mode in ("full", "delta")}
        results = run_fleet(url, scenarios, os.path.join(base, "work"), args.devices)
        ref = results["dense full"]
        for r in results.values():
            r["bytes_ratio_vs_dense_full"] = r["bytes_served"] / ref["bytes_served"]
            r["time_ratio_vs_dense_full"] = r["wall_s"] / ref["wall_s"]
        out = {"model": args.model, "q": args.q, "masks": args.masks, "update": args.update,
               "devices": args.devices, "link_mbps": args.link_mbps or None,
               "file_bytes": {kind: os.path.getsize(r2) for kind, (_, r2) in files.items()},
               "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
               "torch": torch.__version__, "results": results}
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            link = f"{args.link_mbps:g} Mbit/s per device link" if args.link_mbps else "no link limit"
            print(f"{args.model}, q={args.q:g} ({1 - args.q:.0%} trained, {args.masks} masks), {args.devices} "
                  f"devices release 1 -> 2 (fine-tune of {args.update} layers' values), loopback HTTP ({link}); "
                  "release 2 file: " + ", ".join(f"{k} {n:,} B" for k, n in out["file_bytes"].items()))
            print(f"{'':12s} {'model B/device':>14s} {'bytes served':>14s} {'per device':>11s} {'vs dense full':>14s} "
                  f"{'device wall s':>14s} {'ms/device':>10s} {'vs dense full':>14s}")
            for k, r in results.items():
                print(f"{k:12s} {r['model_bytes'] // args.devices:>14,d} {r['bytes_served']:>14,d} "
                      f"{r['bytes_served'] // args.devices:>11,d} {r['bytes_ratio_vs_dense_full']:>13.4f}x "
                      f"{r['wall_s']:>14.2f} {r['per_device_ms']:>10.2f} {r['time_ratio_vs_dense_full']:>13.3f}x")
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
