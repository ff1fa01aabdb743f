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

# Elements generated per torch chunk: bounded memory (a few MB of int64 temporaries) whatever the tensor size.
DEFAULT_CHUNK = 1 << 18
# On a GPU each of the ~100 eager ops per chunk is a kernel launch: larger chunks amortise them (~300 MB peak).
DEFAULT_CHUNK_ACCELERATOR = 1 << 21


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
# ----------------------------------------------------------------------------------------------------------------

def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a*m for a in [0, 2**32) held in int64, without any int64 overflow."""
    mh, ml = m >> 16, m & 0xFFFF
    p1 = a * ml  # < 2**48
    p2 = a * mh  # < 2**48
    hi = (p2 + (p1 >> 16)) >> 16
    lo = (p1 + ((p2 & 0xFFFF) << 16)) & MASK32
    return hi, lo


def words_torch(seed: int, stream: int, start: int, count: int, device=None) -> torch.Tensor:
    """int64 tensor of the uint32 words of elements [start, start+count) on ``device``."""
    seed = check_seed(seed)
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    first, last = start >> 2, (start + count - 1) >> 2
    blocks = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    keys = _key_schedule(seed)
    s0, s1 = stream & MASK32, stream >> 32
    # Round 1: c2, c3 are per-stream constants, so M1*c2 is a Python integer.
    c0, c1 = blocks & MASK32, blocks >> 32
    p = PHILOX_M1 * s0
    phi, plo = p >> 32, p & MASK32  # Python integers
    hi0, lo0 = _mulhilo(c0, PHILOX_M0)
    k0, k1 = keys[0]
    c0, c1, c2, c3 = c1 ^ (phi ^ k0), torch.full_like(c0, plo), hi0 ^ (s1 ^ k1), lo0
    for k0, k1 in keys[1:]:
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    out = torch.stack([c0, c1, c2, c3], dim=1).reshape(-1)
    off = start - (first << 2)
    return out[off:off + count]


def uniform_torch(words: torch.Tensor) -> torch.Tensor:
    return ((words >> 9) * 2 + 1).to(torch.float32) * (2.0**-24)


def sign_torch(words: torch.Tensor) -> torch.Tensor:
    return 1.0 - ((words >> 31) * 2).to(torch.float32)  # exact: 1 - 0 or 1 - 2


_TABLES: dict = {}


def _torch_tables(device: torch.device):
    key = str(device)
    if key not in _TABLES:
        a, d = normal_table_np()
        _TABLES[key] = (
            torch.from_numpy(a.copy()).to(device),
            torch.from_numpy(d.copy()).to(device),
            torch.from_numpy(_POW2NEG_NP.copy()).to(device),
        )
    return _TABLES[key]


def normal_torch(words: torch.Tensor) -> torch.Tensor:
    a, d, pow2neg = _torch_tables(words.device)
    n = (words & 0x7FFFFFFF) * 2 + 1
    # bit_length(n) - 1 via frexp of the exactly converted float64 (n < 2**32 is exact in float64).
    e = torch.frexp(n.to(torch.float64)).exponent.to(torch.int64) - 1
    r = (n - torch.bitwise_left_shift(torch.ones_like(e), e)) << NORMAL_K
    j = r >> e
    rem = r - (j << e)
    sh = (e - 24).clamp_(min=0)
    f = (rem >> sh).to(torch.float32) * pow2neg[e - sh]
    idx = (e << NORMAL_K) + j
    mag = a[idx] + f * d[idx]  # separate mul and add kernels: no FMA contraction
    return torch.where((words >> 31) == 1, -mag, mag)
