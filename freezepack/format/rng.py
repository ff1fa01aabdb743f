"""The spec'd generator: Philox4x32-10 bits and their exact conversions (spec/RNG.md, ``philox4x32-10/v1``).

Element ``i`` of the tensor stream ``s`` under seed ``k`` is a pure function of ``(k, s, i)``:
    block = i // 4, lane = i % 4
    word  = Philox4x32-10(counter=(block_lo, block_hi, s_lo, s_hi), key=(k_lo, k_hi))[lane]
so launch geometry, chunk size, device and thread count cannot change a bit.

Two implementations live here and must agree bit for bit: a plain numpy reference (``*_np``; uint64 arithmetic,
written for clarity) and a torch implementation (``*_torch``) that runs on the tensor's device. The torch path
keeps every integer exact in int64 (products are split so they never exceed 2**48) and uses only correctly
rounded float32 multiply and add, issued as separate eager kernels, so nothing can be contracted into an FMA.
"""
from __future__ import annotations

import functools
import hashlib
import sys
from importlib import resources

import numpy as np
import torch

from ..errors import SpecError

SPEC_VERSION = "philox4x32-10/v1"

# Random123 constants (Salmon et al., SC'11).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
ROUNDS = 10
MASK32 = 0xFFFFFFFF

NORMAL_K = 7  # 2**7 interpolation cells per octave of tail mass
NORMAL_TABLE_SHA256 = "f82df710b71a1c929a25912c722471ffdde2d32522f79a8d602db0177891b48f"



def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise SpecError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def stream_id(name: str) -> int:
    """The 64-bit stream of a tensor: first 8 bytes of SHA-256(UTF-8 name), little-endian.

    Derived from the name alone, so adding, removing or reordering tensors never changes another tensor's weights.
    """
    if not isinstance(name, str):
        raise SpecError(f"tensor name must be a str, got {type(name).__name__}")
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _key_schedule(seed: int) -> list[tuple[int, int]]:
    k0, k1 = seed & MASK32, seed >> 32
    keys = []
    for _ in range(ROUNDS):
        keys.append((k0, k1))
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return keys


# ----------------------------------------------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------------------------------------------

