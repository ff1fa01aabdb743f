"""Mask coding: exact round trips, the size bound against order-0 entropy, and the spec's integer ANS decoder."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freezepack.errors import FormatError
from freezepack.format import maskcode
from freezepack.testing.reference import reference_ans_decode, reference_gap_decode, reference_gap_table


def _roundtrip(mask: np.ndarray) -> maskcode.CodedMask:
    c = maskcode.encode(mask)
    got = maskcode.decode(c.coder, mask.size, int(mask.sum()), c.params, c.payload)
    assert got.dtype == np.bool_ and np.array_equal(got, mask.reshape(-1))
    return c


@pytest.mark.parametrize("n", [1, 2, 3, 100, 4097, 200_000])
@pytest.mark.parametrize("p", [0.0, 1e-5, 1e-3, 0.01, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_roundtrip_and_entropy_bound(n, p):
    rng = np.random.default_rng(n * 1000 + int(p * 997))
    mask = rng.random(n) < p
    c = _roundtrip(mask)
    k = int(mask.sum())
    assert c.nbytes <= 1.01 * maskcode.entropy_bytes(n, k) + 16, (c.coder, c.nbytes)


def test_dense_and_empty_masks_cost_nothing():
    for mask in (np.ones((300, 784), bool), np.zeros((300, 784), bool)):
        c = _roundtrip(mask)
        assert c.coder == "const" and c.nbytes == 0 and c.params == {}


def test_few_entries_cost_a_few_bytes_either_polarity():
    mask = np.zeros(1_000_000, bool)
    mask[[5, 77, 999_999]] = True
    for m in (mask, ~mask):
        c = _roundtrip(m)
        assert c.coder in ("positions", "ans-gaps") and c.nbytes <= 12


def test_positions_coder_both_polarities():
    idx = np.array([5, 77, 999], np.uint32)
    got = maskcode.decode("positions", 1000, 3, {"value": 1}, idx)
    assert np.flatnonzero(got).tolist() == [5, 77, 999]
    got = maskcode.decode("positions", 1000, 997, {"value": 0}, idx)
    assert np.flatnonzero(~got).tolist() == [5, 77, 999]


@pytest.mark.parametrize("p, n", [(0.01, 5000), (0.3, 800), (0.97, 3000), (0.0005, 200_000)])
def test_spec_reference_gap_decoder_matches(p, n):
    rng = np.random.default_rng(int(p * 1e4))
    mask = rng.random(n) < p
    if p == 0.0005:
        mask[:] = False
        mask[:3000:3] = True
        mask[199_000] = True  # one gap far beyond 255 * 2**b: exercises the escape
    k = int(mask.sum())
    for c in maskcode._encode_gaps(mask, n, k):
        if p == 0.0005:
            assert 196_000 >> c.params["b"] >= maskcode.ESCAPE
        v, b, phi = c.params["value"], c.params["b"], c.params["phi"]
        assert np.array_equal(reference_gap_decode(c.payload, n, k, v, b, phi), mask), c.params
        assert np.array_equal(maskcode.decode(c.coder, n, k, c.params, c.payload), mask)


def test_geometric_table_is_integer_and_normalized():
    for phi in (1, 2**31, 2**32 - 1, 3_000_000_001):
        t = maskcode.geometric_table(phi)
        assert t.tolist() == reference_gap_table(phi)
        assert t.sum() == 1 << 24 and t.min() >= 1 and np.all(np.diff(t) <= 0)


def test_multidimensional_masks_read_in_c_order():
    mask = np.zeros((4, 5, 6), bool)
    mask[1, 2, 3] = True
    c = maskcode.encode(mask)
    flat = maskcode.decode(c.coder, mask.size, 1, c.params, c.payload)
    assert np.flatnonzero(flat).tolist() == [1 * 30 + 2 * 6 + 3]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=600), st.integers(0, 3))
def test_hypothesis_roundtrip(bits, skew):
    mask = np.array(bits, dtype=bool)
    if skew:  # bias towards sparse masks, the interesting case
        mask &= np.random.default_rng(len(bits)).random(mask.size) < 0.1 * skew
    _roundtrip(mask)


@pytest.mark.parametrize("p", [0.003, 0.05, 0.5, 0.93])
def test_spec_reference_decoder_matches_constriction(p):
    rng = np.random.default_rng(int(p * 1000))
    n = 3000
    mask = rng.random(n) < p
    k = int(mask.sum())
    c = maskcode._encode_ans(mask, n, k)
    assert c.params["cdf1"] == maskcode.ans_threshold(n, k)
    assert np.array_equal(reference_ans_decode(c.payload, n, c.params["cdf1"]), mask)


def test_threshold_is_constriction_fast_quantization_at_extremes():
    # cdf1 in [1, 2**24 - 1]: both symbols keep a nonzero probability even for p = 1/n or (n-1)/n with large n
    for n, k in [(10**9, 1), (10**9, 10**9 - 1), (3, 1), (2, 1)]:
        c1 = maskcode.ans_threshold(n, k)
        assert 1 <= c1 <= (1 << 24) - 1
    n = 50_000
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(0).choice(n, 40, replace=False)] = True
    c = maskcode._encode_ans(mask, n, 40)
    assert np.array_equal(reference_ans_decode(c.payload, n, c.params["cdf1"]), mask)


def _ans(n=2000, p=0.1):
    mask = np.random.default_rng(3).random(n) < p
    return mask, maskcode._encode_ans(mask, n, int(mask.sum()))


def test_rejects_unknown_coder_and_bad_params():
    mask, c = _ans()
    k = int(mask.sum())
    with pytest.raises(FormatError, match="unknown mask coder"):
        maskcode.decode("ctx-model-v9", mask.size, k, c.params, c.payload)
    with pytest.raises(FormatError, match="disagrees"):
        maskcode.decode(c.coder, mask.size, k, {"cdf1": c.params["cdf1"] + 1}, c.payload)
    with pytest.raises(FormatError, match="needs parameters"):
        maskcode.decode(c.coder, mask.size, k, {}, c.payload)
    with pytest.raises(FormatError, match="trainable entries"):
        maskcode.decode(c.coder, mask.size, mask.size + 1, c.params, c.payload)
    with pytest.raises(FormatError, match="const"):
        maskcode.decode("const", 10, 3, {}, np.zeros(0, np.uint32))


def test_rejects_streams_that_do_not_decode_exactly():
    mask, c = _ans()
    n, k = mask.size, int(mask.sum())
    with pytest.raises(FormatError, match="left after"):
        maskcode.decode(c.coder, n, k, c.params, np.concatenate([[7], c.payload]).astype(np.uint32))
    with pytest.raises(FormatError, match="zero word"):
        maskcode.decode(c.coder, n, k, c.params, np.concatenate([c.payload, [0]]).astype(np.uint32))
    with pytest.raises(FormatError, match="impossible"):
        maskcode.decode(c.coder, 10, 3, {"cdf1": maskcode.ans_threshold(10, 3)}, np.ones(100, np.uint32))
    bad = c.payload.copy()
    bad[len(bad) // 2] ^= 0x00010000
    with pytest.raises(FormatError):
        maskcode.decode(c.coder, n, k, c.params, bad)


def test_rejects_bad_positions():
    for payload in ([3, 3], [5, 2], [1, 10]):
        with pytest.raises(FormatError, match="strictly increasing"):
            maskcode.decode("positions", 10, 2, {"value": 1}, np.array(payload, np.uint32))
    with pytest.raises(FormatError, match="lists"):
        maskcode.decode("positions", 10, 2, {"value": 1}, np.array([1], np.uint32))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["positions", "ans-gaps", "ans-bernoulli"]), st.integers(2, 5000), st.data())
def test_forged_payloads_decode_validly_or_raise(coder, n, data):
    """Arbitrary words and parameters: the result is a valid mask with exactly k ones, or a FormatError."""
    k = data.draw(st.integers(1, n - 1))
    words = np.array(data.draw(st.lists(st.integers(0, 2**32 - 1), max_size=40)), dtype=np.uint32)
    if coder == "positions":
        params = {"value": data.draw(st.integers(0, 1))}
    elif coder == "ans-gaps":
        params = {"value": data.draw(st.integers(0, 1)), "b": data.draw(st.integers(0, 16)),
                  "phi": data.draw(st.integers(1, 2**32 - 1))}
    else:
        params = {"cdf1": maskcode.ans_threshold(n, k)}
    try:
        idx = maskcode.decode_indices(coder, n, k, params, words)
    except FormatError:
        return
    assert idx.size == k and (k == 0 or (idx[0] >= 0 and idx[-1] < n)) and np.all(np.diff(idx) > 0)
