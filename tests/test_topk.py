"""Radix-selected global masks equal the stable-sort definition bit for bit, ties and special values included."""
import math

import pytest
import torch

from freezepack.format import ans, rng
from freezepack.method import topk
from freezepack.method.saliency import global_mask, random_scores, weights_to_train


def sorted_top_k(scores, k):
    """The definition (the code before radix selection): stable descending sort of the float64 scores."""
    flat = [s.detach().reshape(-1).to("cpu", torch.float64) for s in scores]
    allscores = torch.nan_to_num(torch.cat(flat), nan=-math.inf)
    keep = torch.zeros(allscores.numel(), dtype=torch.bool)
    if k:
        keep[torch.sort(allscores, descending=True, stable=True).indices[:k]] = True
    return [p.view(s.shape) for p, s in zip(keep.split([f.numel() for f in flat]), scores)]


def _special(n, gen, dtype):
    x = torch.randint(-3, 4, (n,), generator=gen).to(torch.float64) / 2  # many exact ties
    vals = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, -1e-300, 1.7976931348623157e308],
                        dtype=torch.float64)
    pos = torch.randint(0, n, (n // 5,), generator=gen)
    x[pos] = vals[torch.randint(0, vals.numel(), (pos.numel(),), generator=gen)]
    return x.to(dtype)


def _paths():
    """The numpy twin always; the compiled kernels where they are built."""
    lib = ans.compiled()
    return [False] + ([lib] if lib is not None else [])


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("collect", [topk.COLLECT_MAX, 0], ids=["two-pass", "three-pass"])
@pytest.mark.parametrize("path", range(2), ids=["numpy", "compiled"])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16, torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float64), (torch.float64,), (torch.int64, torch.float32)])
def test_selection_equals_stable_sort_with_ties_and_specials(monkeypatch, dtypes, path, collect, threads):
    """... for 1, 2 and 4 threads: the chunks' passes run in parallel, the masks must not depend on it."""
    if path >= len(_paths()):
        pytest.skip(f"compiled kernels unavailable: {ans.unavailable_reason()}")
    lib = _paths()[path]
    monkeypatch.setattr(topk, "CHUNK", 97)  # many chunks per tensor, boundaries everywhere
    monkeypatch.setattr(topk, "COLLECT_MAX", collect)
    gen = torch.Generator().manual_seed(len(dtypes))
    shapes = [(13, 7), (300,), (1,), (5, 4, 3)]
    scores = [_special(math.prod(sh), gen, dtypes[i % len(dtypes)]).view(sh) for i, sh in enumerate(shapes)]
    total = sum(s.numel() for s in scores)
    for k in sorted({0, 1, 2, 7, total // 3, total // 2, total - 1, total}):
        got = topk.top_k_masks(scores, k, lib=lib, threads=threads)
        want = sorted_top_k(scores, k)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), k
        assert sum(int(g.sum()) for g in got) == k


def test_selection_on_continuous_scores_and_one_per_layer():
    gen = torch.Generator().manual_seed(3)
    scores = {"a": torch.rand(64, 64, generator=gen), "b": torch.rand(100, generator=gen) * 1e-6,
              "c": torch.rand(3000, generator=gen)}
    masks = global_mask(scores, 0.9, seed=5)
    k = weights_to_train(sum(s.numel() for s in scores.values()), 0.9)
    want = sorted_top_k(list(scores.values()), k)
    assert torch.equal(masks["a"], want[0]) and torch.equal(masks["c"], want[2])
    assert not want[1].any() and int(masks["b"].sum()) == 1  # the tiny layer gets its one random weight


def test_random_scores_are_the_generator_uniforms():
    model = torch.nn.Sequential(torch.nn.Linear(37, 11), torch.nn.Linear(11, 3))
    got = random_scores(model, 9)
    for name, w in model.named_parameters():
        if name.endswith("weight"):
            words = rng.words_np(9, rng.stream_id("freezepack.random-mask:" + name), 0, w.numel())
            assert torch.equal(got[name], torch.from_numpy(rng.uniform_np(words)).view(w.shape))


def test_generated_random_scores_give_the_stored_scores_mask(monkeypatch):
    monkeypatch.setattr(topk, "CHUNK", 101)
    model = torch.nn.Sequential(torch.nn.Linear(37, 51), torch.nn.Linear(51, 3))
    stored = global_mask(random_scores(model, 9), 0.9, seed=9)
    generated = global_mask(random_scores(model, 9, stored=False), 0.9, seed=9)
    assert stored.keys() == generated.keys()
    assert all(torch.equal(stored[n], generated[n]) for n in stored)


@pytest.mark.parametrize("collect", [topk.COLLECT_MAX, 0], ids=["two-pass", "three-pass"])
def test_generated_scores_mask_is_the_same_for_any_thread_count(monkeypatch, collect):
    """Generated scores are made inside each parallel task (one generator thread there): 1, 2, 4 threads give the
    definition's mask, which the stored scores give too."""
    monkeypatch.setattr(topk, "CHUNK", 64)  # dozens of chunks, so the pool really interleaves them
    monkeypatch.setattr(topk, "COLLECT_MAX", collect)
    model = torch.nn.Sequential(torch.nn.Linear(37, 51), torch.nn.Linear(51, 13), torch.nn.Linear(13, 3))
    stored = random_scores(model, 4)
    generated = random_scores(model, 4, stored=False)
    k = weights_to_train(sum(s.numel() for s in stored.values()), 0.8)
    want = sorted_top_k(list(stored.values()), k)
    for threads in (1, 2, 4):
        got = topk.top_k_masks(list(generated.values()), k, threads=threads)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), threads
