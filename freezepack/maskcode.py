"""Freezing masks <-> a few bytes (spec/FORMAT.md, "Mask coders").

A mask is a flat boolean array in row-major (C) order, ``True`` = trainable. Three coders exist; the encoder
tries each that applies and keeps the smallest payload, so a file always costs at most
``1.01 * n * h(k/n) / 8 + 16`` bytes for a mask of ``n`` entries with ``k`` trainable ones:

``const``          every entry equal (``k == 0`` or ``k == n``): no payload at all.
``positions``      the sorted indices of the minority value, one little-endian uint32 each: wins when only a
                   handful of entries differ, where an ANS stream's fixed 4-8 byte tail would dominate.
``ans-bernoulli``  constriction's stack ANS coder (32-bit words, 64-bit state, 24-bit probabilities) with an
                   i.i.d. Bernoulli(p = k / n) model quantized by ``from_floating_point_probabilities_fast``
                   (``perfect=False``). The quantized threshold ``cdf1`` is recomputed and cross-checked on load,
                   so a reader in another language needs only integers (the spec gives the decoder).

Coder names are strings in the header: a future coder (e.g. a context model) adds a name, and an old reader
refuses it with a clear message instead of misreading it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import FormatError

PRECISION = 24                    # bits of the ANS probability quantization (constriction's default)
ANS_WORD_BITS = 32
ANS_STATE_BITS = 64
CODERS = ("const", "positions", "ans-bernoulli")


@dataclass(frozen=True)
class CodedMask:
    """A coded mask: the coder's name, its integer parameters and its uint32 payload (may be empty)."""

    coder: str
    ones: int                                   # number of trainable (True) entries
    params: dict = field(default_factory=dict)  # coder-specific integers, stored in the header
    payload: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))

    @property
    def nbytes(self) -> int:
        return int(self.payload.size) * 4


def entropy_bytes(n: int, k: int) -> float:
    """Order-0 entropy of a mask with ``k`` ones among ``n`` entries, in bytes: n * h(k/n) / 8."""
    if n == 0 or k == 0 or k == n:
        return 0.0
    p = k / n
    return n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8


def ans_threshold(n: int, k: int) -> int:
    """``cdf1``: symbol 0 (frozen) owns quantiles [0, cdf1), symbol 1 (trainable) owns [cdf1, 2**24).

    Exactly constriction 0.5's ``fast_quantized_cdf`` for probabilities ``[1 - p, p]``, in IEEE binary64 (Python
    floats are binary64 with round-to-nearest-even, as Rust's f64; no fused operations are involved).
    """
    p = k / n
    free_weight = float((1 << PRECISION) - 2)
    normalization = (1.0 - p) + p
    scale = free_weight / normalization
    return int((1.0 - p) * scale) + 1  # Rust's `as u32` truncates toward zero; the +1 is the leak for symbol 0


def _as_flat_bool(mask) -> np.ndarray:
    if hasattr(mask, "detach"):  # torch tensor, without importing torch here
        mask = mask.detach().cpu().numpy()
    a = np.asarray(mask)
    if a.dtype != np.bool_:
        raise FormatError(f"mask must be boolean, got dtype {a.dtype}")
    return np.ascontiguousarray(a).reshape(-1)


def encode(mask) -> CodedMask:
    """Code a boolean mask (any shape, read in C order) with the smallest applicable coder."""
    flat = _as_flat_bool(mask)
    n = int(flat.size)
    k = int(np.count_nonzero(flat))
    if k == 0 or k == n:
        return CodedMask("const", k)
    candidates = []
    minority = min(k, n - k)
    if n <= 1 << 32 and minority <= 4096:  # few positions can beat the ANS stream's fixed tail: try, keep smaller
        value = 1 if k <= n - k else 0
        idx = np.flatnonzero(flat if value else ~flat).astype("<u4")
        candidates.append(CodedMask("positions", k, {"value": value}, idx))
    candidates.append(_encode_ans(flat, n, k))
    return min(candidates, key=lambda c: c.nbytes)


