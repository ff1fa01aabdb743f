"""Decoding the ANS core (spec/FORMAT.md §6.3) fast: a compiled decoder (``_ans.c``) with constriction as fallback.

Every ANS stream freezepack reads (v1 ``ans-bernoulli``/``ans-gaps``, v2 ``ans-ctx`` and ``planes``) is decoded
through :class:`Decoder`, one run of symbols with one integer model per call. constriction's ``AnsCoder.decode``
costs ~25 ns a symbol, mostly per-symbol dispatch; the C loop does the same integer steps in a few ns.

The C source is built like the generator's kernel (``native.build_and_load``: system compiler, per-user cache keyed
by source hash and flags) and, before first use in a process, checked against constriction on random streams and
random garbage: the symbols decoded and whether the stream ends exactly. When there is no compiler, the build or the
check fails, or ``FREEZEPACK_NO_NATIVE=1`` is set, :class:`Decoder` uses constriction: same symbols, same errors.
Encoding stays on constriction (the writer's speed matters less, and its bytes are pinned by golden vectors).
"""
from __future__ import annotations

import ctypes
import functools
import sys

import numpy as np

from . import native

PRECISION = 24
ONE = 1 << PRECISION
ABI_VERSION = 1

_lib = None                  # the loaded, checked library (native.load_once)
_failure: str | None = None  # why it is unavailable


class Model:
    """An integer model of the ANS core: ``probs[s] >= 1`` summing to 2**24; symbol s owns [cdf[s], cdf[s+1])."""

    __slots__ = ("probs", "cdf", "_cdf_ptr", "_constriction")

    def __init__(self, probs):
        p = np.asarray(probs, dtype=np.int64).reshape(-1)
        if p.size < 1 or p.size > 65536 or p.min() < 1 or int(p.sum()) != ONE:
            raise ValueError("an ANS model needs 1 to 65536 probabilities >= 1 summing to 2**24")
        self.probs = p
        self.cdf = np.concatenate([[0], np.cumsum(p)]).astype(np.uint32)
        self.cdf.flags.writeable = False
        self._cdf_ptr = self.cdf.ctypes.data  # (reading .ctypes costs microseconds a call; models are cached)
        self._constriction = None

    @property
    def size(self) -> int:
        return int(self.probs.size)

    def constriction(self):
        """constriction's model with exactly these probabilities: float64 weights ``prob - 1`` (integers summing
        to 2**24 - m) with ``perfect=False`` quantize to ``prob`` (spec §12.7.1)."""
        if self._constriction is None:
            import constriction

            self._constriction = constriction.stream.model.Categorical((self.probs - 1).astype(np.float64),
                                                                       perfect=False)
        return self._constriction


@functools.lru_cache(maxsize=512)
def _model(probs: tuple) -> Model:
    return Model(probs)


def model(probs) -> Model:
    """The (cached) :class:`Model` for integer probabilities ``probs``."""
    return _model(tuple(int(p) for p in probs))


def binary(cdf1: int) -> Model:
    """Two symbols: 0 owns [0, cdf1), 1 owns [cdf1, 2**24)."""
    return model((cdf1, ONE - cdf1))


