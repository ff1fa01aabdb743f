"""The torch generator path (freezepack/format/eager.py, rng.PhiloxTorch): what a machine without a C compiler and
every GPU runs. Bit for bit the numpy reference (and the compiled kernel where it builds) at any start, count, batch
size and thread count."""
from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from freezepack import SpecError
from freezepack.format import eager, init, native, rng

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "spec" / "vectors" / "rng_v1.json").read_text("utf-8"))
BATCH = 4 * eager.CPU_BATCH_BLOCKS  # elements per batch on one thread, torch at two threads or more
BIG_BATCH = 4 * eager.CPU_BATCH_BLOCKS_THREADED  # elements per batch when batches go to threads


def bits(x) -> np.ndarray:
    x = x.cpu().numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def reference(dist, a, b, seed, stream, start, count) -> np.ndarray:
    """spec §6 in numpy: the same float32 operations as init.generate_np."""
    w = rng.words_np(seed, stream, start, count)
    a, b = np.float32(a), np.float32(b)
    x = {"normal": lambda: a + b * rng.normal_np(w), "uniform": lambda: a + b * rng.uniform_np(w),
         "sign": lambda: a * rng.sign_np(w)}[dist]()
    return x.astype(np.float32)


def eager_fill(dist, a, b, seed, stream, start, count, **kw) -> torch.Tensor:
    out = torch.empty(count)
    eager.fill(out, dist, a, b, seed, stream, start=start, **kw)
    return out


CASES = [("normal", 0.0, 0.0625), ("normal", 0.25, 0.01171875), ("uniform", -0.5, 1.0), ("uniform", 3.0, -0.75),
         ("sign", 0.125, 0.0), ("sign", -0.0, 0.0)]


@pytest.mark.parametrize("dist,a,b", CASES)
def test_every_start_in_a_block_and_counts_across_batches(dist, a, b):
    """Partial blocks at both ends, one element, and counts that end one before, on and after a batch boundary."""
    stream = rng.stream_id("edges.weight")
    for start in (0, 1, 2, 3, BATCH - 1, BATCH + 2):
        for count in (1, 2, 3, 5, BATCH - start % 4 - 1, BATCH + 1, 2 * BATCH + 3):
            got = eager_fill(dist, a, b, 77, stream, start, count)
            assert np.array_equal(bits(got), bits(reference(dist, a, b, 77, stream, start, count))), (start, count)


def test_random_seeds_names_starts_counts_and_batch_sizes():
    """Random (seed, name, start, count, chunk): seeds at the ends of u64, starts anywhere up to 2**62 and just
    before block 2**32 (where counter word 1 changes inside a run), chunks from one block up."""
    r = random.Random(20261205)
    for _ in range(40):
        dist, a, b = r.choice(CASES)
        seed = r.choice([0, 1, 2**32 - 1, 2**32, 2**64 - 1, r.randrange(2**64)])
        stream = rng.stream_id(r.choice(["w", "conv1.weight", "ünïcode.weight", f"layer{r.randrange(99)}.weight"]))
        count = r.choice([1, 4, 7, r.randrange(1, 3000), r.randrange(BATCH - 5, BATCH + 5)])
        start = r.choice([0, r.randrange(4), r.randrange(10**9), 4 * 2**32 - r.randrange(1, 2 * count + 8),
                          r.randrange(2**62)])
        chunk = r.choice([None, 1, 3, 4, 5, 64, 1001])
        got = eager_fill(dist, a, b, seed, stream, start, count, chunk=chunk)
        want = reference(dist, a, b, seed, stream, start, count)
        assert np.array_equal(bits(got), bits(want)), (dist, seed, stream, start, count, chunk)


