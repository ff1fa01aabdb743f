"""Initializers: golden vectors, numpy reference == torch on any shape/chunk/thread count, torch.nn.init stats."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from freezepack import SpecError
from freezepack.format import init, rng

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "spec" / "vectors" / "rng_v1.json").read_text("utf-8"))


def bits(x) -> np.ndarray:
    x = x.cpu().numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("case", VECTORS["initializers"], ids=lambda c: f"{c['init']}{c['shape']}")
def test_golden_initializer_vectors(case, path):
    shape = tuple(case["shape"])
    spec = init.make_init(case["init"], shape, **case["params"])
    assert spec.to_json() == case["spec"]  # the stored constants themselves are pinned
    assert f"{int(bits(np.array([spec.a]))[0]):08x}" == case["a_hex"]
    assert f"{int(bits(np.array([spec.b]))[0]):08x}" == case["b_hex"]
    for x in (init.generate_np(spec, shape, case["seed"], case["tensor"]),
              init.generate(spec, shape, case["seed"], case["tensor"])):
        assert tuple(x.shape) == shape
        assert hashlib.sha256(bits(x).astype("<u4").tobytes()).hexdigest() == case["sha256"]
        assert [f"{v:08x}" for v in bits(x).ravel()[:8]] == case["first"]


SHAPES = [(), (0,), (1,), (3,), (5, 7), (4, 0, 3), (33, 17), (20, 1, 5, 5), (3, 3, 3, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["normal", "uniform", "pm_sigma", "constant"])
def test_numpy_reference_equals_torch_any_shape(shape, name, path):
    params = {"val": 0.25} if name == "constant" else {}
    spec = init.make_init(name, shape if name == "pm_sigma" and len(shape) >= 2 else (), **params) \
        if name != "pm_sigma" or len(shape) >= 2 else init.InitSpec("pm_sigma", "sign", 0.125)
    a = init.generate_np(spec, shape, 77, "some.weight")
    b = init.generate(spec, shape, 77, "some.weight")
    assert b.dtype == torch.float32 and tuple(b.shape) == shape
    assert np.array_equal(bits(a), bits(b))


@pytest.fixture(params=["native", "eager"])
def path(request, monkeypatch):
    """Run a test on both CPU paths: the compiled kernel (when it builds) and torch eager (what CUDA runs)."""
    if request.param == "eager":
        monkeypatch.setenv("FREEZEPACK_NO_NATIVE", "1")
    return request.param


# chunks of 1-4 elements: one torch launch per element on the eager path (tens of seconds), hence slow
@pytest.mark.parametrize("chunk", [pytest.param(c, marks=pytest.mark.slow) for c in (1, 3, 4)] + [1000, 4096, 1 << 20])
def test_chunk_size_never_changes_a_bit(chunk, path):
    spec = init.make_init("xavier_normal", (50, 20, 5, 5))
    ref = init.generate_np(spec, (50, 20, 5, 5), 3, "conv2.weight")
    got = init.generate(spec, (50, 20, 5, 5), 3, "conv2.weight", chunk=chunk)
    assert np.array_equal(bits(ref), bits(got))


def test_thread_count_never_changes_a_bit(path):
    spec = init.make_init("kaiming_uniform", (500, 800))
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(bits(init.generate(spec, (500, 800), 5, "fc.weight")))
    finally:
        torch.set_num_threads(old)
    assert np.array_equal(outs[0], outs[1])


def test_more_than_2_pow_24_elements_tail_matches_reference():
    """Index arithmetic past float32's exact-integer range: the last elements of a 2**24+37 tensor.

    Runs on the default CPU path (the compiled kernel); the eager path's indexing at such offsets is checked by
    tests/test_rng.py (word runs starting past 2**34) and tests/test_native.py.
    """
    n = 2**24 + 37
    spec = init.make_init("normal", std=0.5)
    t = init.generate(spec, (n,), 12, "big.weight")
    start = n - 1000
    w = rng.words_np(12, rng.stream_id("big.weight"), start, 1000)
    ref = np.float32(0.0) + np.float32(0.5) * rng.normal_np(w)
    assert np.array_equal(bits(t[start:]), bits(ref))


def test_out_and_device_arguments():
    spec = init.make_init("uniform", a=-1.0, b=1.0)
    out = torch.empty(10, 10)
    r = init.generate(spec, (10, 10), 1, "w", out=out)
    assert r.data_ptr() == out.data_ptr()
    assert np.array_equal(bits(out), bits(init.generate_np(spec, (10, 10), 1, "w")))
    with pytest.raises(SpecError):
        init.generate(spec, (10, 10), 1, "w", out=torch.empty(5))


def test_streams_are_independent_of_other_tensors():
    """A tensor's values depend on its own name only: adding/reordering tensors changes nothing."""
    spec = init.make_init("xavier_normal", (30, 40))
    a = init.generate(spec, (30, 40), 9, "layer2.weight")
    init.generate(spec, (30, 40), 9, "layer1.weight")
    b = init.generate(spec, (30, 40), 9, "layer2.weight")
    c = init.generate(spec, (30, 40), 9, "layer3.weight")
    d = init.generate(spec, (30, 40), 10, "layer2.weight")
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("shape", [(300, 784), (20, 1, 5, 5), (50, 20, 5, 5), (64, 3, 3, 3), (10, 500)])
def test_fans_match_torch(shape):
    fi, fo = init.fans(shape)
    tfi, tfo = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    assert (fi, fo) == (tfi, tfo)