def _encode_ans(flat: np.ndarray, n: int, k: int) -> CodedMask:
    import constriction  # lazily: only coding and decoding need the compiled coder

    model = constriction.stream.model.Bernoulli(k / n, perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(flat.astype(np.int32), model)
    words = np.asarray(coder.get_compressed(), dtype=np.uint32).astype("<u4")
    return CodedMask("ans-bernoulli", k, {"cdf1": ans_threshold(n, k)}, words)


def check_params(coder: str, n: int, ones: int, params: dict, payload_words: int, *, where=None, tensor=None) -> None:
    """Validate a coded mask's header fields against each other before any decoding work (all untrusted)."""
    if coder not in CODERS:
        raise FormatError(f"unknown mask coder {coder!r}: written by a newer freezepack? (known: "
                          f"{', '.join(CODERS)})", path=where, tensor=tensor)
    if not 0 <= ones <= n:
        raise FormatError(f"mask declares {ones} trainable entries out of {n}", path=where, tensor=tensor)
    expect_keys = {"const": set(), "positions": {"value"}, "ans-bernoulli": {"cdf1"}}[coder]
    if set(params) != expect_keys:
        raise FormatError(f"mask coder {coder!r} needs parameters {sorted(expect_keys)}, got {sorted(params)}",
                          path=where, tensor=tensor)
    if coder == "const":
        if 0 < ones < n:
            raise FormatError(f"'const' mask with {ones} of {n} trainable entries", path=where, tensor=tensor)
        if payload_words:
            raise FormatError("'const' mask has a payload", path=where, tensor=tensor)
    elif coder == "positions":
        value = params["value"]
        if value not in (0, 1) or isinstance(value, bool):
            raise FormatError(f"'positions' mask value must be 0 or 1, got {value!r}", path=where, tensor=tensor)
        if n > 1 << 32:
            raise FormatError("'positions' mask on a tensor of more than 2**32 entries", path=where, tensor=tensor)
        count = ones if value == 1 else n - ones
        if payload_words != count:
            raise FormatError(f"'positions' mask lists {payload_words} positions, the header implies {count}",
                              path=where, tensor=tensor)
    else:
        if not 0 < ones < n:
            raise FormatError(f"'ans-bernoulli' mask with {ones} of {n} trainable entries", path=where, tensor=tensor)
        if params["cdf1"] != ans_threshold(n, ones):
            raise FormatError(f"'ans-bernoulli' cdf1={params['cdf1']!r} disagrees with p = {ones}/{n}",
                              path=where, tensor=tensor)
        # A stream can never need more than 24 bits per symbol (+ 2 state words): bounds decoding work.
        if payload_words == 0 or payload_words > 2 + (n * PRECISION + ANS_WORD_BITS - 1) // ANS_WORD_BITS:
            raise FormatError(f"'ans-bernoulli' payload of {payload_words} words is impossible for {n} entries",
                              path=where, tensor=tensor)


def decode(coder: str, n: int, ones: int, params: dict, payload: np.ndarray, *, where=None,
           tensor=None) -> np.ndarray:
    """Decode to a flat boolean array of ``n`` entries; every inconsistency is a :class:`FormatError`."""
    payload = np.asarray(payload)
    check_params(coder, n, ones, params, int(payload.size), where=where, tensor=tensor)
    if coder == "const":
        return np.full(n, ones == n and n > 0, dtype=np.bool_)
    if coder == "positions":
        value = params["value"]
        idx = payload.astype(np.int64)
        if idx.size and (idx[0] < 0 or idx[-1] >= n or np.any(np.diff(idx) <= 0)):
            raise FormatError("'positions' mask indices are not strictly increasing within the tensor",
                              path=where, tensor=tensor)
        out = np.full(n, not value, dtype=np.bool_)
        out[idx] = bool(value)
        return out
    import constriction

    words = payload.astype(np.uint32)
    if words[-1] == 0:
        raise FormatError("'ans-bernoulli' stream ends in a zero word", path=where, tensor=tensor)
    coder_ = constriction.stream.stack.AnsCoder(words)
    symbols = coder_.decode(constriction.stream.model.Bernoulli(ones / n, perfect=False), n)
    if not coder_.is_empty():  # a valid stream is consumed exactly: anything left means it was not ours
        raise FormatError("'ans-bernoulli' stream has data left after the last entry", path=where, tensor=tensor)
    out = symbols.astype(np.bool_)
    got = int(np.count_nonzero(out))
    if got != ones:
        raise FormatError(f"mask decodes to {got} trainable entries, the header says {ones}", path=where,
                          tensor=tensor)
    return out