@pytest.mark.parametrize("dist,a,b", CASES[::2])
def test_thread_count_never_changes_a_bit(dist, a, b):
    """1, 2 and 4 threads (batches on Python threads, each with torch at one thread) against the reference, from a
    start inside a block and across block 2**32; torch's thread count is left as it was, also for threads started
    later."""
    count = 2 * BIG_BATCH + 4099  # three big batches: two threads or more really take turns
    stream = rng.stream_id("threads.weight")
    before = torch.get_num_threads()
    for start in (3, 4 * 2**32 - BIG_BATCH - 1):
        want = bits(reference(dist, a, b, 5, stream, start, count))
        for threads in (1, 2, 4):
            got = eager_fill(dist, a, b, 5, stream, start, count, threads=threads)
            assert np.array_equal(bits(got), want), (start, threads)
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert torch.get_num_threads() == before and seen == [before]


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_thread_count_never_changes_a_bit(threads):
    """torch's own thread count picks the batch size on one thread (kernels under torch's grain when it is > 1)."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = eager_fill("normal", 0.0, 0.5, 9, 4, 1, 3 * BATCH + 1, threads=1)
    finally:
        torch.set_num_threads(old)
    assert np.array_equal(bits(got), bits(reference("normal", 0.0, 0.5, 9, 4, 1, 3 * BATCH + 1)))


@pytest.mark.skipif(not native.available(), reason="the compiled kernel does not build here")
@pytest.mark.parametrize("dist,a,b", CASES)
def test_eager_equals_the_compiled_kernel(dist, a, b):
    stream = rng.stream_id("both.weight")
    for start, count in ((0, 1), (3, 1000), (4 * 2**32 - 9, 40), (12345, BATCH + 7)):
        want = torch.empty(count)
        native.fill(want, dist, a, b, 31337, stream, start=start)
        assert np.array_equal(bits(eager_fill(dist, a, b, 31337, stream, start, count)), bits(want))


def test_golden_word_vectors_through_the_fill():
    """spec/vectors/rng_v1.json words (one run crosses block 2**32) through the batched Philox, as uniforms:
    u = (2 (w >> 9) + 1) 2**-24 keeps the top 23 bits, sign the top one, the normal all 31 below it."""
    for case in VECTORS["words"]:
        seed, stream, start = int(case["seed"]), rng.stream_id(case["name"]), case["start"]
        words = np.array([int(w, 16) for w in case["words"]], dtype=np.uint32)
        for dist, f in (("uniform", rng.uniform_np), ("normal", rng.normal_np)):
            got = eager_fill(dist, 0.0, 1.0, seed, stream, start, words.size)
            assert np.array_equal(bits(got), bits(np.float32(0.0) + f(words))), (case["name"], dist)
        assert rng.words_torch(seed, stream, start, words.size).tolist() == words.tolist()


def test_uniform_with_a_tiny_span_is_not_prescaled():
    """u * b is computed as U * (b * 2**-24) when that constant is an exact float32; for a span whose b * 2**-24
    would lose bits (a subnormal) the two differ, and the fill must take the spec's order."""
    b = float(np.float32((2**24 - 1) * 2.0**-130))  # a normal float32 with all 24 significand bits set
    assert eager._exact_uniform_scale(b) is None and eager._exact_uniform_scale(0.75) == 0.75 * 2**-24
    stream = rng.stream_id("tiny")
    want = reference("uniform", 0.0, b, 1, stream, 0, 5000)
    assert np.array_equal(bits(eager_fill("uniform", 0.0, b, 1, stream, 0, 5000)), bits(want))
    u = torch.from_numpy(rng.uniform_np(rng.words_np(1, stream, 0, 5000)) * np.float32(2.0**24))
    prescaled = u * torch.tensor(np.float32(b) * np.float32(2.0**-24))
    assert not np.array_equal(bits(prescaled), bits(want))  # what the shortcut would have given


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        eager.fill(torch.empty(4), "cauchy", 0.0, 1.0, 0, 0)
    with pytest.raises(ValueError):
        eager.fill(torch.empty(4), "normal", 0.0, 0.1, 0, 0)  # 0.1 is not a float32
    with pytest.raises(ValueError):
        rng.PhiloxTorch(0, 0, "cpu").words(2**32 - 1, rng.PhiloxBuffers(
            torch.empty((4, 2), dtype=torch.int32), torch.empty((rng.PhiloxBuffers.ROWS, 2), dtype=torch.int64)))


def test_a_backend_whose_multiply_does_not_wrap_is_refused(monkeypatch):
    """The torch path needs int64 products modulo 2**64; a device that saturates (or traps) is refused."""
    monkeypatch.setattr(rng, "_INTEGERS_OK", set())
    real_mul = torch.mul

    def saturating(x, m, **kw):
        exact = real_mul(x.double(), m.double())
        return torch.where(exact >= 2.0**63, torch.iinfo(torch.int64).max, real_mul(x, m, **kw))

    monkeypatch.setattr(rng.torch, "mul", saturating)
    with pytest.raises(SpecError, match="does not wrap"):
        rng.check_torch_integers(torch.device("cpu"))


def test_generate_without_the_kernel_uses_this_path(monkeypatch):
    monkeypatch.setenv("FREEZEPACK_NO_NATIVE", "1")
    calls = []
    real = eager.fill
    monkeypatch.setattr(eager, "fill", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    spec = init.make_init("kaiming_uniform", (40, 30))
    got = init.generate(spec, (40, 30), 3, "fc.weight")
    assert calls and np.array_equal(bits(got), bits(init.generate_np(spec, (40, 30), 3, "fc.weight")))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA (CPU twins: test_every_start_in_a_block_and_counts_across_batches, "
                           "test_random_seeds_names_starts_counts_and_batch_sizes)")
@pytest.mark.parametrize("dist,a,b", CASES)
def test_cuda_equals_reference(dist, a, b):
    """The same kernels on a GPU (one batch is 2M elements there: cross it)."""
    stream = rng.stream_id("gpu.weight")
    for start, count in ((3, 1001), (4 * 2**32 - 5, 4 * eager.ACCELERATOR_BATCH_BLOCKS + 9)):
        out = torch.empty(count, device="cuda")
        eager.fill(out, dist, a, b, 8, stream, start=start)
        assert np.array_equal(bits(out), bits(reference(dist, a, b, 8, stream, start, count)))
