"""The generator: Random123 known answers, an independent oracle, numpy == torch, golden vectors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from freezepack import SpecError
from freezepack.format import rng

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "spec" / "vectors" / "rng_v1.json").read_text("utf-8"))


def u32(xs):
    return [int(x, 16) for x in xs]


@pytest.mark.parametrize("counter,key,expected", [
    ([0, 0, 0, 0], (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], (0xA4093822, 0x299F31D0),
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_random123_known_answers(counter, key, expected):
    out = rng.philox4x32_np(np.array([counter], dtype=np.uint32), key)[0]
    assert [int(x) for x in out] == expected


def test_random123_known_answers_torch_path():
    # counter (0,0,0,0) key (0,0) is block 0 of stream 0 under seed 0.
    w = rng.words_torch(0, 0, 0, 4).tolist()
    assert w == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # all-ones counter and key: block 2**64-1 is out of int64 range, so check the stream/key part via numpy only;
    # the pi vector exercises every counter word through words_np's layout.
    ctr = [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]
    seed = 0xA4093822 | (0x299F31D0 << 32)
    block = ctr[0] | (ctr[1] << 32)
    stream = ctr[2] | (ctr[3] << 32)
    assert rng.words_np(seed, stream, block * 4, 4).tolist() == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("seed,name", [(0, "a"), (123456789, "conv1.weight"), (2**64 - 1, "fc3.weight"),
                                       (2**40 + 3, "features.10.weight")])
def test_independent_oracle_randomgen(seed, name):
    """randomgen's Philox4x32-10 (independent code) over 40,000 words of a stream."""
    randomgen = pytest.importorskip("randomgen")
    stream = rng.stream_id(name)
    # randomgen increments the 128-bit counter before each block, so starting it at (stream << 64) yields our
    # block 1 first; counter words are (c0, c1, c2, c3) = (block_lo, block_hi, stream_lo, stream_hi).
    g = randomgen.Philox(counter=stream << 64, key=seed, number=4, width=32)
    n = 40_000
    oracle = g.random_raw(n).astype(np.uint32)
    ours = rng.words_np(seed, stream, 4, n)
    assert np.array_equal(ours, oracle)


@pytest.mark.parametrize("seed", [0, 1, 99, 2**32 + 5, 2**64 - 1])
@pytest.mark.parametrize("start,count", [(0, 0), (0, 1), (0, 4), (3, 1), (1, 10), (7, 1001), (4 * (2**32 - 1) - 3, 9)])
def test_words_numpy_equals_torch(seed, start, count):
    stream = rng.stream_id(f"t{seed}")
    a = rng.words_np(seed, stream, start, count)
    b = rng.words_torch(seed, stream, start, count)
    assert b.dtype == torch.int64 and b.shape == (count,)
    assert np.array_equal(a.astype(np.int64), b.numpy())


def test_words_do_not_depend_on_chunking():
    stream = rng.stream_id("w")
    whole = rng.words_np(5, stream, 0, 1000)
    pieces = np.concatenate([rng.words_np(5, stream, s, c) for s, c in [(0, 3), (3, 250), (253, 1), (254, 746)]])
    assert np.array_equal(whole, pieces)


def test_conversions_numpy_equals_torch_on_all_edge_words_and_random_words():
    words = np.concatenate([
        np.array(u32(VECTORS["conversions"]["words"]), dtype=np.uint32),
        rng.words_np(11, 3, 0, 200_000),
        # every octave boundary of the normal conversion and its neighbours, both signs
        np.array([(1 << e) + d for e in range(31) for d in (-1, 0, 1) if 0 <= (1 << e) + d < 2**31], dtype=np.uint32),
    ])
    words = np.concatenate([words, words | np.uint32(0x80000000)])
    t = torch.from_numpy(words.astype(np.int64))
    for f_np, f_t in [(rng.uniform_np, rng.uniform_torch), (rng.normal_np, rng.normal_torch),
                      (rng.sign_np, rng.sign_torch)]:
        a, b = f_np(words), f_t(t).numpy()
        assert a.dtype == np.float32 and b.dtype == np.float32
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f_np.__name__


def test_uniform_range_and_exactness():
    edge = np.array([0, 0x1FF, 0x200, 0xFFFFFFFF], dtype=np.uint32)
    u = rng.uniform_np(edge)
    assert u[0] == np.float32(2.0**-24) and u[1] == u[0]  # low 9 bits are discarded
    assert u[2] == np.float32(3 * 2.0**-24)
    assert u[3] == np.float32(1 - 2.0**-24) and u[3] < 1
    w = rng.words_np(1, 2, 0, 100_000)
    uu = rng.uniform_np(w)
    assert (uu > 0).all() and (uu < 1).all()


def test_normal_is_odd_symmetric_and_finite():
    w = rng.words_np(3, 4, 0, 50_000)
    z = rng.normal_np(w)
    zneg = rng.normal_np(w ^ np.uint32(0x80000000))
    assert np.array_equal(z, -zneg)
    assert np.isfinite(z).all() and (z != 0).all()
    extreme = rng.normal_np(np.array([0, 0x80000000], dtype=np.uint32))
    assert 6.3 < extreme[0] < 6.4 and extreme[1] == -extreme[0]  # tail mass 2**-32: |z| = 6.33