@functools.lru_cache(maxsize=32)
def uniform(bits: int) -> Model:
    """``2**bits`` symbols of probability ``2**(24 - bits)`` each."""
    return Model(np.full(1 << bits, 1 << (PRECISION - bits), dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------------
# the compiled decoder
# ---------------------------------------------------------------------------------------------------------------

def available() -> bool:
    """Whether the compiled decoder is used in this process (builds and checks it on first call)."""
    return not native.disabled() and _load() is not None


def unavailable_reason() -> str | None:
    if native.disabled():
        return "FREEZEPACK_NO_NATIVE is set"
    return None if _load() is not None else _failure


def _bind(path: str):
    lib = native.open_library(path, "fp_ans_abi_version", ABI_VERSION)
    ptr, u32, u64, i64, i32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int
    lib.fp_ans_decode.restype = i32
    lib.fp_ans_decode.argtypes = [ptr, ptr, ptr, u32, u64, ptr, i64, i32, ptr, ptr]
    lib.fp_ctx_bins.restype = i32
    lib.fp_ctx_bins.argtypes = [ptr, u64, u32, ptr]
    lib.fp_group.restype = i64
    lib.fp_group.argtypes = [ptr, ptr, u64, u32, ptr, ptr]
    return lib


def quantize_counts(counts) -> np.ndarray:
    """Probabilities (sum 2**24, each >= 1) for symbol counts: w = floor(c * T / S) with T = 2**24 - m, the
    remainder given one unit at a time to the first symbols, then +1 each (integer arithmetic only)."""
    counts = [int(c) for c in counts]
    m, s = len(counts), sum(counts)
    total = ONE - m
    w = [c * total // s for c in counts]
    for j in range(total - sum(w)):
        w[j] += 1
    return np.array(w, dtype=np.int64) + 1


def _check_models(rng: np.random.Generator) -> list[Model]:
    """Models that reach every path of the C decoder: binary at both extremes, a few symbols, a skewed 256-symbol
    table, a table whose slots hold many symbols, and the uniform 16-bit model."""
    def counts(c):
        return model(quantize_counts(c))

    skew = np.maximum((1e6 * 0.7 ** np.arange(256)).astype(np.int64), 1)
    crowded = np.ones(300, dtype=np.int64)
    crowded[0] = ONE - 299
    return [binary(1), binary(ONE - 1), binary(int(rng.integers(1, ONE))), counts([5, 1, 3, 9, 2]), counts(skew),
            model(np.roll(crowded, 150)), uniform(16)]


def _self_check(lib) -> None:
    """The compiled decoder must equal constriction on streams constriction wrote (several models in one stream,
    runs shorter and longer than the lookup-table threshold) and on random words, where it must also agree on
    whether the stream ended exactly."""
    import constriction

    rng = np.random.default_rng(20261125)
    models = _check_models(rng)
    plan = [(m, int(n)) for m in models for n in (1, 37, 300)]
    enc = constriction.stream.stack.AnsCoder()
    # symbols drawn from each model: the symbol holding a uniform random quantile
    runs = [(np.searchsorted(m.cdf, rng.integers(0, ONE, size=n), side="right") - 1).astype(np.int32) for m, n in plan]
    for (m, _), syms in zip(reversed(plan), reversed(runs)):
        enc.encode_reverse(syms, m.constriction())
    streams: list[tuple[np.ndarray, list[np.ndarray] | None]] = [(np.asarray(enc.get_compressed(), dtype=np.uint32),
                                                                   runs)]
    for size in (1, 2, 50):
        garbage = rng.integers(0, 2**32, size=size, dtype=np.uint64).astype(np.uint32)
        garbage[-1] |= 1
        streams.append((garbage, None))
    for words, expect in streams:
        ours, ref = Decoder(words, lib=lib), Decoder(words, lib=False)
        for j, (m, n) in enumerate(plan):
            got, want = ours.decode(m, n, dtype=np.int64), ref.decode(m, n, dtype=np.int64)
            if not np.array_equal(got, want) or (expect is not None and not np.array_equal(got, expect[j])):
                raise OSError("compiled ANS decoder differs from constriction")
        if ours.is_empty() != ref.is_empty() or (expect is not None and not ours.is_empty()):
            raise OSError("compiled ANS decoder disagrees with constriction about the end of the stream")
    keys = rng.integers(0, 50, size=1000, dtype=np.uint32) << np.uint32(rng.integers(0, 25))
    for bins in (1, 3, 64):
        if not np.array_equal(ctx_bins(keys, bins, lib=lib), ctx_bins(keys, bins, lib=False)):
            raise OSError("compiled context bins differ from the numpy reference")


def _load():
    return native.load_once(sys.modules[__name__], "ans", _bind, _self_check)


def _lib_or_none(lib):
    """``lib`` when given (None/False = the fallback), else the process's compiled decoder if allowed."""
    if lib is None:
        return _load() if not native.disabled() else None
    return lib or None


class Decoder:
    """A §6.3 stream being decoded. ``words``: its u32 words (the last one popped first; a non-empty stream must
    not end in a zero word: ValueError, as constriction). ``lib=False`` forces constriction (tests, self-check)."""

    def __init__(self, words, *, lib=None):
        words = np.asarray(words).reshape(-1)
        # the C decoder reads the stream as padded[1 .. left]; padded[0] is a pad it may read but never uses
        self._padded = np.zeros(words.size + 1, dtype=np.uint32)
        self._padded[1:] = words
        self._words = self._padded[1:]
        if self._words.size and self._words[-1] == 0:
            raise ValueError("an ANS stream never ends in a zero word")
        self._lib = _lib_or_none(lib)
        if self._lib is None:
            import constriction

            self._coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(self._words))
            return
        left, state = self._words.size, 0
        if left:  # the spec's start: pop words until the state holds at least 2**32 (or none are left)
            state = int(self._padded[left])
            left -= 1
            if left and state < 1 << 32:
                state = (state << 32) | int(self._padded[left])
                left -= 1
        self._io = np.array([left, state], dtype=np.uint64)
        self._ptrs = self._padded.ctypes.data, self._io.ctypes.data

    @property
    def native(self) -> bool:
        return self._lib is not None

    def decode(self, m: Model, n: int, *, out: np.ndarray | None = None, dtype=np.uint8,
               values: np.ndarray | None = None, index: np.ndarray | None = None) -> np.ndarray:
        """Decode ``n`` symbols with model ``m`` into ``out`` (a 1-D uint8 or int64 array of ``n`` elements, any
        stride; by default a new ``dtype`` array) and return it; with ``values`` (uint8, one per symbol) write
        ``values[s]`` instead of ``s``; with ``index`` (uint32, ``n`` positions in ``out``, which may then have
        any size) symbol i goes to ``out[index[i]]``."""
        n = int(n)
        if out is None:
            out = np.empty(n, dtype=dtype)
        if out.ndim != 1 or (index is None and out.shape[0] != n) or out.dtype not in (np.uint8, np.int64) or \
                not out.flags.writeable:
            raise ValueError("out must be a writeable 1-D uint8 or int64 array of n elements")
        if index is not None:
            index = np.asarray(index)
            if index.shape != (n,) or index.dtype.kind not in "iu" or (
                    n and (int(index.min()) < 0 or int(index.max()) >= out.shape[0])):
                raise ValueError("index needs n positions inside out")
            if self._lib is None or out.shape[0] > 1 << 32:  # (positions past uint32: scatter in numpy)
                out[index] = self.decode(m, n, dtype=out.dtype, values=values)
                return out
            index = np.ascontiguousarray(index, dtype=np.uint32)
        if values is not None:
            values = np.ascontiguousarray(values, dtype=np.uint8)
            if values.size != m.size:
                raise ValueError("values needs one byte per symbol")
        if self._lib is None:
            sym = self._coder.decode(m.constriction(), n) if n else np.zeros(0, np.int32)
            out[...] = values[sym] if values is not None else sym
            return out
        if m.size > 256 and out.dtype == np.uint8 and values is None:
            raise ValueError("symbols above 255 need an int64 output")
        rc = self._lib.fp_ans_decode(*self._ptrs, m._cdf_ptr, m.size, n, out.ctypes.data, out.strides[0], out.itemsize,
                                     None if values is None else values.ctypes.data,
                                     None if index is None else index.ctypes.data)
        if rc != 0:
            raise RuntimeError(f"compiled ANS decoder rejected its arguments (rc={rc})")
        return out

    def is_empty(self) -> bool:
        """True when the stream ended exactly: no words left and state 0 (spec §6.3)."""
        if self._lib is None:
            return bool(self._coder.is_empty())
        return int(self._io[0]) == 0 and int(self._io[1]) == 0


# ---------------------------------------------------------------------------------------------------------------
# context ranks (spec §12.7.2)
# ---------------------------------------------------------------------------------------------------------------

def key_order(keys: np.ndarray) -> np.ndarray:
    """Positions sorted by (key, position) for uint32 keys: two stable radix passes over 16-bit halves (numpy sorts
    16-bit integers by radix), O(n) where a stable argsort of uint32 is a merge sort."""
    k = np.ascontiguousarray(keys, dtype=np.uint32)
    order = np.argsort((k & 0xFFFF).astype(np.uint16), kind="stable")
    return order[np.argsort((k >> 16).astype(np.uint16)[order], kind="stable")]


def ctx_bins(keys: np.ndarray, bins: int, *, lib=None) -> np.ndarray:
    """uint8 ``bin[i] = floor(rank[i] * bins / n)``, rank by (key, i), for ``1 <= bins <= 256``."""
    k = np.ascontiguousarray(np.asarray(keys).reshape(-1), dtype=np.uint32)
    n = k.size
    if not 1 <= bins <= 256:
        raise ValueError("bins must be in 1..256")
    out = np.empty(n, dtype=np.uint8)
    lib = _lib_or_none(lib)
    if lib is not None and n < 1 << 32 and lib.fp_ctx_bins(k.ctypes.data, n, bins, out.ctypes.data) == 0:
        return out
    out[key_order(k)] = (np.arange(n, dtype=np.int64) * bins // max(n, 1)).astype(np.uint8)
    return out


def group(keys: np.ndarray, groups: int, active: np.ndarray | None = None, *, lib=None):
    """(order, sizes): the positions ``i`` with ``active[i]`` (all when None) grouped by ``keys[i]`` (uint8,
    ``< groups``), ascending ``i`` within a group (uint32; int64 past 2**32 entries), and each group's size."""
    k = np.ascontiguousarray(np.asarray(keys).reshape(-1), dtype=np.uint8)
    n = k.size
    act = None if active is None else np.ascontiguousarray(active, dtype=np.bool_).reshape(-1)
    if not 1 <= groups <= 256 or (act is not None and act.size != n):
        raise ValueError("groups must be in 1..256 and active one flag per key")
    lib = _lib_or_none(lib)
    if lib is not None and n <= 1 << 32:
        order: np.ndarray = np.empty(n if act is None else int(np.count_nonzero(act)), dtype=np.uint32)
        sizes = np.zeros(groups, dtype=np.uint64)
        got = lib.fp_group(k.ctypes.data, None if act is None else act.ctypes.data, n, groups, order.ctypes.data,
                           sizes.ctypes.data)
        if got < 0:
            raise ValueError(f"a key is not below {groups}")
        return order, sizes.astype(np.int64)
    sel = None if act is None else np.flatnonzero(act)
    b = k if sel is None else k[sel]
    if b.size and int(b.max()) >= groups:
        raise ValueError(f"a key is not below {groups}")
    order = np.argsort(b, kind="stable")
    if sel is not None:
        order = sel[order]
    return order.astype(np.uint32 if n <= 1 << 32 else np.int64), np.bincount(b, minlength=groups).astype(np.int64)
