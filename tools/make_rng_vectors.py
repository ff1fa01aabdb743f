"""Write spec/vectors/rng_v1.json: the golden vectors that pin philox4x32-10/v1 bit for bit.

    python tools/make_rng_vectors.py          # (re)write; only ever done for a new spec version
    python tools/make_rng_vectors.py --check  # compare the numpy reference with the shipped file

Every value is produced by the plain numpy reference (freezepack.format.rng *_np,
freezepack.format.init.generate_np). The file is the spec: tests check both implementations against it, so a change
that alters any bit fails.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from freezepack.format import init, rng

OUT = Path(__file__).resolve().parents[1] / "spec" / "vectors" / "rng_v1.json"

NAMES = ["", "conv1.weight", "features.0.weight", "classifier.weight", "fc1.weight", "näme/ü", "x" * 300]
SEEDS = [0, 1, 7, 2**32 - 1, 2**32, 2**63 + 12345, 2**64 - 1]
EDGE_WORDS = [0x00000000, 0x00000001, 0x7FFFFFFF, 0x80000000, 0x80000001, 0xFFFFFFFF, 0x3FFFFFFF, 0x40000000,
              0x0000FFFF, 0x00FFFFFF, 0x01000000, 0x12345678, 0x9ABCDEF0, 0xDEADBEEF, 0x00000200, 0x000001FF]
INIT_CASES = [
    ("xavier_normal", {}, (300, 784)), ("xavier_normal", {"gain": 2.0}, (20, 1, 5, 5)),
    ("xavier_uniform", {}, (50, 20, 5, 5)),
    ("kaiming_normal", {"mode": "fan_out", "nonlinearity": "relu"}, (64, 3, 3, 3)),
    ("kaiming_uniform", {"a": 5 ** 0.5}, (10, 500)), ("normal", {"mean": 0.5, "std": 0.02}, (1000,)),
    ("uniform", {"a": -2.0, "b": 3.0}, (7, 11, 13)), ("pm_sigma", {}, (100, 300)), ("zeros", {}, (5, 5)),
    ("constant", {"val": 0.1}, (3,)), ("xavier_normal", {}, (0, 10)), ("normal", {}, ()),
]


def hexf(x: np.ndarray) -> list[str]:
    return [f"{v:08x}" for v in np.ascontiguousarray(x, dtype="<f4").view("<u4").ravel()]


def build() -> dict:
    kat = []
    for ctr, key in [([0, 0, 0, 0], [0, 0]), ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2),
                     ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0])]:
        out = rng.philox4x32_np(np.array([ctr], dtype=np.uint32), tuple(key))[0]
        kat.append({"counter": [f"{c:08x}" for c in ctr], "key": [f"{k:08x}" for k in key],
                    "output": [f"{int(o):08x}" for o in out]})
    streams = {n: f"{rng.stream_id(n):016x}" for n in NAMES}
    words = []
    for seed in SEEDS:
        for name in NAMES[:3]:
            for start, count in [(0, 16), (5, 7), (2**32 * 4 - 2, 4)]:
                w = rng.words_np(seed, rng.stream_id(name), start, count)
                words.append({"seed": str(seed), "name": name, "start": start,
                              "words": [f"{int(x):08x}" for x in w]})
    edge = np.array(EDGE_WORDS, dtype=np.uint32)
    conversions = {"words": [f"{w:08x}" for w in EDGE_WORDS], "uniform": hexf(rng.uniform_np(edge)),
                   "normal": hexf(rng.normal_np(edge)), "sign": hexf(rng.sign_np(edge))}
    inits = []
    for (name, params, shape), seed in zip(INIT_CASES, [3, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43]):
        spec = init.make_init(name, shape, **params)
        x = init.generate_np(spec, shape, seed, f"layer.{name}")
        inits.append({"init": name, "params": params, "shape": list(shape), "seed": seed, "tensor": f"layer.{name}",
                      "spec": spec.to_json(), "a_hex": hexf(np.float32(spec.a))[0],
                      "b_hex": hexf(np.float32(spec.b))[0],
                      "first": hexf(x.ravel()[:8]), "sha256": hashlib.sha256(x.astype("<f4").tobytes()).hexdigest()})
    return {"spec_version": rng.SPEC_VERSION, "normal_table_sha256": rng.NORMAL_TABLE_SHA256, "philox_kat": kat,
            "stream_ids": streams, "words": words, "conversions": conversions, "initializers": inits}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = json.dumps(build(), indent=1, ensure_ascii=False) + "\n"
    if args.check:
        same = OUT.read_text(encoding="utf-8") == text
        print("vectors match" if same else "VECTORS DIFFER")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
