"""Freezing masks <-> a few bytes (spec/FORMAT.md, "Mask coders").

A mask is a flat boolean array in row-major (C) order, ``True`` = trainable. Four coders exist; the encoder
tries each that applies and keeps the smallest payload, so a file always costs at most
``1.01 * n * h(k/n) / 8 + 16`` bytes for a mask of ``n`` entries with ``k`` trainable ones:

``const``          every entry equal (``k == 0`` or ``k == n``): no payload at all.
``positions``      the sorted indices of the minority value, one little-endian uint32 each: wins when only a
                   handful of entries differ, where an ANS stream's fixed 4-8 byte tail would dominate.
``ans-gaps``       the gaps between minority entries, Golomb-split ``gap = h * 2**b + r`` and ANS-coded: ``h`` with
                   a geometric table of 256 integer weights (255 = escape to a 32-bit value), ``r`` uniform on b
                   bits. Cost and decoding time scale with the number of minority entries, not with ``n``: the
                   coder of choice for the sparse masks FreezeNets use (q = 0.99: ~1 % of the entries).
``ans-bernoulli``  constriction's stack ANS coder (32-bit words, 64-bit state, 24-bit probabilities) with an
                   i.i.d. Bernoulli(p = k / n) model quantized by ``from_floating_point_probabilities_fast``
                   (``perfect=False``). The quantized threshold ``cdf1`` is recomputed and cross-checked on load,
                   so a reader in another language needs only integers (the spec gives the decoder).

Coder names are strings in the header: a future coder (e.g. a context model) adds a name, and an old reader
refuses it with a clear message instead of misreading it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import FormatError
from . import ans

PRECISION = 24                    # bits of the ANS probability quantization (constriction's default)
ANS_WORD_BITS = 32
CODERS = ("const", "positions", "ans-gaps", "ans-bernoulli")
GAP_SYMBOLS = 256                 # alphabet of the gap coder's high part; the last symbol is the escape
GAP_MAX_BITS = 16                 # b: low bits of a gap coded uniformly
ESCAPE = GAP_SYMBOLS - 1


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
    return encode_candidates(mask)[0]


# 'ans-bernoulli' codes every entry (O(n), the dearest coder by far on big tensors) and can only win when the gap
# code is more than 1 % above it. An ANS stream under the empirical Bernoulli model is never meaningfully below the
# order-0 entropy (the quantized model costs more, never less; the coder's rounding moves a stream by ~2**-25 bits
# per symbol on average), so a gap code within 0.4 % of that entropy on a large tensor makes computing it useless.
BERNOULLI_SKIP_MIN_BYTES = 4096
BERNOULLI_SKIP_RATIO = 1.004


def bernoulli_cannot_win(n: int, k: int, gap_bytes: int) -> bool:
    """Whether a gap code of ``gap_bytes`` makes the 'ans-bernoulli' coding of this mask pointless to compute."""
    e = entropy_bytes(n, k)
    return e >= BERNOULLI_SKIP_MIN_BYTES and gap_bytes <= BERNOULLI_SKIP_RATIO * e


def encode_candidates(mask) -> tuple[CodedMask, list[CodedMask]]:
    """(the coding :func:`encode` picks, every coding it considered) for a boolean mask."""
    flat = _as_flat_bool(mask)
    n = int(flat.size)
    k = int(np.count_nonzero(flat))
    if k == 0 or k == n:
        return CodedMask("const", k), []
    candidates = []
    minority = min(k, n - k)
    if n <= 1 << 32 and minority <= 4096:  # few positions can beat the ANS stream's fixed tail: try, keep smaller
        value = 1 if k <= n - k else 0
        idx = np.flatnonzero(flat if value else ~flat).astype("<u4")
        candidates.append(CodedMask("positions", k, {"value": value}, idx))
    if n <= 1 << 32:
        candidates.extend(_encode_gaps(flat, n, k))
    gap_bytes = min((c.nbytes for c in candidates if c.coder == "ans-gaps"), default=None)
    if gap_bytes is None or not bernoulli_cannot_win(n, k, gap_bytes):
        candidates.append(_encode_ans(flat, n, k))
    return _pick(candidates, n, k), candidates


def _pick(candidates: list[CodedMask], n: int, k: int) -> CodedMask:
    best = min(candidates, key=lambda c: c.nbytes)
    # Decoding 'ans-gaps' costs time per minority entry, 'ans-bernoulli' per entry (~100x more at q = 0.99): take
    # the gap code when it is within 1 % of the smallest and still inside the entropy bound.
    gaps = [c for c in candidates if c.coder == "ans-gaps"]
    if gaps:
        g = min(gaps, key=lambda c: c.nbytes)
        if g.nbytes <= 1.01 * best.nbytes and g.nbytes <= 1.01 * entropy_bytes(n, k) + 16:
            return g
    return best


ANS_PIECE = 1 << 22  # symbols converted and pushed at a time by the Bernoulli encoder


def _encode_ans(flat: np.ndarray, n: int, k: int) -> CodedMask:
    import constriction  # lazily: only coding and decoding need the compiled coder

    model = constriction.stream.model.Bernoulli(k / n, perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    # A stack: encode_reverse(x) pushes x[-1], ..., x[0]; doing it a piece at a time from the last piece pushes the
    # same symbols in the same order (the same words), with 4 bytes per symbol of one piece, not of the whole mask.
    for end in range(n, 0, -ANS_PIECE):
        coder.encode_reverse(flat[max(end - ANS_PIECE, 0):end].astype(np.int32), model)
    words = np.asarray(coder.get_compressed(), dtype=np.uint32).astype("<u4")
    return CodedMask("ans-bernoulli", k, {"cdf1": ans_threshold(n, k)}, words)


# ---------------------------------------------------------------------------------------------------------------
# ans-gaps: integer tables only, so any language reproduces them exactly (spec/FORMAT.md gives the same steps)
# ---------------------------------------------------------------------------------------------------------------

def geometric_table(phi: int) -> np.ndarray:
    """Quantized probabilities (sum 2**24) of the gap coder's high part for the 32-bit fixed-point ratio ``phi``.

    x[0] = 2**32, x[j] = (x[j-1] * phi) >> 32; the 2**24 - 256 free weight is split as floor(x[j] * T / S) with the
    remainder given one by one to the first entries; each symbol then gets one more unit (constriction's leak),
    which is exactly what constriction's fast quantization yields for these integer-valued float weights.
    """
    x = [1 << 32]
    for _ in range(GAP_SYMBOLS - 1):
        x.append((x[-1] * phi) >> 32)
    total = (1 << PRECISION) - GAP_SYMBOLS
    s = sum(x)
    w = [xj * total // s for xj in x]
    for j in range(total - sum(w)):
        w[j] += 1
    return np.array(w, dtype=np.int64) + 1


def _fixed32(x: float) -> int:
    return min(max(int(round(x * 2.0**32)), 1), (1 << 32) - 1)


# ans.Model: integer probabilities; .constriction() is the float64 weights prob - 1 (summing to 2**24 - N), whose
# quantization is then exactly prob.
@functools.lru_cache(maxsize=64)
def _h_model(phi: int) -> ans.Model:
    return ans.Model(geometric_table(phi))


def _uniform_model(bits: int) -> ans.Model:
    """Uniform on [0, 2**bits): every symbol's quantized probability is 2**(24 - bits)."""
    return ans.uniform(bits)


def _encode_gaps(flat: np.ndarray, n: int, k: int) -> list[CodedMask]:
    import constriction

    value = 1 if k <= n - k else 0
    pos = np.flatnonzero(flat if value else ~flat).astype(np.int64)
    m = int(pos.size)
    gaps = np.diff(pos, prepend=-1) - 1  # zeros before each minority entry
    p = m / n
    b0 = round(math.log2(math.log(2) / p)) if p < math.log(2) else 0
    out = []
    for b in sorted({min(max(b0 + d, 0), GAP_MAX_BITS) for d in (-1, 0, 1)}):
        phi = _fixed32((1.0 - p) ** (1 << b))
        h_model = _h_model(phi)
        h = gaps >> b
        esc = h[h >= ESCAPE] - ESCAPE
        if esc.size and esc.max() >= 1 << 32:
            continue
        coder = constriction.stream.stack.AnsCoder()
        if b:  # pushed first, decoded last (a stack): h, then escapes, then r
            coder.encode_reverse((gaps & ((1 << b) - 1)).astype(np.int32), _uniform_model(b).constriction())
        if esc.size:
            coder.encode_reverse(np.stack([esc >> 16, esc & 0xFFFF], 1).reshape(-1).astype(np.int32),
                                 _uniform_model(16).constriction())
        coder.encode_reverse(np.minimum(h, ESCAPE).astype(np.int32), h_model.constriction())
        words = np.asarray(coder.get_compressed(), dtype=np.uint32).astype("<u4")
        out.append(CodedMask("ans-gaps", k, {"value": value, "b": b, "phi": phi}, words))
    return out


def _decode_gap_positions(n: int, ones: int, params: dict, words: np.ndarray, where, tensor) -> np.ndarray:
    value, b, phi = params["value"], params["b"], params["phi"]
    m = ones if value else n - ones
    if words.size and words[-1] == 0:  # (an empty stream is valid: symbols at quantile 0 can cost nothing)
        raise FormatError("'ans-gaps' stream ends in a zero word", path=where, tensor=tensor)
    if words.size == 0:  # an empty stream decodes to all-zero symbols: the positions 0 .. m-1, no decoding
        return np.arange(m, dtype=np.int64)
    coder = ans.Decoder(words)
    gaps = coder.decode(_h_model(phi), m, dtype=np.int64)  # in place from here: ~16 bytes per entry at peak
    n_esc = int(np.count_nonzero(gaps == ESCAPE))
    if n_esc:
        pairs = coder.decode(_uniform_model(16), 2 * n_esc, dtype=np.int64).reshape(-1, 2)
        gaps[gaps == ESCAPE] += (pairs[:, 0] << 16) | pairs[:, 1]
    gaps <<= b
    if b:
        gaps |= coder.decode(_uniform_model(b), m, dtype=np.int64)
    if not coder.is_empty():
        raise FormatError("'ans-gaps' stream has data left after the last entry", path=where, tensor=tensor)
    # Bound the sum before the exact cumsum, so a forged stream cannot overflow int64 into "valid" positions.
    if m and (int(gaps.max()) >= n or float(np.sum(gaps, dtype=np.float64)) + m > n):
        raise FormatError("'ans-gaps' positions run past the end of the tensor", path=where, tensor=tensor)
    gaps += 1
    pos = np.cumsum(gaps, out=gaps)
    pos -= 1
    if m and pos[-1] >= n:
        raise FormatError("'ans-gaps' positions run past the end of the tensor", path=where, tensor=tensor)
    return pos


def check_params(coder: str, n: int, ones: int, params: dict, payload_words: int, *, where=None, tensor=None) -> None:
    """Validate a coded mask's header fields against each other before any decoding work (all untrusted)."""
    if coder not in CODERS:
        raise FormatError(f"unknown mask coder {coder!r}: written by a newer freezepack? (known: "
                          f"{', '.join(CODERS)})", path=where, tensor=tensor)
    if not 0 <= ones <= n:
        raise FormatError(f"mask declares {ones} trainable entries out of {n}", path=where, tensor=tensor)
    expect_keys = {"const": set(), "positions": {"value"}, "ans-gaps": {"value", "b", "phi"},
                   "ans-bernoulli": {"cdf1"}}[coder]
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
    elif coder == "ans-gaps":
        value, b, phi = params["value"], params["b"], params["phi"]
        if value not in (0, 1) or not 0 <= b <= GAP_MAX_BITS or not 1 <= phi < 1 << 32:
            raise FormatError(f"'ans-gaps' parameters out of range: value={value}, b={b}, phi={phi}", path=where,
                              tensor=tensor)
        if not 0 < ones < n or n > 1 << 32:
            raise FormatError(f"'ans-gaps' mask with {ones} of {n} trainable entries", path=where, tensor=tensor)
        m = ones if value else n - ones
        # at most 24 bits for each of the <= 4 symbols per minority entry, plus two state words
        if payload_words > 2 + (m * 4 * PRECISION + ANS_WORD_BITS - 1) // ANS_WORD_BITS:
            raise FormatError(f"'ans-gaps' payload of {payload_words} words is impossible for {m} entries",
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


def decode_indices(coder: str, n: int, ones: int, params: dict, payload: np.ndarray, *, where=None,
                   tensor=None) -> np.ndarray:
    """Sorted int64 indices of the trainable entries: what a loader scatters values into (cheaper than a mask)."""
    payload = np.asarray(payload)
    check_params(coder, n, ones, params, int(payload.size), where=where, tensor=tensor)
    if coder == "const":
        return np.arange(n if ones == n else 0, dtype=np.int64)
    if coder in ("positions", "ans-gaps"):
        value = params["value"]
        if coder == "ans-gaps" and payload.size == 0:  # all-zero gaps: the minority is a prefix (k x 8 bytes)
            m = ones if value else n - ones
            return np.arange(m, dtype=np.int64) if value else np.arange(m, n, dtype=np.int64)
        if coder == "positions":
            idx = payload.astype(np.int64)
            if idx.size and (idx[0] < 0 or idx[-1] >= n or np.any(np.diff(idx) <= 0)):
                raise FormatError("'positions' mask indices are not strictly increasing within the tensor",
                                  path=where, tensor=tensor)
        else:
            idx = _decode_gap_positions(n, ones, params, payload, where, tensor)
        if value:
            return idx
        flat = np.ones(n, dtype=np.bool_)
        flat[idx] = False
        return np.flatnonzero(flat)
    return np.flatnonzero(_decode_bernoulli(n, ones, params, payload, where, tensor))


def decode(coder: str, n: int, ones: int, params: dict, payload: np.ndarray, *, where=None,
           tensor=None) -> np.ndarray:
    """Decode to a flat boolean array of ``n`` entries; every inconsistency is a :class:`FormatError`."""
    payload = np.asarray(payload)
    if coder == "ans-bernoulli":
        check_params(coder, n, ones, params, int(payload.size), where=where, tensor=tensor)
        return _decode_bernoulli(n, ones, params, payload, where, tensor)
    out = np.zeros(n, dtype=np.bool_)
    out[decode_indices(coder, n, ones, params, payload, where=where, tensor=tensor)] = True
    return out


def _decode_bernoulli(n, ones, params, payload, where, tensor) -> np.ndarray:
    words = payload.astype(np.uint32)
    if words[-1] == 0:
        raise FormatError("'ans-bernoulli' stream ends in a zero word", path=where, tensor=tensor)
    coder_ = ans.Decoder(words)
    # constriction's Bernoulli(k / n, perfect=False) is this two-symbol model: check_params compared cdf1 with it
    out = coder_.decode(ans.binary(params["cdf1"]), n).view(np.bool_)
    if not coder_.is_empty():  # a valid stream is consumed exactly: anything left means it was not ours
        raise FormatError("'ans-bernoulli' stream has data left after the last entry", path=where, tensor=tensor)
    got = int(np.count_nonzero(out))
    if got != ones:
        raise FormatError(f"mask decodes to {got} trainable entries, the header says {ones}", path=where,
                          tensor=tensor)
    return out
