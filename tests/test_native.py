"""The compiled CPU kernel (freezepack/format/_philox.c) equals the numpy reference bit for bit, and every way it can be
missing (no compiler, failed build, wrong bits, a stale installed build, FREEZEPACK_NO_NATIVE) falls back to the torch
path: the same bits, with one warning (none when FREEZEPACK_NO_NATIVE asked for it)."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from freezepack.format import eager, init, native, rng

HAVE_CC = native._compiler() is not None
# Many tests here make the kernel unavailable on purpose; the one warning that causes is tested on its own.
pytestmark = pytest.mark.filterwarnings("ignore:freezepack. the compiled:RuntimeWarning")
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the native kernel cannot be built here")


def bits(x) -> np.ndarray:
    x = x.cpu().numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def ref_fill(dist, a, b, seed, stream, start, count, scale=None) -> np.ndarray:
    """The numpy reference for native.fill: the same float32 operations as init.generate_np."""
    w = rng.words_np(seed, stream, start, count)
    a, b = np.float32(a), np.float32(b)
    x = {"normal": lambda: a + b * rng.normal_np(w), "uniform": lambda: a + b * rng.uniform_np(w),
         "sign": lambda: a * rng.sign_np(w)}[dist]().astype(np.float32)
    return x if scale is None else (x * np.float32(scale)).astype(np.float32)


@pytest.fixture
def no_native(monkeypatch):
    monkeypatch.setenv("FREEZEPACK_NO_NATIVE", "1")

    def boom(*a, **k):
        raise AssertionError("native kernel used although FREEZEPACK_NO_NATIVE=1")

    monkeypatch.setattr(native, "fill", boom)


# ----------------------------------------------------------------------------------------------------------------
# the kernel == the numpy reference
# ----------------------------------------------------------------------------------------------------------------

@needs_cc
def test_kernel_builds_and_loads_where_a_compiler_exists(monkeypatch):
    monkeypatch.delenv("FREEZEPACK_NO_NATIVE", raising=False)
    assert native.available(), native.unavailable_reason()
    assert native.unavailable_reason() is None


@needs_cc
@pytest.mark.parametrize("seed,stream,start,count", [
    (0, 0, 0, 1), (0, 0, 0, 257), (1, 2, 3, 130), (2**64 - 1, 2**64 - 1, 0, 99),
    (0xDEADBEEF, rng.stream_id("fc1.weight"), 1_000_001, 1000),
    (7, 5, 4 * 2**32 - 10, 50),                       # block counter carries from its low word into the high
    (2**63 + 5, 2**40 + 3, 2**62 - 3, 77),           # far into the stream
])
def test_words_equal_reference(seed, stream, start, count):
    assert np.array_equal(native.words(seed, stream, start, count), rng.words_np(seed, stream, start, count))


def test_philox_known_answer_vectors():
    """Random123 KAT (counter 0, key 0) through the kernel: element i = word of block i//4, stream 0."""
    if not native.available():
        pytest.skip(native.unavailable_reason())
    got = native.words(0, 0, 0, 4)
    assert [f"{v:08x}" for v in got] == ["6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8"]
    assert native.words(0, 0, 0, 0).size == 0


@needs_cc
@pytest.mark.parametrize("dist", ["normal", "uniform", "sign"])
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32, 2**64 - 1])
def test_fill_equals_reference_seeds_and_starts(dist, seed):
    """Every start offset within a block and counts that straddle the kernel's 64-word batches."""
    stream = rng.stream_id(f"layer{seed % 7}.weight")
    a, b = (-0.5, 0.25) if dist != "sign" else (0.125, 0.0)
    for start in (0, 1, 2, 3, 61, 64, 1001):
        for count in (1, 3, 4, 63, 64, 65, 129, 200):
            out = torch.empty(count)
            native.fill(out, dist, a, b, seed, stream, start=start)
            assert np.array_equal(bits(out), bits(ref_fill(dist, a, b, seed, stream, start, count))), (start, count)


@needs_cc
@pytest.mark.parametrize("dist", ["normal", "uniform", "sign"])
def test_fill_refuses_constants_that_are_not_float32(dist):
    stream = rng.stream_id("scaled")
    out = torch.empty(1000)
    pytest.raises(ValueError, native.fill, out, dist, 0.1, 0.75, 3, stream)  # 0.1 is not a float32
    pytest.raises(ValueError, native.fill, out, dist, 0.0, 0.75, 3, stream, scale=0.3)


