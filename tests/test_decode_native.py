"""The compiled ANS decoder and context bins (freezepack/format/_ans.c via ans.py) equal constriction, the spec's
plain-integer decoder and the sort-based definition, also on hostile streams; every v2/v1 decoder gives the same
result and the same error with and without them."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freezepack.errors import FormatError
from freezepack.format import ans, entropy, maskcode, native
from freezepack.testing.reference import reference_ans_start

ONE = 1 << 24
HAVE_NATIVE = native._compiler() is not None and not native.disabled() and ans.available()
needs_native = pytest.mark.skipif(not HAVE_NATIVE, reason=f"compiled ANS decoder unavailable: "
                                                          f"{ans.unavailable_reason()}")


def reference_decode(words, runs):
    """spec §6.3 in plain integers: decode each (probs, n) run in turn; returns (symbols per run, ended exactly)."""
    stack, state = reference_ans_start(words)
    out = []
    for probs, n in runs:
        cdf = np.concatenate([[0], np.cumsum(probs)]).tolist()
        syms = []
        for _ in range(n):
            q = state & (ONE - 1)
            s = int(np.searchsorted(cdf, q, side="right")) - 1
            state = (state >> 24) * int(probs[s]) + q - cdf[s]
            if state < 1 << 32 and stack:
                state = (state << 32) | stack.pop()
            syms.append(s)
        out.append(syms)
    return out, state == 0 and not stack


def reference_bins(keys, bins):
    """The spec's definition, by a full stable sort: bin[i] = rank[i] * bins // n, rank by (key, i)."""
    n = keys.size
    out = np.empty(n, dtype=np.int64)
    out[np.argsort(keys, kind="stable")] = np.arange(n, dtype=np.int64) * bins // max(n, 1)
    return out


def random_models(rng):
    skew = entropy.quantize_counts(np.maximum((1e6 * 0.6 ** np.arange(256)).astype(np.int64), 1))
    crowded = np.ones(300, dtype=np.int64)  # 150 symbols of probability 1 share the first lookup slot
    crowded[150] = ONE - 299
    return [ans.binary(1), ans.binary(ONE - 1), ans.binary(int(rng.integers(1, ONE))),
            ans.model(entropy.quantize_counts(rng.integers(1, 100, size=7))), ans.model(skew), ans.model(crowded),
            ans.uniform(16), ans.uniform(3), ans.model(maskcode.geometric_table(int(rng.integers(1, 2**32))))]


def encode(rng, plan):
    """A constriction stream of random symbols for [(model, n)], and the symbols."""
    coder = entropy._coder()
    runs = [rng.choice(m.size, size=n, p=m.probs / ONE).astype(np.int32) for m, n in plan]
    for (m, _), syms in zip(reversed(plan), reversed(runs)):
        coder.encode_reverse(syms, m.constriction())
    return entropy._words(coder), runs


def decode_both(words, plan):
    """Decode with the compiled decoder and with constriction: (symbols, ended exactly) of each."""
    out = []
    for lib in (None, False):
        d = ans.Decoder(words, lib=lib)
        assert d.native == (lib is None)
        out.append(([d.decode(m, n, dtype=np.int64).tolist() for m, n in plan], d.is_empty()))
    return out


# ----------------------------------------------------------------------------------------------------------------
# the decoder
# ----------------------------------------------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("seed", range(6))
def test_native_decodes_what_constriction_encoded(seed):
    rng = np.random.default_rng(seed)
    models = random_models(rng)
    plan = [(models[int(i)], int(rng.choice([0, 1, 5, 255, 256, 3000]))) for i in rng.permutation(len(models))]
    words, runs = encode(rng, plan)
    (ours, ours_end), (ref, ref_end) = decode_both(words, plan)
    assert ours == ref == [r.tolist() for r in runs] and ours_end and ref_end
    if sum(n for _, n in plan) < 6000:  # the spec's integer decoder agrees too
        assert reference_decode(words, [(m.probs, n) for m, n in plan]) == (ours, True)