def torch_std(name, shape, **kw):
    """The std torch.nn.init's formulas give, for comparison."""
    fi, fo = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    if name.startswith("xavier"):
        return kw.get("gain", 1.0) * math.sqrt(2.0 / (fi + fo))
    fan = fi if kw.get("mode", "fan_in") == "fan_in" else fo
    gain = torch.nn.init.calculate_gain(kw.get("nonlinearity", "leaky_relu"), kw.get("a", 0.0))
    return gain / math.sqrt(fan)


@pytest.mark.parametrize("name,kw", [("xavier_normal", {}), ("xavier_uniform", {"gain": 1.5}),
                                     ("kaiming_normal", {"mode": "fan_out", "nonlinearity": "relu"}),
                                     ("kaiming_uniform", {"a": math.sqrt(5)}), ("pm_sigma", {})])
def test_scales_are_torchs_rounded_once_to_float32(name, kw):
    shape = (128, 64, 3, 3)
    spec = init.make_init(name, shape, **kw)
    std = torch_std(name if name != "pm_sigma" else "xavier_normal", shape, **kw)
    if spec.dist == "normal":
        assert spec.b == float(np.float32(std)) and spec.a == 0.0
    elif spec.dist == "uniform":
        bound = math.sqrt(3.0) * std
        assert abs(spec.a + bound) <= 1e-7 * bound and abs(spec.b - 2 * bound) <= 2e-7 * bound
    else:
        assert spec.a == float(np.float32(std))


STAT_CASES = [
    ("xavier_normal", {}, "norm"), ("kaiming_normal", {"nonlinearity": "relu"}, "norm"),
    ("normal", {"mean": 1.0, "std": 2.0}, "norm"),
    ("xavier_uniform", {}, "uniform"), ("kaiming_uniform", {"a": math.sqrt(5)}, "uniform"),
    ("uniform", {"a": -3.0, "b": 5.0}, "uniform"),
]


@pytest.mark.parametrize("name,kw,kind", STAT_CASES)
def test_distribution_statistics(name, kw, kind):
    """Mean, variance and a KS test on 2M samples, against the exact target distribution."""
    stats = pytest.importorskip("scipy.stats")
    shape = (2000, 1000)
    spec = init.make_init(name, shape, **kw)
    x = init.generate(spec, shape, 2024, f"{name}.weight").double().numpy().ravel()
    n = x.size
    if kind == "norm":
        mean, std = spec.a, spec.b
        dist = stats.norm(loc=mean, scale=std)
    else:
        lo, span = spec.a, spec.b
        mean, std = lo + span / 2, span / math.sqrt(12)
        dist = stats.uniform(loc=lo, scale=span)
    # 5-sigma bounds on the sample mean and variance (var of s^2 is 2 s^4/n normal, 0.8 s^4/n uniform)
    assert abs(x.mean() - mean) < 5 * std / math.sqrt(n)
    assert abs(x.var() / std**2 - 1) < 5 * math.sqrt(2.0 / n)
    ks = stats.kstest(x, dist.cdf)
    assert ks.pvalue > 1e-4, ks