@needs_cc
@pytest.mark.parametrize("dist", ["normal", "uniform", "sign"])
def test_fill_with_float32_scale(dist):
    stream, scale = rng.stream_id("scaled"), float(np.float32(0.3))
    out = torch.empty(1000)
    native.fill(out, dist, -0.125, 0.75, 3, stream, start=2, scale=scale)
    assert np.array_equal(bits(out), bits(ref_fill(dist, -0.125, 0.75, 3, stream, 2, 1000, scale)))


def _all_octave_words() -> np.ndarray:
    """Words reaching every octave e of the normal table and both edges of every cell, both signs."""
    ws = []
    for e in range(32):
        lo = (1 << e) >> 1                         # n = 2w+1 has bit_length e+1 for w in [2^(e-1), 2^e)
        hi = ((1 << e) - 1) if e else 0
        ws += [lo, hi, (lo + hi) // 2]
        for j in range(0, 129, 8):                 # cell boundaries inside the octave
            ws.append(min(hi, lo + (((1 << e) * j) >> 8)))
    ws = np.array(ws, dtype=np.uint64) & 0x7FFFFFFF
    gen = np.random.default_rng(5)
    ws = np.concatenate([ws, gen.integers(0, 2**31, 20000, dtype=np.uint64),
                         np.arange(0, 2**31, 2**31 // 4096, dtype=np.uint64)])
    ws = np.concatenate([ws, ws | 0x80000000]).astype(np.uint32)
    return ws


@needs_cc
@pytest.mark.parametrize("dist,a,b", [("normal", 0.0, 1.0), ("normal", 0.25, 0.01), ("uniform", -1.5, 3.0),
                                      ("sign", -0.0625, 0.0)])
def test_conversion_equals_reference_in_every_octave(dist, a, b):
    w = _all_octave_words()
    f = {"normal": rng.normal_np, "uniform": rng.uniform_np, "sign": rng.sign_np}[dist]
    ref = np.float32(a) * f(w) if dist == "sign" else np.float32(a) + np.float32(b) * f(w)
    assert np.array_equal(bits(native.convert(w, dist, a, b)), bits(ref))
    if dist == "normal" and (a, b) == (0.0, 1.0):
        z = native.convert(w, dist, a, b)
        assert np.isfinite(z).all() and np.abs(z).max() > 6  # the deepest octaves were really reached


SHAPES = [(), (0,), (1,), (3,), (5, 7), (4, 0, 3), (33, 17), (20, 1, 5, 5), (3, 3, 3, 3, 3), (1031,)]


@needs_cc
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("init_name", ["xavier_normal", "kaiming_uniform", "pm_sigma", "normal", "uniform",
                                       "constant"])
def test_generate_uses_kernel_and_equals_reference(shape, init_name, monkeypatch):
    if init_name in ("xavier_normal", "kaiming_uniform", "pm_sigma"):
        spec = init.make_init(init_name, shape) if len(shape) >= 2 and 0 not in shape else \
            init.make_init(init_name, (6, 6))
    else:
        spec = init.make_init(init_name, **({"val": 0.5} if init_name == "constant" else {}))
    calls = []
    real_fill = native.fill
    monkeypatch.setattr(native, "fill", lambda *a, **k: (calls.append(1), real_fill(*a, **k))[1])
    monkeypatch.setattr(eager, "fill", lambda *a, **k: pytest.fail("torch path used"))
    for seed, name in [(0, "w"), (99, "features.0.weight"), (2**64 - 1, "ünïcode.weight")]:
        got = init.generate(spec, shape, seed, name)
        assert got.dtype == torch.float32 and tuple(got.shape) == shape
        assert np.array_equal(bits(got), bits(init.generate_np(spec, shape, seed, name)))
    assert bool(calls) == (spec.uses_bits and 0 not in shape)


@needs_cc
def test_thread_count_never_changes_a_bit():
    n = 3 * 2**18 + 13  # enough for several threads (each takes at least 2**16 elements)
    stream = rng.stream_id("threads")
    outs = []
    for threads in (1, 2, 3, 5, 12, 1000, 0, -1):
        out = torch.empty(n)
        native.fill(out, "normal", 0.0, 0.5, 21, stream, start=3, threads=threads)
        outs.append(bits(out))
    for o in outs[1:]:
        assert np.array_equal(outs[0], o)
    assert np.array_equal(outs[0], bits(ref_fill("normal", 0.0, 0.5, 21, stream, 3, n)))
    old = torch.get_num_threads()
    try:  # generate follows torch's thread setting
        spec = init.make_init("xavier_uniform", (600, 700))
        got = []
        for t in (1, 2):
            torch.set_num_threads(t)
            got.append(bits(init.generate(spec, (600, 700), 8, "fc.weight")))
    finally:
        torch.set_num_threads(old)
    assert np.array_equal(got[0], got[1])
    assert np.array_equal(got[0], bits(init.generate_np(spec, (600, 700), 8, "fc.weight")))


@needs_cc
def test_more_than_2_pow_24_elements():
    """Index arithmetic past float32's exact-integer range; windows checked against the reference."""
    n = 2**24 + 37
    spec = init.make_init("normal", mean=0.5, std=0.25)
    t = init.generate(spec, (n,), 12, "big.weight").numpy()
    stream = rng.stream_id("big.weight")
    for start in (0, 2**24 - 100, n - 1000):
        count = min(1000, n - start)
        assert np.array_equal(bits(t[start:start + count]),
                              bits(ref_fill("normal", 0.5, 0.25, 12, stream, start, count)))
    # the kernel at an offset gives the same elements as the whole tensor (no hidden chunk dependence)
    part = torch.empty(2537)
    native.fill(part, "normal", 0.5, 0.25, 12, stream, start=2**24 - 2500)
    assert np.array_equal(bits(part), bits(t[2**24 - 2500:]))


@needs_cc
def test_generate_into_out_and_views():
    spec = init.make_init("kaiming_normal", (64, 32))
    buf = torch.full((3, 64, 32), 7.0)
    r = init.generate(spec, (64, 32), 4, "w", out=buf[1])  # a contiguous view with a storage offset
    assert r.data_ptr() == buf[1].data_ptr()
    assert np.array_equal(bits(buf[1]), bits(init.generate_np(spec, (64, 32), 4, "w")))
    assert (buf[0] == 7.0).all() and (buf[2] == 7.0).all()  # nothing written outside out


@needs_cc
def test_fill_rejects_bad_arguments():
    with pytest.raises(ValueError):
        native.fill(torch.empty(10, dtype=torch.float64), "normal", 0.0, 1.0, 0, 0)
    with pytest.raises(ValueError):
        native.fill(torch.empty(4, 4).t(), "normal", 0.0, 1.0, 0, 0)
    with pytest.raises(ValueError):
        native.fill(torch.empty(4), "cauchy", 0.0, 1.0, 0, 0)
    with pytest.raises(ValueError):
        native.fill(torch.empty(4), "normal", 0.0, 1.0, 0, 2**64)
    with pytest.raises(ValueError):
        native.fill(torch.empty(4), "normal", 0.0, 1.0, 0, 0, start=2**64 - 2)


# ----------------------------------------------------------------------------------------------------------------
# the fallback: torch eager path, bit-identical
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 64, 1000, 1 << 18])
@pytest.mark.parametrize("init_name", ["xavier_normal", "xavier_uniform", "pm_sigma"])
def test_no_native_env_uses_torch_path_bit_identically(no_native, chunk, init_name):
    shape = (37, 5, 3) if chunk > 1 else (7, 11)
    spec = init.make_init(init_name, shape)
    assert not native.available() and "FREEZEPACK_NO_NATIVE" in native.unavailable_reason()
    got = init.generate(spec, shape, 5, "conv.weight", chunk=chunk)
    assert np.array_equal(bits(got), bits(init.generate_np(spec, shape, 5, "conv.weight")))


def test_no_compiler_falls_back(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_native / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="compiled philox kernel is unavailable"):
        assert not native.available()
    assert "no C compiler" in native.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable"):
        native.fill(torch.empty(3), "normal", 0.0, 1.0, 0, 0)
    spec = init.make_init("xavier_normal", (30, 20))
    got = init.generate(spec, (30, 20), 1, "w")
    assert np.array_equal(bits(got), bits(init.generate_np(spec, (30, 20), 1, "w")))


def _script(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(sys.platform == "win32", reason="shell script compiler stand-ins")
def test_failed_build_falls_back(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", _script(fresh_native / "badcc", "echo 'badcc: internal error' >&2\nexit 3\n"))
    assert not native.available()
    assert "badcc: internal error" in native.unavailable_reason()
    spec = init.make_init("uniform", a=-2.0, b=2.0)
    assert np.array_equal(bits(init.generate(spec, (17,), 3, "b")), bits(init.generate_np(spec, (17,), 3, "b")))


@needs_cc
@pytest.mark.skipif(sys.platform == "win32", reason="shell script compiler stand-ins")
def test_kernel_with_wrong_bits_is_never_used(fresh_native, monkeypatch):
    """A compiler that builds something different (here: one Philox constant changed) fails the self-check."""
    cc = native._compiler()
    body = ('for last; do :; done\n'
            'sed "s/0xD2511F53u/0xD2511F55u/" "$last" > "$last.x" && mv "$last.x" "$last"\n'
            f'exec "{cc}" "$@"\n')
    monkeypatch.setenv("CC", _script(fresh_native / "evilcc", body))
    assert not native.available()
    assert "differ" in native.unavailable_reason()
    spec = init.make_init("xavier_normal", (40, 20))
    assert np.array_equal(bits(init.generate(spec, (40, 20), 2, "w")), bits(init.generate_np(spec, (40, 20), 2, "w")))


@needs_cc
def test_cache_is_private_keyed_and_reused(fresh_native, monkeypatch):
    assert native.available(), native.unavailable_reason()
    d = native.cache_dir()
    libs = [f for f in os.listdir(d) if f.endswith(".so")]
    assert len(libs) == 1 and stat.S_IMODE(os.stat(d).st_mode) & 0o077 == 0
    # a second process (simulated by resetting the state) loads the cached library instead of compiling again
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "subprocess", None)  # any compile attempt would now raise
    assert native.available(), native.unavailable_reason()
    # other flags give another key, never the stale library
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "CFLAGS", native.CFLAGS + ("-DFP_UNUSED_FLAG",))
    monkeypatch.setattr(native, "subprocess", __import__("subprocess"))
    assert native.available(), native.unavailable_reason()
    assert len([f for f in os.listdir(d) if f.endswith(".so")]) == 2


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_cache_writable_by_others_is_refused(fresh_native):
    d = native.cache_dir()
    os.makedirs(d)
    os.chmod(d, 0o777)
    assert not native.available()
    assert "writable by other users" in native.unavailable_reason()


@needs_cc
def test_damaged_cached_library_is_rebuilt(fresh_native):
    from importlib import resources
    source = resources.files("freezepack.format").joinpath("_philox.c").read_bytes()
    path = native._build(source, native._compiler())  # built into the fresh cache, never loaded yet
    with open(path, "wb") as f:
        f.write(b"\x7fELF truncated")
    assert native.available(), native.unavailable_reason()
    assert os.path.getsize(path) > 1000


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_cache_in_a_directory_others_can_change_is_refused(fresh_native, monkeypatch):
    shared = fresh_native / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: another user could rename our directory away and put theirs in its place
    monkeypatch.setenv("FREEZEPACK_CACHE", str(shared))
    assert not native.available()
    assert "could be changed by other users" in native.unavailable_reason()


@needs_cc
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_unusable_home_cache_falls_back_to_temp_dir(fresh_native, monkeypatch):
    monkeypatch.delenv("FREEZEPACK_CACHE")
    not_a_dir = fresh_native / "xdg"
    not_a_dir.write_text("a file where the cache directory should be (fails even for root)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_dir))
    monkeypatch.setattr(native.tempfile, "tempdir", str(fresh_native))
    assert native.available(), native.unavailable_reason()
    assert os.listdir(fresh_native / f"freezepack-{os.getuid()}" / "native")


def test_the_fallback_warns_once_per_process(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_native / "no-such-compiler"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            init.generate(init.make_init("xavier_normal", (30, 20)), (30, 20), 1, "w")
    assert [str(w.message) for w in seen if "philox" in str(w.message)].__len__() == 1


def _installed_build(tmp_path, sha: str) -> str:
    """The library as setup.py builds it (the source's sha256 compiled in), in a stand-in package directory."""
    src = os.path.join(os.path.dirname(native.__file__), "_philox.c")
    out = str(tmp_path / "_philox_lib.so")
    subprocess.run([native._compiler(), *native.CFLAGS, f'-DFP_SOURCE_SHA256="{sha}"', "-o", out, src], check=True)
    return out


@needs_cc
def test_the_installed_library_is_used_without_a_compiler(fresh_native, monkeypatch):
    src = os.path.join(os.path.dirname(native.__file__), "_philox.c")
    with open(src, "rb") as f:
        lib = _installed_build(fresh_native, hashlib.sha256(f.read()).hexdigest())
    monkeypatch.setattr(native, "packaged_path", lambda name: lib)
    monkeypatch.setenv("CC", str(fresh_native / "no-such-compiler"))
    assert native.available(), native.unavailable_reason()
    assert native._lib._name == lib
    spec = init.make_init("xavier_normal", (300, 200))
    got = init.generate(spec, (300, 200), 4, "w")
    assert np.array_equal(bits(got), bits(init.generate_np(spec, (300, 200), 4, "w")))


@needs_cc
def test_an_installed_library_from_another_source_is_never_used(fresh_native, monkeypatch):
    lib = _installed_build(fresh_native, "0" * 64)  # an editable checkout whose C source changed since install
    monkeypatch.setattr(native, "packaged_path", lambda name: lib)
    monkeypatch.setenv("CC", str(fresh_native / "no-such-compiler"))
    with pytest.warns(RuntimeWarning):
        assert not native.available()
    assert "another version of the source" in native.unavailable_reason()
    monkeypatch.setattr(native, "_failure", None)  # with a compiler: the per-user cache build instead
    monkeypatch.delenv("CC")
    assert native.available(), native.unavailable_reason()
    assert native._lib._name != lib and native._lib._name.startswith(native.cache_dir())


@needs_cc
def test_vector_and_scalar_paths_agree(monkeypatch):
    """Where the CPU has a vector path (AVX2), it gives the scalar path's bits: many words, every distribution,
    and every octave of the normal table through the conversion alone."""
    monkeypatch.delenv("FREEZEPACK_NO_NATIVE", raising=False)
    if not native.available():
        pytest.skip(native.unavailable_reason())
    lib = native._lib
    best = lib.fp_simd(-1)
    if best == 0:
        pytest.skip("no vector path on this CPU")
    edges = np.array([v for e in range(32) for v in ((1 << e) >> 1, max((1 << e) - 1, 0), (3 << e) >> 2)],
                     dtype=np.uint64).astype(np.uint32)
    words = np.concatenate([edges, edges | np.uint32(0x80000000), native.words(3, 4, 1, 100_003)])
    carry = 4 * (2**32 - 9) + 1  # the block counter's low word wraps inside a batch (a vector path's slow branch)
    try:
        outs = {}
        for mode in range(best + 1):  # every path the CPU has (AVX-512 is best where present, AVX2 still runs)
            assert lib.fp_simd(mode) == mode
            lib.fp_simd(mode)
            outs[mode] = [native.convert(words, d, -0.5, 0.75, scale=1.5).view(np.uint32)
                          for d in ("normal", "uniform", "sign")]
            out = torch.empty(200_001)
            native.fill(out, "normal", 0.0, 1.0, 9, 10, start=7, threads=1)
            outs[mode].append(out.view(torch.int32).numpy().copy())
            outs[mode].append(native.words(9, 10, 7, 200_001))
            outs[mode].append(native.words(9, 10, carry, 300))
    finally:
        lib.fp_simd(best)
    for mode in outs:
        for a, b in zip(outs[0], outs[mode]):
            assert np.array_equal(a, b), mode
    assert np.array_equal(outs[0][-1], rng.words_np(9, 10, carry, 300))
    assert np.array_equal(outs[0][0][:edges.size * 2],
                          (np.float32(-0.5) + np.float32(0.75) * rng.normal_np(words[:edges.size * 2])).astype(
                              np.float32).__mul__(np.float32(1.5)).view(np.uint32))
