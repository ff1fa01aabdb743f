"""The spec'd generator: Philox4x32-10 bits and their exact conversions (spec/RNG.md, ``philox4x32-10/v1``).

Element ``i`` of the tensor stream ``s`` under seed ``k`` is a pure function of ``(k, s, i)``:
    block = i // 4, lane = i % 4
    word  = Philox4x32-10(counter=(block_lo, block_hi, s_lo, s_hi), key=(k_lo, k_hi))[lane]
so launch geometry, chunk size, device and thread count cannot change a bit.

Two implementations live here and must agree bit for bit: a plain numpy reference (``*_np``; uint64 arithmetic,
written for clarity) and a torch implementation (``PhiloxTorch``, ``normal_into``, ``*_torch``) that runs on the
tensor's device, built for few kernels (freezepack/format/eager.py drives it in batches). Its integers are exact:
Philox products wrap modulo 2**64 in int64, which every torch backend does and ``check_torch_integers`` proves per
device, and the normal transform's float64 values are all exact. Its float32 math is the spec's correctly rounded
multiply and add, issued as separate eager kernels, so nothing can be contracted into an FMA.
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
# Words travel as int32 tensors holding the u32 words' bits (bit 31 is the sign); the public ``*_torch`` functions
# take and give int64 tensors of the u32 values, as the numpy reference does.
# ----------------------------------------------------------------------------------------------------------------

_LO, _HI = (0, 1) if sys.byteorder == "little" else (1, 0)  # int32 halves of an int64


def _half(t: torch.Tensor, which: int) -> torch.Tensor:
    """The low (``_LO``) or high (``_HI``) 32 bits of each int64 of ``t`` as an int32 view (no copy)."""
    return t.view(torch.int32)[..., which::2]


class PhiloxTorch:
    """Philox4x32-10 words of one ``(seed, stream)`` on one device, a batch of blocks at a time, with torch kernels
    that write into a caller's :class:`PhiloxBuffers` (nothing allocates per batch).

    A kernel costs about a microsecond of dispatch whatever its size, and a pass over memory whatever it computes,
    so a batch is shaped for few kernels:

    * ``c * M`` (both < 2**32) is one int64 multiply: it wraps modulo 2**64, so its int32 halves *are* hi and lo
      (two's complement; :func:`check_torch_integers`). Views of the halves replace shifts and masks: the next
      multiplicand ``hi ^ c ^ k`` is written as int32 into the low halves of an int64 whose high halves stay zero.
    * Rounds 0 and 1 have number halves: counter words 1-3 are one number for a whole batch (batches never cross a
      multiple of 2**32 blocks).
    * From round 2 on, the multiplicands ``c0, c2`` are the two rows of one ``(2, nb)`` tensor, multiplied by a
      column (M0, M1), so each step is one kernel for both. Each round they swap rows (``c0'`` comes from the
      ``c2`` row): the columns alternate, and the products go into a three-row buffer whose row 2 repeats row 0,
      so its rows 1-2 are them in the order the next round pairs them. The next round's keys are xored into the
      products' low halves (the high halves are unaffected), row 0's on its way to row 2.

    Four kernels a round (multiply, two key xors, xor of two halves), 39 a batch."""

    def __init__(self, seed: int, stream: int, device):
        self.seed, self.stream, self.device = check_seed(seed), int(stream), torch.device(device)
        self.keys = _key_schedule(self.seed)
        self.m0, self.m1, self.mul_col, self.key_rows = _philox_constants(self.seed, self.device)
        self._early: dict = {}  # block >> 32 -> the number halves of rounds 0-2

    def _early_rounds(self, bhi: int):
        """The numbers xored in rounds 0-2 for blocks ``bhi << 32 ...``: into c2 (round 0), c0 and c2 (round 1), c1
        and c3 (round 2), as 0-dim tensors."""
        if bhi not in self._early:
            s0, s1 = self.stream & MASK32, self.stream >> 32
            (k0, k1), p1 = self.keys[0], PHILOX_M1 * s0  # round 0: (c0..c3) = (block_lo, bhi, s0, s1)
            x0, y1 = (p1 >> 32) ^ bhi ^ k0, p1 & MASK32  # its c0 and c1 are numbers
            (k0, k1), q0 = self.keys[1], x0 * PHILOX_M0  # round 1: so its p0 is a number, and its c3
            k0_2, k1_2 = self.keys[2]
            i32 = functools.partial(torch.tensor, dtype=torch.int32, device=self.device)
            signed = lambda v: v - (1 << 32) if v >> 31 else v  # noqa: E731 (the u32's bits as an int32)
            self._early[bhi] = (i32(signed(s1 ^ self.keys[0][1])), i32(signed(y1 ^ k0)),
                                i32(signed((q0 >> 32) ^ k1)), torch.tensor(k0_2, dtype=torch.int64, device=self.device),
                                i32(signed((q0 & MASK32) ^ k1_2)))
        return self._early[bhi]

    def words(self, first_block: int, buf: PhiloxBuffers) -> torch.Tensor:
        """Words of blocks ``[first_block, first_block + buf.nb)`` into ``buf.lanes`` (int32 ``(4, nb)``): row ``r``
        holds word ``r`` of every block (the u32 bits; bit 31 is the sign), so element ``4 i + r`` of the batch is
        ``lanes[r, i]``."""
        nb = buf.nb
        bhi = first_block >> 32
        if (first_block + nb - 1) >> 32 != bhi:
            raise ValueError("a Philox batch must not cross a multiple of 2**32 blocks")
        key_c2, key_c0, key_c2b, key_c1, key_c3 = self._early_rounds(bhi)
        lo = first_block & MASK32
        torch.arange(lo, lo + nb, out=buf.a)  # round 0: c0 = the block's low half (high halves: zero)
        torch.mul(buf.a, self.m0, out=buf.b)  # p0; its low half is the next c3
        torch.bitwise_xor(buf.b_hi, key_c2, out=buf.c_lo)  # next c2 = hi(p0) ^ s1 ^ k1
        torch.mul(buf.c, self.m1, out=buf.d)  # round 1: p1; its low half is the next c1
        torch.bitwise_xor(buf.d_hi, key_c0, out=buf.a_lo)  # next c0 = hi(p1) ^ c1 ^ k0, c1 a number
        torch.bitwise_xor(buf.b_lo, key_c2b, out=buf.c_lo)  # next c2 = hi(p0, a number) ^ c3 ^ k1
        buf.d.bitwise_xor_(key_c1)  # round 2's k0, into c1's bits
        # round 2: x = (c0, c2); c3 is a number, so the pairing is row by row
        last = len(self.keys) - 1
        torch.mul(buf.x, self.mul_col[0], out=buf.products[1])
        self._rekey(buf, 1, 3)
        torch.bitwise_xor(buf.p_hi[1][0], key_c3, out=buf.x_lo[0])  # c2' = hi(p0) ^ c3 ^ k1
        torch.bitwise_xor(buf.p_hi[1][1], buf.d_lo, out=buf.x_lo[1])  # c0' = hi(p1) ^ c1 ^ k0
        for r in range(3, last):
            h = r % 2  # the products go to the buffer the previous round did not use
            torch.mul(buf.x, self.mul_col[h], out=buf.products[1 - h])
            self._rekey(buf, 1 - h, r + 1)
            torch.bitwise_xor(buf.p_hi[1 - h], buf.swapped_lo[h], out=buf.x_lo)
        # the last round (odd: x = (c2, c0)) writes (c0, c2) and the products' low halves (c1, c3) into the lanes
        p = buf.products[1 - last % 2]
        torch.mul(buf.x, self.mul_col[last % 2], out=p)
        torch.bitwise_xor(buf.p_hi[1 - last % 2], buf.swapped_lo[last % 2], out=buf.lanes02)
        buf.lanes13.copy_(_half(p, _LO))
        return buf.lanes

    def _rekey(self, buf: PhiloxBuffers, i: int, r: int) -> None:
        """Round ``r``'s keys into the low halves of product buffer ``i``, and row 0 (with its key) into row 2."""
        buf.rows[i][1].bitwise_xor_(self.key_rows[r][1])
        torch.bitwise_xor(buf.rows[i][0], self.key_rows[r][0], out=buf.rows[i][2])


@functools.lru_cache(maxsize=64)
def _philox_constants(seed: int, device: torch.device):
    """A seed's tensors for PhiloxTorch (made once: a model's tensors share its seed)."""
    t = functools.partial(torch.tensor, dtype=torch.int64, device=device)
    # round r >= 2 has the multiplicands in order (c0, c2) when r is even, (c2, c0) when odd
    mul_col = (t([[PHILOX_M0], [PHILOX_M1]]), t([[PHILOX_M1], [PHILOX_M0]]))
    # round r's keys for the rows of round r-1's products: rows 1 and 2 (the copy of row 0) are round r's (c3, c1)
    # when r is even, (c1, c3) when odd; c1 takes k0 and c3 k1
    key_rows = [(t(k0), t(k1)) if r % 2 == 0 else (t(k1), t(k0)) for r, (k0, k1) in enumerate(_key_schedule(seed))]
    return t(PHILOX_M0), t(PHILOX_M1), mul_col, key_rows


class PhiloxBuffers:
    """The tensors and views :meth:`PhiloxTorch.words` works in for batches of ``nb`` blocks, made once (slicing a
    tensor costs about as much as a small kernel): ``lanes`` int32 ``(4, nb)`` contiguous (the output) and
    ``scratch`` int64 ``(ROWS, >= nb)`` with contiguous rows. Rows 0-1 hold the multiplicands, whose high halves
    must stay zero: they are zeroed here, and only rows 2-7 may be borrowed between batches."""

    ROWS = 8

    def __init__(self, lanes: torch.Tensor, scratch: torch.Tensor):
        self.nb = nb = lanes.shape[1]
        scratch[0:2].zero_()
        self.lanes, self.lanes02, self.lanes13 = lanes, lanes[0::2], lanes[1::2]
        self.x = scratch[0:2, :nb]
        self.x_lo = _half(self.x, _LO)
        self.a, self.c = self.x[0], self.x[1]
        self.a_lo, self.c_lo = self.x_lo[0], self.x_lo[1]
        bufs = (scratch[2:5, :nb], scratch[5:8, :nb])  # products, row 2 a copy of row 0
        self.b, self.d = bufs[0][0], bufs[0][1]  # rounds 0-1 (round 2 writes bufs[1], round 3 bufs[0])
        self.b_lo, self.b_hi, self.d_lo, self.d_hi = (_half(t, w) for t in (self.b, self.d) for w in (_LO, _HI))
        self.products = [q[0:2] for q in bufs]
        self.rows = [(q[0], q[1], q[2]) for q in bufs]
        self.p_hi = [_half(q[0:2], _HI) for q in bufs]
        self.swapped_lo = [_half(q[1:3], _LO) for q in bufs]


def element_pieces(lanes: torch.Tensor, lo: int, hi: int):
    """Elements ``[lo, hi)`` of a batch held lane-major (``lanes[r, i]`` is element ``4 i + r``), as ``(offset,
    view)`` pairs in element order: the whole blocks as one transposed ``(k, 4)`` view, a partial block at either
    end as a 1-D view of one column. ``offset``: the piece's first element, counted from ``lo``."""
    first_full, stop_full = (lo + 3) >> 2, hi >> 2
    if first_full > stop_full:  # inside one block
        return [(0, lanes[lo & 3:(lo & 3) + hi - lo, lo >> 2])]
    pieces = []
    if lo & 3:
        pieces.append((0, lanes[lo & 3:, lo >> 2]))
    if stop_full > first_full:
        pieces.append((4 * first_full - lo, lanes[:, first_full:stop_full].t()))
    if hi & 3:
        pieces.append((4 * stop_full - lo, lanes[:hi & 3, stop_full]))
    return pieces


def block_batches(first: int, stop: int, size: int):
    """(first block, count) of batches of at most ``size`` blocks covering ``[first, stop)``, split at multiples of
    2**32 (Philox's counter word 1 is then one number per batch)."""
    b = first
    while b < stop:
        nb = min(size, stop - b, ((b >> 32) + 1 << 32) - b)
        yield b, nb
        b += nb


def words_torch(seed: int, stream: int, start: int, count: int, device=None) -> torch.Tensor:
    """int64 tensor of the uint32 words of elements [start, start+count) on ``device``."""
    seed = check_seed(seed)
    out = torch.empty(count, dtype=torch.int64, device=device)
    if count == 0:
        return out
    check_torch_integers(out.device)
    gen = PhiloxTorch(seed, stream, out.device)
    first, last = start >> 2, (start + count - 1) >> 2
    size = min(last - first + 1, 1 << 16)
    lanes = torch.empty(4 * size, dtype=torch.int32, device=out.device)
    scratch = torch.empty((PhiloxBuffers.ROWS, size), dtype=torch.int64, device=out.device)
    bufs: dict = {}
    for b0, nb in block_batches(first, last + 1, size):
        if nb not in bufs:
            bufs[nb] = PhiloxBuffers(lanes[:4 * nb].view(4, nb), scratch)
        w = gen.words(b0, bufs[nb])
        lo, hi = max(start, 4 * b0), min(start + count, 4 * (b0 + nb))
        for off, piece in element_pieces(w, lo - 4 * b0, hi - 4 * b0):
            dst = out[lo - start + off:lo - start + off + piece.numel()]
            dst.view(piece.shape).copy_(piece)  # int32 -> int64 sign-extends: clear the upper half
            dst.bitwise_and_(MASK32)
    return out


# Normal transform on float64 bits: with m = w & 0x7FFFFFFF, d = m + 0.5 = n / 2 is exact in float64 and its
# exponent field is 1022 + e (e = bit_length(n) - 1), so the top bits of d, (bits >> 45), are 128 * (1022 + e) + j:
# the table index plus a constant, which the tables absorb (NORMAL_TABLE_BASE unused leading entries). The 45 bits
# below are f * 2**45 exactly (f has at most 24 significant bits), and f32(F) * (D * 2**-45) rounds the same real
# product f * D as the spec's f32(f * D), so the fraction needs no scaling (D * 2**-45 is exact while |D| >= 2**-81;
# the table's smallest |D| is about 2**-11). The sign bit of w is copied onto the magnitude (exact, as the spec's
# negation).
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


def _constants(device: torch.device) -> dict:
    """The conversions' constants as 0-dim tensors on ``device`` (a Python number costs a conversion per kernel)."""
    key = str(device)
    if key not in _CONSTANTS:
        i64 = functools.partial(torch.tensor, dtype=torch.int64, device=device)
        _CONSTANTS[key] = {
            "mask31": i64(0x7FFFFFFF), "half": torch.tensor(0.5, dtype=torch.float64, device=device),
            "fraction_shift": i64(_FRACTION_BITS), "fraction_mask": i64((1 << _FRACTION_BITS) - 1),
            "eight": i64(8), "one": i64(1), "mask24": i64(0xFFFFFF)}
    return _CONSTANTS[key]


_CONSTANTS: dict = {}


def normal_into(words: torch.Tensor, z: torch.Tensor, f64: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Standard normals of ``words`` (int32, 1-D: the u32 words' bits) into ``z`` (float32, 1-D), spec §5.3.
    ``f64``/``idx``: contiguous float64/int64 scratch of as many elements, not overlapping ``z``. Nine kernels; every
    float64 value is exact, and the two float32 roundings are separate kernels (no fused multiply-add)."""
    tab_a, tab_d = _torch_tables(z.device)
    k = _constants(z.device)
    torch.bitwise_and(words, k["mask31"], out=f64)  # m, converted exactly
    f64.add_(k["half"])  # n / 2, exact
    bits = f64.view(torch.int64)
    torch.bitwise_right_shift(bits, k["fraction_shift"], out=idx)  # NORMAL_TABLE_BASE + 128 e + j
    torch.bitwise_and(bits, k["fraction_mask"], out=z)  # f * 2**45: an integer of <= 24 bits, exact
    t = f64.view(torch.float32)[:z.numel()]  # f64 is dead now: its first half takes the gathered table entries
    torch.index_select(tab_d, 0, idx, out=t)
    z.mul_(t)  # f * D, one rounding
    torch.index_select(tab_a, 0, idx, out=t)
    z.add_(t)  # A + f * D, one rounding
    return torch.copysign(z, words.view(torch.float32), out=z)  # the sign bit of w (exact)


def uniform_odd_into(words: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``2 * (w >> 9) + 1`` (exact in float32: < 2**24) of ``words`` (int32, 1-D) into ``out``; the uniform is that
    times 2**-24 (§5.1). ``scratch``: int32 of as many elements."""
    k = _constants(out.device)
    torch.bitwise_right_shift(words, k["eight"], out=scratch).bitwise_or_(k["one"])  # bits 8..31 of w, then a 1
    return torch.bitwise_and(scratch, k["mask24"], out=out)  # 2k + 1


def check_torch_integers(device: torch.device) -> None:
    """The torch path relies on int64 multiplication wrapping modulo 2**64 (C++ leaves signed overflow undefined;
    every torch backend wraps). Checked once per device, on enough elements to reach vectorised and scalar loops,
    against Python's exact integers; a backend that does otherwise is refused rather than trusted with bits."""
    key = str(device)
    if key in _INTEGERS_OK:
        return
    xs = [(i * 0x9E3779B97F4A7C15 >> 32) & MASK32 for i in range(1, 1030)] + [MASK32, 0x80000000]
    t = torch.tensor(xs, dtype=torch.int64, device=device)
    for m in (PHILOX_M0, PHILOX_M1):
        p = torch.mul(t, torch.tensor(m, dtype=torch.int64, device=device))
        got = torch.stack([_half(p, _HI), _half(p, _LO)]).to(torch.int64).bitwise_and_(MASK32).cpu().tolist()
        if got != [[x * m >> 32 for x in xs], [x * m & MASK32 for x in xs]]:
            raise SpecError(f"torch int64 multiplication on {device} does not wrap modulo 2**64: the torch generator "
                            "cannot run there (use the CPU)")
    _INTEGERS_OK.add(key)


_INTEGERS_OK: set = set()


def _low_of(words: torch.Tensor) -> torch.Tensor:
    """int64 words -> the same words' bits as int32 (a view of the low halves)."""
    return _half(words.reshape(-1).contiguous(), _LO)


def uniform_torch(words: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) float32 of int64 words (spec §5.1)."""
    w = _low_of(words)
    out = torch.empty(w.numel(), dtype=torch.float32, device=w.device)
    uniform_odd_into(w, out, torch.empty_like(w))
    return out.mul_(2.0**-24).view(words.shape)


def sign_torch(words: torch.Tensor) -> torch.Tensor:
    """+-1.0 float32 from the top bit of int64 words (spec §5.2)."""
    out = torch.ones(words.numel(), dtype=torch.float32, device=words.device)
    return out.masked_fill_(_low_of(words) < 0, -1.0).view(words.shape)


def normal_torch(words: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 of int64 words (spec §5.3)."""
    w = _low_of(words)
    n, dev = w.numel(), w.device
    z = torch.empty(n, dtype=torch.float32, device=dev)
    normal_into(w, z, torch.empty(n, dtype=torch.float64, device=dev), torch.empty(n, dtype=torch.int64, device=dev))
    return z.view(words.shape)
