"""Regenerate the normal inverse-CDF table of spec/RNG.md (philox4x32-10/v1) with mpmath.

The shipped table files are the spec; this script documents how they were made and lets anyone check them:
    python tools/make_normal_table.py --check
Each node is the exact quantile computed with 60 significant digits and rounded once to the nearest float32
(ties to even), so the table does not depend on any platform's libm.
"""
from __future__ import annotations

import argparse
import hashlib
import struct
import sys
from pathlib import Path

import mpmath

ROOT = Path(__file__).resolve().parents[1]
K = 7  # 2**K interpolation cells per octave
OCTAVES = 32


def _f32_nearest(x: mpmath.mpf) -> float:
    """Round an mpmath number to the nearest float32 (ties to even) without double rounding."""
    import numpy as np

    guess = np.float32(float(x))
    best = guess
    for cand in (np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))):
        d_c = abs(mpmath.mpf(float(cand)) - x)
        d_b = abs(mpmath.mpf(float(best)) - x)
        if d_c < d_b or (d_c == d_b and (struct.unpack("<I", struct.pack("<f", cand))[0] & 1) == 0):
            best = cand
    return float(best)


def exact_node(e: int, j: int) -> mpmath.mpf:
    """|z| whose two-sided tail mass is v = 2**(e-32) * (1 + j/2**K): |z| = -Phi^-1(v/2)."""
    v = mpmath.ldexp(1 + mpmath.mpf(j) / 2**K, e - 32)
    return -mpmath.sqrt(2) * mpmath.erfinv(v - 1)  # Phi^-1(p) = sqrt2 * erfinv(2p-1), p = v/2


def build() -> tuple[list[float], list[float]]:
    mpmath.mp.dps = 60
    a, d = [], []
    for e in range(OCTAVES):
        nodes = [exact_node(e, j) for j in range(2**K + 1)]
        for j in range(2**K):
            a.append(_f32_nearest(nodes[j]))
            d.append(_f32_nearest(nodes[j + 1] - nodes[j]))
    return a, d


def to_bytes(a: list[float], d: list[float]) -> bytes:
    return struct.pack(f"<{len(a)}f", *a) + struct.pack(f"<{len(d)}f", *d)


def to_text(a: list[float], d: list[float]) -> str:
    lines = [
        "# freezepack philox4x32-10/v1 normal table: octave e, cell j, A[e,j], D[e,j] as float32 bit patterns (hex)",
        "# and their decimal values. index = e*128 + j. See spec/RNG.md section 'Standard normal'.",
    ]
    for i, (x, y) in enumerate(zip(a, d)):
        bx = struct.unpack("<I", struct.pack("<f", x))[0]
        by = struct.unpack("<I", struct.pack("<f", y))[0]
        lines.append(f"{i >> K} {i & (2**K - 1)} {bx:08x} {by:08x} {x!r} {y!r}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing them")
    args = ap.parse_args()
    a, d = build()
    binary, text = to_bytes(a, d), to_text(a, d)
    targets = {ROOT / "freezepack" / "format" / "tables" / "normal_v1.f32": binary,
               ROOT / "spec" / "normal_table_v1.txt": text.encode()}
    if args.check:
        ok = all(p.read_bytes() == b for p, b in targets.items())
        print("tables match" if ok else "TABLES DIFFER")
        return 0 if ok else 1
    for p, b in targets.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b)
    print("sha256(normal_v1.f32) =", hashlib.sha256(binary).hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