@needs_native
@pytest.mark.parametrize("seed", range(8))
def test_hostile_streams_decode_and_fail_exactly_as_constriction(seed):
    """Truncated streams, extra words below the stack, too few or too many symbols decoded, random words: the same
    symbols and the same verdict on the end of the stream."""
    rng = np.random.default_rng(100 + seed)
    models = random_models(rng)
    plan = [(models[int(i)], int(rng.integers(1, 700))) for i in rng.integers(0, len(models), size=4)]
    words, _ = encode(rng, plan)
    garbage = rng.integers(0, 2**32, size=int(rng.integers(1, 40)), dtype=np.uint64).astype(np.uint32)
    variants = {"truncated": words[1:], "cut to one word": words[-1:], "extra word": np.r_[np.uint32(7), words],
                "garbage": garbage, "empty": words[:0]}
    plans = {"as encoded": plan, "one symbol short": plan[:-1] + [(plan[-1][0], plan[-1][1] - 1)],
             "one symbol more": plan + [(models[3], 1)], "long": plan + [(models[6], 5000)]}
    for vname, w in variants.items():
        if w.size and w[-1] == 0:
            w = np.r_[w[:-1], np.uint32(1)]
        for pname, p in plans.items():
            (ours, ours_end), (ref, ref_end) = decode_both(w, p)
            assert ours == ref and ours_end == ref_end, (vname, pname)
            if vname == "extra word" and pname == "as encoded":
                assert not ours_end  # (decoding on drains any state to 0 in the end: "long" may end exactly)


def test_zero_last_word_is_refused_like_constriction():
    import constriction

    for words in ([5, 0], [0]):
        for lib in (None, False):
            with pytest.raises(ValueError, match="zero word"):
                ans.Decoder(np.array(words, np.uint32), lib=lib)
        with pytest.raises(ValueError):
            constriction.stream.stack.AnsCoder(np.array(words, np.uint32))


@needs_native
def test_one_symbol_model_decodes_zeros_and_keeps_the_state():
    """constriction has no model with a single symbol (probability 2**24); the C decoder follows the spec."""
    m = ans.model([ONE])
    for words in ([], [9], [3, 0x80000001]):
        w = np.array(words, np.uint32)
        d = ans.Decoder(w)
        assert d.decode(m, 50).tolist() == [0] * 50
        (syms,), end = reference_decode(w, [(m.probs, 50)])
        assert syms == [0] * 50 and d.is_empty() == end == (not words)
    with pytest.raises(ValueError):
        m.constriction()


@needs_native
def test_output_layouts():
    rng = np.random.default_rng(5)
    m = ans.model(entropy.quantize_counts([40, 3, 9, 1]))
    words, (syms,) = encode(rng, [(m, 1000)])
    values = np.array([200, 7, 255, 0], np.uint8)
    for lib in (None, False):
        plane = np.zeros((1000, 4), np.uint8)  # a strided byte plane, bytes mapped through values
        ans.Decoder(words, lib=lib).decode(m, 1000, out=plane[:, 2], values=values)
        assert np.array_equal(plane[:, 2], values[syms]) and not plane[:, [0, 1, 3]].any()
        assert np.array_equal(ans.Decoder(words, lib=lib).decode(m, 1000, dtype=np.int64), syms)
    d = ans.Decoder(words)
    with pytest.raises(ValueError):
        d.decode(m, 10, out=np.empty(9, np.uint8))
    with pytest.raises(ValueError):
        d.decode(m, 10, out=np.empty(10, np.int32))
    with pytest.raises(ValueError):
        d.decode(m, 4, out=np.frombuffer(b"abcd", np.uint8))  # read-only memory is never written
    with pytest.raises(ValueError):
        d.decode(m, 10, values=np.arange(3, dtype=np.uint8))
    with pytest.raises(ValueError):
        d.decode(ans.uniform(16), 10)  # 65536 symbols do not fit a byte
    for bad in ([ONE - 1], [0, ONE], [ONE // 2, ONE // 2 + 1], [1] * 65537):
        with pytest.raises(ValueError):
            ans.model(bad)


# ----------------------------------------------------------------------------------------------------------------
# context bins
# ----------------------------------------------------------------------------------------------------------------

KEYS = st.one_of(
    st.lists(st.integers(0, 3), min_size=1, max_size=300),                            # many ties
    st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=300),                    # the spec's keys
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=50),                     # any u32 (top bit too)
    st.lists(st.integers(0x3C000000, 0x3C0000FF), min_size=1, max_size=400),          # one top-16-bit bucket
    st.lists(st.sampled_from([0, 0xFFFF, 0x10000, 0x1FFFF, 0x7FFFFFFF]), min_size=1, max_size=300))


@given(keys=KEYS, bins=st.integers(1, 64), native_=st.booleans())
@settings(max_examples=300, deadline=None)
def test_context_bins_equal_the_sort_definition(keys, bins, native_):
    if native_ and not HAVE_NATIVE:
        native_ = False
    k = np.array(keys, dtype=np.uint32)
    got = ans.ctx_bins(k, bins, lib=None if native_ else False)
    assert got.dtype == np.uint8 and np.array_equal(got, reference_bins(k, bins))
    assert np.array_equal(entropy.context_rank(k), reference_bins(k, k.size))  # the writer's full rank


