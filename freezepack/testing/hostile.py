"""Crafted hostile .fpk files (allocation bombs, JSON bombs, lies) and a subprocess probe that loads each one
under a tight address-space limit and reports how it was refused and the peak RSS it cost.

Used by tests/test_container.py and tests/test_fuzz_files.py. Every builder returns the bytes of a complete file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from ..api import encode_record
from ..format import strictjson
from . import rewrite, small_record, split_file, with_inner_text


def base_file() -> bytes:
    return b"".join(encode_record(small_record(), version=1))  # v1: its JSON header is what gets edited


def _entry(inner, name):
    return next(t for t in inner["tensors"] if t["name"] == name)


def x_member(data: bytes, json_text: str) -> bytes:
    """A top-level ``x-pad`` member holding ``json_text`` ('x-' sorts after every other header key)."""
    _, inner, _ = split_file(data)
    text = strictjson.canonical_json(inner)
    return with_inner_text(data, text[:-1] + ',"x-pad":' + json_text + "}")


def frozen_bomb(data: bytes, shape=(65536, 65536)) -> bytes:
    """A const, all-frozen tensor declared 2**32 elements: 16 GiB regenerated from a file of a few KB."""
    return rewrite(data, lambda h: _entry(h, "fc2.weight").update(shape=list(shape)))


def gaps_prefix_file(n: int, k: int = 1, seed: int = 3) -> bytes:
    """A *valid* file whose one tensor is frozen except its first k entries: an empty 'ans-gaps' stream (k zero
    gaps), k values and the true dense digest."""
    from ..format.init import make_init
    from ..format.record import FreezeRecord, FrozenTensor

    rec = FreezeRecord(seed=seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:k] = True
    rec.frozen["w"] = FrozenTensor(make_init("normal", (n,)), mask, torch.ones(k))
    return b"".join(encode_record(rec, version=1))


def cases(tmpdir: str, size_mb: int = 24) -> dict[str, str]:
    """name -> path of each crafted hostile file (all must be refused with a FreezepackError)."""
    data = base_file()
    n_pairs = size_mb * (1 << 20) // 3
    files = {
        "frozen_16GiB": frozen_bomb(data),
        "gaps_prefix_1GiB": gaps_prefix_with_digest_lie(1 << 28),
        "x_braces": x_member(data, "[" + ",".join(["{}"] * n_pairs) + "]"),
        "x_strings": x_member(data, "[" + ",".join(['"ab"'] * (n_pairs // 2)) + "]"),
        "x_deep": x_member(data, "[" * 200_000 + "]" * 200_000),
        "x_big_string": x_member(data, json.dumps("a" * (size_mb << 20))),
        "metadata_big": rewrite(data, lambda h: h["metadata"].update(big="b" * (size_mb << 20))),
        "whole_4TiB": rewrite(data, lambda h: _entry(h, "fc.bias").update(shape=[1 << 20, 1 << 20])),
        "torch_zip": _torch_zip(tmpdir),
    }
    out = {}
    for name, blob in files.items():
        p = os.path.join(tmpdir, name + ".fpk")
        with open(p, "wb") as f:
            f.write(blob)
        out[name] = p
    return out


def gaps_prefix_with_digest_lie(n: int) -> bytes:
    """Like :func:`gaps_prefix_file` for a big n, without regenerating it: the dense digest is a placeholder."""
    from freezepack.format.init import make_init

    data = gaps_prefix_file(16)

    def grow(h):
        t = h["tensors"][0]
        t.update(shape=[n], init=make_init("normal", (n,)).to_json(), sha256="ab" * 32)
    return rewrite(data, grow)


def _torch_zip(tmpdir) -> bytes:
    p = os.path.join(tmpdir, "ckpt.pt")
    torch.save({"w": torch.zeros(3)}, p)
    return open(p, "rb").read()


PROBE = r'''
import gc, json, os, re, resource, sys, time
import freezepack
from freezepack.errors import FreezepackError

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

warm, paths = sys.argv[1], sys.argv[2:]
freezepack.load(warm)  # import and warm every lazy path on a valid file first
try:
    freezepack.load(warm, device="meta")
except Exception:
    pass
out = []
for p in paths:
    size = os.path.getsize(p)
    gc.collect()
    allowance = 2 * size + (64 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + allowance, resource.RLIM_INFINITY))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
    rss0, t0 = status("VmRSS"), time.perf_counter()
    try:
        freezepack.load(p)
        outcome = "accepted"
    except FreezepackError as e:
        outcome = type(e).__name__ + ": " + e.reason
    except BaseException as e:
        outcome = "FOREIGN " + type(e).__name__ + ": " + str(e)[:200]
    elapsed = time.perf_counter() - t0
    peak = status("VmHWM") - rss0
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out.append({"file": os.path.basename(p), "bytes": size, "outcome": outcome, "peak_rss": peak,
                "allowance": allowance, "seconds": elapsed})
print(json.dumps(out))
'''


def probe(warm: str, paths: list[str], timeout: float = 300) -> list[dict]:
    """Load each path in one fresh interpreter under RLIMIT_AS = current + 2 x file + 64 MiB; report each outcome,
    its peak RSS above the resting RSS (VmHWM after a reset) and its time."""
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", PROBE, warm, *paths], capture_output=True, text=True, timeout=timeout,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