def test_pm_sigma_is_plus_minus_sigma_with_half_probability():
    spec = init.make_init("pm_sigma", (1000, 1000))
    x = init.generate(spec, (1000, 1000), 4, "pm.weight")
    sigma = math.sqrt(2.0 / 2000)
    assert set(torch.unique(x).tolist()) == {-float(np.float32(sigma)), float(np.float32(sigma))}
    frac = (x > 0).double().mean().item()
    assert abs(frac - 0.5) < 5 * 0.5 / 1000


def test_zeros_and_constant():
    assert torch.count_nonzero(init.generate(init.make_init("zeros"), (4, 4), 1, "z")) == 0
    c = init.generate(init.make_init("constant", val=0.1), (4,), 1, "c")
    assert torch.equal(c, torch.full((4,), 0.1, dtype=torch.float32))


def test_spec_json_round_trip():
    spec = init.make_init("kaiming_uniform", (10, 20), a=0.1, mode="fan_out")
    back = init.InitSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert back == spec and back.params == spec.params


@pytest.mark.parametrize("bad", [
    lambda: init.make_init("glorot", (2, 2)),
    lambda: init.make_init("xavier_normal", (5,)),
    lambda: init.make_init("xavier_normal", (2, 2), gian=1.0),
    lambda: init.make_init("kaiming_normal", (2, 2), mode="fan_middle"),
    lambda: init.make_init("kaiming_normal", (2, 2), nonlinearity="swishy"),
    lambda: init.InitSpec("normal", "cauchy", 0.0, 1.0),
    lambda: init.InitSpec("normal", "normal", 0.0, 0.1),  # 0.1 is not a float32 value
    lambda: init.InitSpec("normal", "normal", 0.0, float("nan")),
    lambda: init.InitSpec.from_json({"name": "x", "a": 0.0}),
    lambda: init.InitSpec.from_json(["normal"]),
    lambda: init.generate(init.make_init("normal"), (-1, 3), 0, "w"),
])
def test_bad_specs_get_a_clear_error(bad):
    with pytest.raises(SpecError):
        bad()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", init.INITIALIZERS)
def test_cuda_regeneration_bit_exact(name):
    shape = (257, 33, 3, 3)
    spec = init.make_init(name, shape)
    ref = init.generate_np(spec, shape, 31337, f"{name}.w")
    got = init.generate(spec, shape, 31337, f"{name}.w", device="cuda")
    assert got.device.type == "cuda"
    assert np.array_equal(bits(ref), bits(got))


EXTRA = json.loads((Path(__file__).resolve().parents[1] / "spec" / "vectors" / "rng_v1_extra.json").read_text("utf-8"))


@pytest.mark.parametrize("case", EXTRA["initializers"], ids=lambda c: f"{c['init']}{c['shape']}-{c['seed']}")
def test_extra_initializer_vectors_every_value(case, path):
    """Offset initializers listed value by value: a reader that rounds a + b*z once fails them."""
    shape = tuple(case["shape"])
    spec = init.make_init(case["init"], shape, **case["params"])
    assert spec.to_json() == case["spec"]
    for x in (init.generate_np(spec, shape, case["seed"], case["tensor"]),
              init.generate(spec, shape, case["seed"], case["tensor"])):
        assert [f"{v:08x}" for v in bits(x).ravel()] == case["values"]
        assert hashlib.sha256(bits(x).astype("<u4").tobytes()).hexdigest() == case["sha256"]


def test_extra_resolution_vectors():
    """RNG.md §6's binary64 steps: make_init reproduces ~170 pinned f32 constants."""
    for case in EXTRA["resolution"]:
        spec = init.make_init(case["init"], tuple(case["shape"]), **case["params"])
        got = (spec.dist, f"{int(bits(np.array([spec.a]))[0]):08x}", f"{int(bits(np.array([spec.b]))[0]):08x}")
        assert got == (case["dist"], case["a_hex"], case["b_hex"]), case