@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 1000, 200_003])
@pytest.mark.parametrize("bins", [1, 2, 7, 32, 64])
def test_context_bins_on_generator_like_keys(n, bins):
    if bins > n:
        bins = n
    rng = np.random.default_rng(n + bins)
    w = (rng.standard_normal(n) * 0.05).astype(np.float32)
    w[rng.random(n) < 0.1] = 0.0  # ties at zero, and +-0 are the same key
    w[: n // 3] = np.abs(w[: n // 3]) * -1
    keys = entropy.context_keys(w)
    want = reference_bins(keys, bins)
    for lib in ((None, False) if HAVE_NATIVE else (False,)):
        assert np.array_equal(ans.ctx_bins(keys, bins, lib=lib), want)
    assert np.array_equal(entropy.context_rank(keys), reference_bins(keys, n))


@given(n=st.integers(0, 500), groups=st.integers(1, 256), seed=st.integers(0, 2**32 - 1), flags=st.booleans())
@settings(max_examples=100, deadline=None)
def test_group_is_a_stable_sort_of_the_active_entries(n, groups, seed, flags):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, groups, size=n).astype(np.uint8)
    active = rng.random(n) < 0.7 if flags else None
    sel = np.arange(n) if active is None else np.flatnonzero(active)
    want = sel[np.argsort(keys[sel], kind="stable")]
    for lib in ((None, False) if HAVE_NATIVE else (False,)):
        order, sizes = ans.group(keys, groups, active, lib=lib)
        assert order.dtype == np.uint32 and np.array_equal(order, want)
        assert np.array_equal(sizes, np.bincount(keys[sel], minlength=groups))
    if groups < 256 and sel.size:
        keys[sel[0]] = groups  # an active key out of range is an error; an inactive one is never looked at
        for lib in ((None, False) if HAVE_NATIVE else (False,)):
            with pytest.raises(ValueError):
                ans.group(keys, groups, active, lib=lib)