def philox4x32_np(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 on an (n, 4) array of uint32 counters with key (k0, k1); returns (n, 4) uint32."""
    c = [counter[:, j].astype(np.uint64) for j in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    m0, m1, w0, w1, mask = (np.uint64(v) for v in (PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, MASK32))
    for _ in range(ROUNDS):
        p0 = c[0] * m0  # < 2**64: exact in uint64
        p1 = c[2] * m1
        hi0, lo0 = p0 >> np.uint64(32), p0 & mask
        hi1, lo1 = p1 >> np.uint64(32), p1 & mask
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
    return np.stack(c, axis=1).astype(np.uint32)


def words_np(seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """uint32 words of elements [start, start+count) of stream ``stream`` under ``seed``."""
    seed = check_seed(seed)
    if count == 0:
        return np.zeros(0, np.uint32)
    first, last = start >> 2, (start + count - 1) >> 2
    blocks = np.arange(first, last + 1, dtype=np.uint64)
    ctr = np.stack(
        [blocks & np.uint64(MASK32), blocks >> np.uint64(32),
         np.full_like(blocks, stream & MASK32), np.full_like(blocks, stream >> 32)], axis=1)
    out = philox4x32_np(ctr, (seed & MASK32, seed >> 32)).reshape(-1)
    off = start - (first << 2)
    return out[off:off + count]


def uniform_np(words: np.ndarray) -> np.ndarray:
    """u = (2*(w >> 9) + 1) * 2**-24: odd multiples of 2**-24 in (0, 1), exact in float32, never 0 or 1."""
    k = (words.astype(np.uint32) >> np.uint32(9)).astype(np.int64)
    return (2 * k + 1).astype(np.float32) * np.float32(2.0**-24)


def sign_np(words: np.ndarray) -> np.ndarray:
    """+1 when the top bit is 0, -1 when it is 1 (as float32)."""
    return np.where(words.astype(np.uint32) >> np.uint32(31), np.float32(-1.0), np.float32(1.0)).astype(np.float32)


def _normal_parts_np(words: np.ndarray):
    w = words.astype(np.int64)
    n = 2 * (w & 0x7FFFFFFF) + 1  # odd, in [1, 2**32): tail mass v = n / 2**32
    e = np.zeros_like(n)
    t = n.copy()
    for s in (16, 8, 4, 2, 1):  # e = bit_length(n) - 1, by exact binary search
        big = (t >> s) != 0
        e += np.where(big, s, 0)
        t = np.where(big, t >> s, t)
    r = (n - (np.int64(1) << e)) << NORMAL_K
    j = r >> e
    rem = r - (j << e)
    sh = np.maximum(e - 24, 0)
    f = (rem >> sh).astype(np.float32) * _POW2NEG_NP[e - sh]
    return w >> 31, (e << NORMAL_K) + j, f


def normal_np(words: np.ndarray) -> np.ndarray:
    """Standard normal float32 from uint32 words by the octave table (spec/RNG.md)."""
    a, d = normal_table_np()
    neg, idx, f = _normal_parts_np(words)
    mag = a[idx] + f * d[idx]  # two correctly rounded float32 ops (numpy never contracts)
    return np.where(neg == 1, -mag, mag).astype(np.float32)


_POW2NEG_NP = np.array([2.0**-k for k in range(32)], dtype=np.float32)


@functools.cache
def normal_table_np() -> tuple[np.ndarray, np.ndarray]:
    raw = resources.files("freezepack.format").joinpath("tables/normal_v1.f32").read_bytes()
    if hashlib.sha256(raw).hexdigest() != NORMAL_TABLE_SHA256:
        raise SpecError("freezepack/format/tables/normal_v1.f32 is damaged: its sha256 does not match the spec")
    t = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    n = 32 << NORMAL_K
    a, d = t[:n].copy(), t[n:].copy()
    a.setflags(write=False)
    d.setflags(write=False)
    return a, d


# ----------------------------------------------------------------------------------------------------------------
# torch implementation (any device)
#
# Words are int64 tensors whose low 32 bits hold the u32 word. Philox keeps every value below 2**32 except the raw
# products: c * M (both < 2**32) wraps modulo 2**64 in int64 -- two's complement, the same bits as the exact u64
# product -- so one multiply gives both halves: lo = p & MASK32, hi = (p >> 32) & MASK32 (the shift is arithmetic,
# the mask drops the sign copies). Lanes 1 and 3 are raw products whose upper 32 bits are not cleared: every consumer
# reads only the low 32 bits, and Philox masks them away when it xors them into the next multiplicand.
# `check_torch_integers` proves the wrap-around on each device before first use.
# ----------------------------------------------------------------------------------------------------------------

_LOW = 0 if sys.byteorder == "little" else 1  # which int32 half of an int64 holds its low 32 bits


def philox_torch(seed: int, stream: int, first_block: int, lanes: torch.Tensor, scratch: torch.Tensor) -> None:
    """Philox4x32-10 of blocks ``[first_block, first_block + nb)`` into ``lanes`` (int64, shape ``(4, nb)``, each
    row contiguous): row ``r`` holds word ``r`` of every block in its low 32 bits (rows 1 and 3 carry garbage above
    them). ``scratch``: int64 ``(6, nb)`` or more rows, each contiguous. The blocks must share ``block >> 32``
    (callers split at multiples of 2**32), so counter word 1 is one number, like the stream words 2 and 3.

    About 90 in-place kernels on ``nb`` elements, none allocating: round 0 and 1 have scalar halves (the counter's
    constant words), rounds 2-9 cost two multiplies, two shifts, four xors and two masks."""
    nb = lanes.shape[1]
    bhi = first_block >> 32
    if (first_block + nb - 1) >> 32 != bhi:
        raise ValueError("a Philox batch must not cross a multiple of 2**32 blocks")
    keys = _key_schedule(seed)
    s0, s1 = stream & MASK32, stream >> 32
    a, b, c, d, e, f = (scratch[r, :nb] for r in range(6))
    lo = first_block & MASK32
    torch.arange(lo, lo + nb, out=a)  # counter word 0: the block's low half
    # round 0: (c0, c1, c2, c3) = (block_lo, block_hi, s0, s1); M1 * s0 is a number, M0 * block_lo a tensor
    (k0, k1), p1 = keys[0], PHILOX_M1 * s0
    x0, y1 = (p1 >> 32) ^ bhi ^ k0, p1 & MASK32  # new c0 and c1: numbers
    torch.mul(a, PHILOX_M0, out=b)  # p0; b is the new c3 (raw)
    torch.bitwise_right_shift(b, 32, out=c).bitwise_xor_(s1 ^ k1).bitwise_and_(MASK32)  # new c2
    # round 1: c0 and c1 are numbers, so p0 is a number and the new c3 too
    (k0, k1), q0 = keys[1], x0 * PHILOX_M0
    torch.mul(c, PHILOX_M1, out=d)  # p1; d is the new c1 (raw)
    torch.bitwise_right_shift(d, 32, out=a).bitwise_xor_(y1 ^ k0).bitwise_and_(MASK32)  # new c0
    torch.bitwise_xor(b, (q0 >> 32) ^ k1, out=c).bitwise_and_(MASK32)  # new c2 (b: old c3, raw)
    z3 = q0 & MASK32  # new c3: a number
    # round 2: every word but c3 is a tensor
    (k0, k1) = keys[2]
    last = len(keys) == 3
    p0, p1 = (lanes[3], lanes[1]) if last else (b, e)
    torch.mul(a, PHILOX_M0, out=p0)
    torch.mul(c, PHILOX_M1, out=p1)
    c0, c2 = (lanes[0], lanes[2]) if last else (a, c)
    torch.bitwise_right_shift(p1, 32, out=c0).bitwise_xor_(d).bitwise_xor_(k0).bitwise_and_(MASK32)
    torch.bitwise_right_shift(p0, 32, out=c2).bitwise_xor_(z3 ^ k1).bitwise_and_(MASK32)
    c1, c3, spare = p1, p0, (d, f)
    for r in range(3, len(keys)):
        k0, k1 = keys[r]
        if r == len(keys) - 1:  # the last round writes straight into the lanes
            p0, p1, n0, n2 = lanes[3], lanes[1], lanes[0], lanes[2]
        else:
            (p0, p1), n0, n2 = spare, c0, c2
        torch.mul(c0, PHILOX_M0, out=p0)
        torch.mul(c2, PHILOX_M1, out=p1)
        torch.bitwise_right_shift(p1, 32, out=n0).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(MASK32)
        torch.bitwise_right_shift(p0, 32, out=n2).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(MASK32)
        spare, c1, c3, c0, c2 = (c3, c1), p1, p0, n0, n2


def low_words(lanes: torch.Tensor, nb: int) -> torch.Tensor:
    """The u32 words of ``lanes`` (int64 ``(4, >=nb)``) in element order as an int32 view ``(nb, 4)``: the low
    halves, reinterpreted (bit 31 is the sign). No copy."""
    return lanes.view(torch.int32)[:, _LOW:2 * nb:2].t()


def _scratch(n: int, device, dtype=torch.int64) -> torch.Tensor:
    return torch.empty(n, dtype=dtype, device=device)


def words_torch(seed: int, stream: int, start: int, count: int, device=None) -> torch.Tensor:
    """int64 tensor of the uint32 words of elements [start, start+count) on ``device``."""
    seed = check_seed(seed)
    out = torch.empty(count, dtype=torch.int64, device=device)
    if count == 0:
        return out
    check_torch_integers(out.device)
    first, last = start >> 2, (start + count - 1) >> 2
    done = 0
    for b0, nb in block_batches(first, last + 1, 1 << 16):
        lanes = _scratch(4 * nb, out.device).view(4, nb)
        philox_torch(seed, stream, b0, lanes, _scratch(6 * nb, out.device).view(6, nb))
        off = max(start - 4 * b0, 0)
        take = min(4 * nb - off, count - done)
        if off == 0 and take == 4 * nb:  # whole blocks: straight into out, in element order, upper bits cleared
            torch.bitwise_and(lanes.t(), MASK32, out=out[done:done + take].view(nb, 4))
        else:
            out[done:done + take] = torch.bitwise_and(lanes.t(), MASK32).reshape(-1)[off:off + take]
        done += take
    return out


def block_batches(first: int, stop: int, size: int):
    """(first block, count) of batches of at most ``size`` blocks covering ``[first, stop)``, split at multiples of
    2**32 (Philox's counter word 1 is then one number per batch)."""
    b = first
    while b < stop:
        nb = min(size, stop - b, ((b >> 32) + 1 << 32) - b)
        yield b, nb
        b += nb


# Normal transform on float64 bits: with m = w & 0x7FFFFFFF, d = m + 0.5 = n / 2 is exact in float64 and its
# exponent field is 1022 + e (e = bit_length(n) - 1), so the top bits of d, (bits >> 45), are 128 * (1022 + e) + j:
# the table index plus a constant, which the tables absorb (NORMAL_TABLE_BASE unused leading entries). The 45 bits
# below are f * 2**45 exactly (f has at most 24 significant bits), and f32(F) * (D * 2**-45) rounds the same real
# product f * D as the spec's f32(f * D), so the fraction needs no scaling (D * 2**-45 is exact: no D is below
# 2**-81). The sign bit of w is copied onto the magnitude (exact, like the spec's negation).
NORMAL_TABLE_BASE = 1022 << NORMAL_K
_FRACTION_BITS = 45


def _torch_tables(device: torch.device):
    key = str(device)
    if key not in _TABLES:
        a, d = normal_table_np()
        d45 = d * np.float32(2.0**-_FRACTION_BITS)
        if not np.array_equal(d45 * np.float32(2.0**_FRACTION_BITS), d) or (np.abs(d45) < 2.0**-126).any():
            raise SpecError("normal table: D * 2**-45 is not exact")  # cannot happen with the v1 table
        pad = np.full(NORMAL_TABLE_BASE, np.nan, np.float32)  # never indexed (a wrong index shows as NaN)
        _TABLES[key] = tuple(torch.from_numpy(np.concatenate([pad, t])).to(device) for t in (a, d45))
    return _TABLES[key]


_TABLES: dict = {}


def normal_into(words: torch.Tensor, low: torch.Tensor, z: torch.Tensor, f64: torch.Tensor,
                idx: torch.Tensor) -> torch.Tensor:
    """Standard normals of ``words`` into ``z`` (float32, contiguous, ``words.numel()`` elements), spec §5.3.

    ``words``: int64 of any shape and strides whose low 32 bits are the words (upper bits ignored); ``low``: the same
    words as int32 (only their sign bit is read), same shape. ``f64``/``idx``: contiguous float64/int64 scratch of
    ``words.numel()`` elements that ``z`` does not overlap. Nine kernels; every float64 value is exact, and the two
    float32 roundings are separate kernels (no fused multiply-add)."""
    tab_a, tab_d = _torch_tables(z.device)
    d = f64.view(words.shape)
    torch.bitwise_and(words, 0x7FFFFFFF, out=d)  # m, converted exactly (< 2**31), in element order
    d.add_(0.5)  # n / 2, exact
    bits = f64.view(torch.int64)
    torch.bitwise_right_shift(bits, _FRACTION_BITS, out=idx)  # NORMAL_TABLE_BASE + 128 e + j
    torch.bitwise_and(bits, (1 << _FRACTION_BITS) - 1, out=z)  # f * 2**45: an integer of <= 24 bits, exact
    t = f64.view(torch.float32)[:z.numel()]  # d is dead now: its first half takes the gathered table entries
    torch.index_select(tab_d, 0, idx, out=t)
    z.mul_(t)  # f * D, one rounding
    torch.index_select(tab_a, 0, idx, out=t)
    z.add_(t)  # A + f * D, one rounding
    zs = z.view(words.shape)
    return torch.copysign(zs, low.view(torch.float32), out=zs).view(-1)  # the sign bit of w (exact)


def uniform_odd_into(words: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``2 * (w >> 9) + 1`` as float32 (exact: < 2**24) into ``out``; the uniform is that times 2**-24 (§5.1).
    ``scratch``: contiguous int64 of ``words.numel()`` elements."""
    s = scratch.view(words.shape)
    torch.bitwise_right_shift(words, 8, out=s).bitwise_or_(1)  # bits 8..31 of w, lowest bit set: 2k + 1 (+ garbage)
    return torch.bitwise_and(s, 0xFFFFFF, out=out.view(words.shape)).view(-1)


def check_torch_integers(device: torch.device) -> None:
    """The torch path relies on int64 multiplication wrapping modulo 2**64 (C++ leaves signed overflow undefined,
    every torch backend wraps). Checked once per device, on enough elements to reach vectorised and scalar loops,
    against Python's exact integers; a backend that does otherwise is refused rather than trusted with bits."""
    key = str(device)
    if key in _INTEGERS_OK:
        return
    xs = [(i * 0x9E3779B97F4A7C15 >> 32) & MASK32 for i in range(1, 1030)] + [MASK32, 0x80000000]
    t = torch.tensor(xs, dtype=torch.int64, device=device)
    for m in (PHILOX_M0, PHILOX_M1):
        p = torch.mul(t, m)
        got = torch.stack([(p >> 32) & MASK32, p & MASK32]).cpu().tolist()
        if got != [[x * m >> 32 for x in xs], [x * m & MASK32 for x in xs]]:
            raise SpecError(f"torch int64 multiplication on {device} does not wrap modulo 2**64: the torch generator "
                            "cannot run there (use the CPU)")
    _INTEGERS_OK.add(key)


_INTEGERS_OK: set = set()


def _low_of(words: torch.Tensor) -> torch.Tensor:
    return words.contiguous().view(torch.int32)[_LOW::2]


def uniform_torch(words: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) float32 of int64 words (spec §5.1)."""
    out = torch.empty(words.numel(), dtype=torch.float32, device=words.device)
    uniform_odd_into(words.reshape(-1), out, torch.empty(words.numel(), dtype=torch.int64, device=words.device))
    return out.mul_(2.0**-24).view(words.shape)


def sign_torch(words: torch.Tensor) -> torch.Tensor:
    """+-1.0 float32 from the top bit of int64 words (spec §5.2)."""
    out = torch.ones(words.numel(), dtype=torch.float32, device=words.device)
    return out.masked_fill_(_low_of(words) < 0, -1.0).view(words.shape)


def normal_torch(words: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 of int64 words (spec §5.3)."""
    w = words.reshape(-1)
    n, dev = w.numel(), w.device
    z = torch.empty(n, dtype=torch.float32, device=dev)
    normal_into(w, _low_of(w), z, torch.empty(n, dtype=torch.float64, device=dev),
                torch.empty(n, dtype=torch.int64, device=dev))
    return z.view(words.shape)