def test_normal_table_is_the_spec_table():
    a, d = rng.normal_table_np()
    assert a.shape == d.shape == (4096,)
    text = (Path(__file__).resolve().parents[1] / "spec" / "normal_table_v1.txt").read_text().splitlines()
    rows = [ln.split() for ln in text if not ln.startswith("#")]
    assert len(rows) == 4096
    assert [int(r[2], 16) for r in rows] == a.view(np.uint32).tolist()
    assert [int(r[3], 16) for r in rows] == d.view(np.uint32).tolist()
    # A decreases strictly (larger tail mass -> smaller |z|) and D < 0 everywhere
    assert (np.diff(a.astype(np.float64)) < 0).all() and (d < 0).all()


def test_normal_table_matches_mpmath_quantiles():
    """Spot-check the shipped table against quantiles recomputed in high precision."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    a, _ = rng.normal_table_np()
    for e, j in [(0, 0), (5, 17), (16, 64), (30, 127), (31, 0), (31, 100)]:
        v = mpmath.ldexp(1 + mpmath.mpf(j) / 128, e - 32)
        exact = float(-mpmath.sqrt(2) * mpmath.erfinv(v - 1))
        assert a[e * 128 + j] == np.float32(exact)


def test_golden_vectors_spec_version_and_table():
    assert VECTORS["spec_version"] == rng.SPEC_VERSION == "philox4x32-10/v1"
    assert VECTORS["normal_table_sha256"] == rng.NORMAL_TABLE_SHA256
    for case in VECTORS["philox_kat"]:
        out = rng.philox4x32_np(np.array([u32(case["counter"])], dtype=np.uint32), tuple(u32(case["key"])))[0]
        assert [int(x) for x in out] == u32(case["output"])


def test_golden_vectors_stream_ids():
    for name, sid in VECTORS["stream_ids"].items():
        assert rng.stream_id(name) == int(sid, 16)


def test_golden_vectors_words_both_implementations():
    for case in VECTORS["words"]:
        seed, stream = int(case["seed"]), rng.stream_id(case["name"])
        n = len(case["words"])
        expected = u32(case["words"])
        assert rng.words_np(seed, stream, case["start"], n).tolist() == expected
        assert rng.words_torch(seed, stream, case["start"], n).tolist() == expected


def test_golden_vectors_conversions():
    conv = VECTORS["conversions"]
    words = np.array(u32(conv["words"]), dtype=np.uint32)
    t = torch.from_numpy(words.astype(np.int64))
    for key, f_np, f_t in [("uniform", rng.uniform_np, rng.uniform_torch), ("normal", rng.normal_np, rng.normal_torch),
                           ("sign", rng.sign_np, rng.sign_torch)]:
        assert f_np(words).view(np.uint32).tolist() == u32(conv[key]), key
        assert f_t(t).numpy().view(np.uint32).tolist() == u32(conv[key]), key


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "7", None, True])
def test_bad_seeds_are_refused(bad):
    with pytest.raises(SpecError):
        rng.words_np(bad, 0, 0, 4)


def test_stream_id_needs_a_string():
    with pytest.raises(SpecError):
        rng.stream_id(b"bytes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_words_and_conversions_bit_exact():
    words = rng.words_np(9, rng.stream_id("gpu"), 0, 300_001)
    wt = rng.words_torch(9, rng.stream_id("gpu"), 0, 300_001, device="cuda")
    assert np.array_equal(wt.cpu().numpy(), words.astype(np.int64))
    for f_np, f_t in [(rng.uniform_np, rng.uniform_torch), (rng.normal_np, rng.normal_torch),
                      (rng.sign_np, rng.sign_torch)]:
        assert np.array_equal(f_np(words).view(np.uint32), f_t(wt).cpu().numpy().view(np.uint32))


EXTRA = json.loads((Path(__file__).resolve().parents[1] / "spec" / "vectors" / "rng_v1_extra.json").read_text("utf-8"))


def test_extra_conversion_vectors_numpy_and_torch():
    """rng_v1_extra.json (RNG.md §7): ~1000 words over every octave, cell boundary and sign."""
    assert EXTRA["spec_version"] == rng.SPEC_VERSION and EXTRA["normal_table_sha256"] == rng.NORMAL_TABLE_SHA256
    conv = EXTRA["conversions"]
    words = np.array(u32(conv["words"]), dtype=np.uint32)
    assert len(set(conv["words"])) == words.size > 1000
    t = torch.from_numpy(words.astype(np.int64))
    for key, f_np, f_t in [("uniform", rng.uniform_np, rng.uniform_torch), ("normal", rng.normal_np, rng.normal_torch),
                           ("sign", rng.sign_np, rng.sign_torch)]:
        assert f_np(words).view(np.uint32).tolist() == u32(conv[key]), key
        assert f_t(t).numpy().view(np.uint32).tolist() == u32(conv[key]), key
    octaves = {(int(w) & 0x7FFFFFFF).bit_length() for w in words}  # e + 1 of n = 2*(w & 0x7fffffff) + 1
    assert octaves == set(range(32)) and {int(w) >> 31 for w in words} == {0, 1}