@needs_native
def test_decode_into_positions():
    rng = np.random.default_rng(9)
    m = ans.binary(ONE // 5)
    words, (syms,) = encode(rng, [(m, 300)])
    index = rng.permutation(1000)[:300].astype(np.uint32)
    for lib in (None, False):
        out = np.full(1000, 7, np.uint8)
        ans.Decoder(words, lib=lib).decode(m, 300, out=out, index=index)
        assert np.array_equal(out[index], syms) and (np.delete(out, index) == 7).all()
    with pytest.raises(ValueError):
        ans.Decoder(words).decode(m, 300, out=np.zeros(500, np.uint8), index=index)


def test_context_bins_refuse_bad_bins():
    for bins in (0, 257):
        with pytest.raises(ValueError):
            ans.ctx_bins(np.zeros(10, np.uint32), bins)
    assert ans.ctx_bins(np.zeros(0, np.uint32), 4).size == 0


# ----------------------------------------------------------------------------------------------------------------
# the format decoders, with and without the compiled code
# ----------------------------------------------------------------------------------------------------------------

def _outcome(fn):
    try:
        return ("ok", fn())
    except FormatError as e:
        return ("error", str(e))


def _same_outcomes(fn, monkeypatch):
    """fn() with the compiled code, then with FREEZEPACK_NO_NATIVE=1: the same result or the same error."""
    a = _outcome(fn)
    with monkeypatch.context() as m:
        m.setenv("FREEZEPACK_NO_NATIVE", "1")
        assert not ans.available()
        b = _outcome(fn)
    assert a[0] == b[0] and (a[1] == b[1] if a[0] == "error" else np.array_equal(np.asarray(a[1]),
                                                                                  np.asarray(b[1])))
    return a


def _mutations(words, rng):
    yield words
    yield words[1:]
    yield words[:-1]
    yield np.r_[np.uint32(12345), words]
    for _ in range(3):
        w = words.copy()
        if w.size:
            w[rng.integers(w.size)] ^= np.uint32(1 << int(rng.integers(32)))
        yield w


def test_ctx_masks_same_with_and_without_native(monkeypatch):
    rng = np.random.default_rng(7)
    shape = (40, 75)
    n = 3000
    w = (rng.standard_normal(n) * 0.1).astype(np.float32)
    keys = entropy.context_keys(w)
    mask = np.zeros(n, bool)
    mask[np.argsort(-np.abs(w) * rng.lognormal(0, 0.5, n))[:150]] = True
    mask.reshape(shape)[:, 3] = False
    mask.reshape(shape)[5] = False
    k = int(mask.sum())
    oks = 0
    for params, words in entropy.encode_ctx(mask, keys, shape)[::3]:
        for wds in _mutations(words, rng):
            res = _same_outcomes(lambda wds=wds, params=params: entropy.decode_ctx(n, k, shape, params, wds, keys),
                                 monkeypatch)
            if wds is words:
                assert res[0] == "ok" and np.array_equal(res[1], np.flatnonzero(mask))
                oks += 1
    assert oks >= 4


def test_planes_same_with_and_without_native(monkeypatch):
    rng = np.random.default_rng(8)
    n = 5000
    v = (rng.standard_normal(n) * 0.05).astype(np.float32)
    v[::7] = 0.0
    tables, payload = entropy.encode_planes(v.tobytes(), 4)
    stream_len = len(payload) - n * sum(t is None for t in tables)
    words = np.frombuffer(payload[:stream_len], "<u4")
    rawp = payload[stream_len:]
    for wds in _mutations(words, rng):
        res = _same_outcomes(lambda wds=wds: bytes(entropy.decode_planes(n, 4, tables, wds.tobytes() + rawp)),
                             monkeypatch)
        if wds is words:
            assert res == ("ok", v.tobytes())


@pytest.mark.parametrize("p", [0.003, 0.3])
def test_v1_ans_masks_same_with_and_without_native(monkeypatch, p):
    rng = np.random.default_rng(int(p * 1000))
    n = 20000
    mask = rng.random(n) < p
    mask[100:400] = True  # a long run: escapes in the gap coder
    k = int(mask.sum())
    coded = [maskcode._encode_ans(mask, n, k)] + maskcode._encode_gaps(mask, n, k)
    for c in coded:
        for wds in _mutations(c.payload, rng):
            if not wds.size:
                continue
            res = _same_outcomes(lambda c=c, wds=wds: maskcode.decode_indices(c.coder, n, k, c.params, wds),
                                 monkeypatch)
            if wds is c.payload:
                assert res[0] == "ok" and np.array_equal(res[1], np.flatnonzero(mask))


# ----------------------------------------------------------------------------------------------------------------
# building, checking and falling back
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_ans(fresh_native, monkeypatch):  # noqa: F811  (the imported fixture)
    """ans with nothing loaded yet, its cache (like native's) in a fresh directory."""
    monkeypatch.setattr(ans, "_lib", None)
    monkeypatch.setattr(ans, "_failure", None)
    return fresh_native


def _decodes_anyway():
    rng = np.random.default_rng(1)
    plan = [(ans.binary(ONE // 3), 500), (ans.uniform(5), 300)]
    words, runs = encode(rng, plan)
    d = ans.Decoder(words)
    assert [d.decode(m, n).tolist() for m, n in plan] == [r.tolist() for r in runs] and d.is_empty()
    return d


def test_no_compiler_falls_back_to_constriction(fresh_ans, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_ans / "no-such-compiler"))
    assert not ans.available() and "no C compiler" in ans.unavailable_reason()
    assert not _decodes_anyway().native


@pytest.mark.skipif(sys.platform == "win32" or native._compiler() is None, reason="shell script compiler stand-in")
def test_miscompiled_decoder_is_never_used(fresh_ans, monkeypatch):
    """A compiler that builds something else (here: the binary model's remainder off) fails the self-check."""
    script = fresh_ans / "evilcc"
    script.write_text('#!/bin/sh\nfor last; do :; done\n'
                      'sed "s/(q - lo)/(q ^ lo)/" "$last" > "$last.x" && mv "$last.x" "$last"\n'
                      f'exec "{native._compiler()}" "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    assert not ans.available() and "differs from constriction" in ans.unavailable_reason()
    assert not _decodes_anyway().native


@needs_native
def test_built_into_the_private_cache(fresh_ans):
    assert ans.available(), ans.unavailable_reason()
    assert [f for f in os.listdir(native.cache_dir()) if f.startswith("ans-") and f.endswith(".so")]
    assert _decodes_anyway().native


def test_no_native_env_in_a_fresh_process():
    """FREEZEPACK_NO_NATIVE=1 from the start: constriction decodes, the same bytes."""
    code = ("import numpy as np; from freezepack.format import ans, entropy\n"
            "v = (np.random.default_rng(3).standard_normal(4000) * 0.05).astype(np.float32).tobytes()\n"
            "t, p = entropy.encode_planes(v, 4)\n"
            "assert bytes(entropy.decode_planes(4000, 4, t, p)) == v\n"
            "print(ans.available(), ans._lib is None)\n")
    env = dict(os.environ, FREEZEPACK_NO_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
