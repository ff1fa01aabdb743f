"""Write spec/vectors/rng_v1.json and rng_v1_extra.json: the golden vectors that pin philox4x32-10/v1 bit for bit.

    python tools/make_rng_vectors.py          # (re)write; only ever done for a new spec version
    python tools/make_rng_vectors.py --check  # compare the numpy reference with the shipped files

rng_v1.json is the first set and never changes. rng_v1_extra.json (spec/RNG.md §7) adds vectors until breaking
any single rounding step or conversion fails several of them (tests/test_vector_strength.py proves it): ~1000
conversion words covering every octave, cell boundary and sign; initializers with a non-zero offset ``a`` and
every value listed (so rounding ``a + b*z`` once shows); the resolved f32 constants of ~100 initializer calls.

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
OUT_EXTRA = OUT.with_name("rng_v1_extra.json")

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


def _conversion_words() -> list[int]:
    """Per octave e (0..31) and sign: both ends of the octave, both sides of three cell boundaries, a few
    random odd n; then 512 uniformly random words. w = sign << 31 | (n - 1) / 2 (RNG.md §5.3)."""
    g = np.random.default_rng(20260601)
    out = []
    for e in range(32):
        lo, hi = 1 << e, (1 << (e + 1)) - 1
        ns = {lo | 1, hi}
        if e >= 7:
            for j in (1, 64, 127):
                edge = lo + j * (1 << (e - 7))
                ns |= {(edge - 1) | 1, edge + 1 if edge % 2 == 0 else edge}
        ns |= {int(x) | 1 for x in g.integers(lo, hi + 1, 3)}
        for neg in (0, 1):
            out += [neg << 31 | (n - 1) // 2 for n in sorted(ns) if lo <= n <= hi]
    out += [int(x) for x in g.integers(0, 1 << 32, 512, dtype=np.uint64)]
    return out


# (init, params, shape, seed): non-zero offsets a (normal mean, uniform low, -bound) with f32 steps that are not
# powers of two, so a reader that rounds a + b*z once (a fused multiply-add) differs on many elements
EXTRA_INITS = [
    ("normal", {"mean": 0.3, "std": 0.7}, (16, 16), 101), ("normal", {"mean": -1.5, "std": 0.1}, (256,), 102),
    ("normal", {"mean": 0.001, "std": 3.0}, (8, 32), 103), ("normal", {"mean": 7.25, "std": 2.2}, (256,), 104),
    ("uniform", {"a": -0.37, "b": 0.39}, (16, 16), 105), ("uniform", {"a": 2.0, "b": 4.5}, (256,), 106),
    ("uniform", {"a": -3.3, "b": -1.1}, (256,), 107), ("uniform", {"a": -1e-3, "b": 0.7}, (256,), 108),
    ("kaiming_uniform", {}, (20, 13), 109), ("kaiming_uniform", {"a": 0.1, "nonlinearity": "leaky_relu"}, (7, 37), 110),
    ("xavier_uniform", {"gain": 1.3}, (12, 21), 111), ("xavier_uniform", {}, (300, 3, 3), 112),
    ("xavier_normal", {"gain": 0.9}, (16, 16), 113), ("kaiming_normal", {"nonlinearity": "tanh"}, (10, 25), 114),
    ("pm_sigma", {"gain": 1.7}, (16, 16), 115), ("constant", {"val": -0.3}, (5,), 116),
]


def _resolution_cases():
    """make_init calls whose f32 constants pin RNG.md §6's binary64 steps (writer side)."""
    shapes = [(3, 5), (10, 7, 3, 3), (64, 3, 7, 7), (300, 784), (1000, 1), (1, 1), (17, 29, 5)]
    cases = []
    for shape in shapes:
        for gain in (1.0, 0.7, 2.0 ** 0.5):
            for name in ("xavier_normal", "xavier_uniform", "pm_sigma"):
                cases.append((name, {"gain": gain}, shape))
        for a in (0.0, 0.01, 5 ** 0.5):
            for mode in ("fan_in", "fan_out"):
                for nl in ("leaky_relu", "relu", "tanh", "selu", "linear"):
                    if nl == "leaky_relu" or a == 0.0:
                        cases.append(("kaiming_uniform" if mode == "fan_in" else "kaiming_normal",
                                      {"a": a, "mode": mode, "nonlinearity": nl}, shape))
    # the last five: f32(hi - lo) differs from f32(f32(hi) - f32(lo)) (the difference is taken in binary64)
    for lo, hi in [(-0.1, 0.3), (0.1, 0.7), (-2.5, -0.3), (1e-8, 3.3), (-3.0, -2.9), (-2.98, -1.68), (-2.97, -2.27),
                   (-0.61, 0.09), (1.37, 2.07)]:
        cases.append(("uniform", {"a": lo, "b": hi}, (4,)))
    for mean, std in [(0.1, 0.3), (-7.7, 1e-3)]:
        cases.append(("normal", {"mean": mean, "std": std}, (4,)))
    cases.append(("constant", {"val": 0.1}, (4,)))
    return cases


def build_extra() -> dict:
    words = _conversion_words()
    w = np.array(words, dtype=np.uint32)
    conversions = {"words": [f"{x:08x}" for x in words], "uniform": hexf(rng.uniform_np(w)),
                   "normal": hexf(rng.normal_np(w)), "sign": hexf(rng.sign_np(w))}
    inits = []
    for name, params, shape, seed in EXTRA_INITS:
        spec = init.make_init(name, shape, **params)
        x = init.generate_np(spec, shape, seed, f"extra.{name}")
        inits.append({"init": name, "params": params, "shape": list(shape), "seed": seed, "tensor": f"extra.{name}",
                      "spec": spec.to_json(), "a_hex": hexf(np.float32(spec.a))[0],
                      "b_hex": hexf(np.float32(spec.b))[0], "values": hexf(x.ravel()),
                      "sha256": hashlib.sha256(x.astype("<f4").tobytes()).hexdigest()})
    resolution = []
    for name, params, shape in _resolution_cases():
        spec = init.make_init(name, shape, **params)
        resolution.append({"init": name, "params": params, "shape": list(shape), "dist": spec.dist,
                           "a_hex": hexf(np.float32(spec.a))[0], "b_hex": hexf(np.float32(spec.b))[0]})
    return {"spec_version": rng.SPEC_VERSION, "normal_table_sha256": rng.NORMAL_TABLE_SHA256,
            "conversions": conversions, "initializers": inits, "resolution": resolution}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    texts = {OUT: json.dumps(build(), indent=1, ensure_ascii=False) + "\n",
             OUT_EXTRA: json.dumps(build_extra(), indent=1, ensure_ascii=False) + "\n"}
    if args.check:
        same = all(p.exists() and p.read_text(encoding="utf-8") == t for p, t in texts.items())
        print("vectors match" if same else "VECTORS DIFFER")
        return 0 if same else 1
    for p, t in texts.items():
        if p == OUT and p.exists() and p.read_text(encoding="utf-8") != t:
            print(f"refusing to change {p}: the first vector set is the spec (a change is a new spec version)")
            return 1
        p.write_text(t, encoding="utf-8")
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
