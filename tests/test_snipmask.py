"""snipmask.snip_mask: SNIP's mask in one backward pass without a score per weight, equal to the full computation
(global_mask of snip_scores) bit for bit: on several architectures, with ties at the threshold, with scores that
normalisation merges, at any thread count, and through its fallback."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from freezepack.method import snipmask
from freezepack.method.freezenet import make_freezenet, trainable_masks
from freezepack.method.saliency import global_mask, normalise, snip_scores
from freezepack.testing.models import CASES


def reference(model, batch, q, seed=0, *, loss_fn=None, select=None, one_per_layer=True):
    return global_mask(snip_scores(model, batch, loss_fn=loss_fn, select=select), q, seed,
                       one_per_layer=one_per_layer)


def assert_same(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == torch.bool and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def light_only(monkeypatch):
    """Fail if snip_mask falls back to the full computation (so a test proves the one-pass path itself)."""
    def no_full(*a, **kw):
        raise AssertionError("took the full path")
    monkeypatch.setattr(snipmask, "snip_scores", no_full)


class AddedWeight(nn.Module):
    """A selected weight added to an activation of its shape: autograd hands both the same gradient tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)
        self.shift = nn.Parameter(torch.randn(10, 8))

    def forward(self, x):
        return self.b(torch.relu(self.a(x) + self.shift))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)), (
        torch.randn(16, 20, generator=torch.Generator().manual_seed(1)),
        torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("case", ["resnet", "lm", "bag"])
@pytest.mark.parametrize("q", [0.9, 0.97, 0.99])
def test_equals_full_computation(case, q, light_only):
    cls, data, loss_fn = CASES[case]  # convs with and without bias, BatchNorm, tied embeddings, MHA, EmbeddingBag
    torch.manual_seed(0)
    model, batch = cls(), data()
    want = reference(model, batch, q, 5, loss_fn=loss_fn)  # (the test module's snip_scores: not patched)
    assert_same(snipmask.snip_mask(model, batch, q, 5, loss_fn=loss_fn), want)


def _full(model, batch, loss_fn, select=None):
    """snip_scores' raw scores |g * w| (not yet normalised), computed the way it computes them."""
    from freezepack.method.saliency import _grad, _loss, _weights_for_scoring, scoring_mode

    weights = _weights_for_scoring(model, select)
    with scoring_mode(model):
        grads = _grad("t", _loss(model, batch, loss_fn, "t"), list(weights.values()))
    return {n: (g.mul(w.detach()).abs_() if g is not None else torch.zeros_like(w))
            for (n, w), g in zip(weights.items(), grads)}


def test_every_tensor_selected_and_an_aliased_gradient(light_only):
    torch.manual_seed(0)
    model = AddedWeight()
    batch = (torch.randn(10, 6), torch.randint(0, 4, (10,)))
    select = lambda name, t: True  # noqa: E731 - biases, the added weight: everything
    want = global_mask(normalise(_full(model, batch, None, select)), 0.875, 1)
    assert_same(snipmask.snip_mask(model, batch, 0.875, 1, select=select), want)
    assert_same(want, reference(model, batch, 0.875, 1, select=select))
    lm_cls, lm_data, lm_loss = CASES["lm"]
    torch.manual_seed(1)
    lm, tokens = lm_cls(), lm_data()
    want = global_mask(normalise(_full(lm, tokens, lm_loss, select)), 0.9, 2)
    assert_same(snipmask.snip_mask(lm, tokens, 0.9, 2, loss_fn=lm_loss, select=select), want)


def test_conv_layouts(light_only):
    """Conv, transposed conv and 1-d conv weights, also in channels_last (gradients in the weights' own layout)."""
    for channels_last in (False, True):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2),
                              nn.ReLU(), nn.Flatten(2), nn.Conv1d(6, 4, 5), nn.Flatten(), nn.LazyLinear(7))
        x = torch.randn(5, 3, 6, 6)
        model(x)  # materialise the lazy layer
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.to(memory_format=torch.channels_last)
            assert not model[0].weight.is_contiguous()
        batch = (x, torch.randint(0, 7, (5,)))
        assert_same(snipmask.snip_mask(model, batch, 0.95, 2), reference(model, batch, 0.95, 2))


def test_ties_at_the_threshold_go_by_position(light_only):
    """Equal weights and equal inputs: every score of a row is the same, so k cuts through tied scores."""
    model = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 30))
    with torch.no_grad():
        model[0].weight.fill_(0.05)
        model[1].weight.copy_(torch.eye(30) * 0.3 + 0.01)
    batch = (torch.ones(4, 40), torch.tensor([0, 1, 2, 0]))
    for q in (0.9, 0.95, 0.99):
        scores = _full(model, batch, None)
        assert scores["0.weight"].unique().numel() <= 30  # rows of equal scores
        masks = snipmask.snip_mask(model, batch, q, 0, one_per_layer=False)
        assert_same(masks, reference(model, batch, q, one_per_layer=False))
        if q == 0.9:  # k ends inside a row of 40 equal scores: the first ones by position are kept
            assert any(0 < int(r.sum()) < 40 for r in masks["0.weight"])


def _kept_select(raw: dict, q: float):
    """snipmask's reduction and selection fed these raw scores directly, tensor by tensor."""
    n = sum(s.numel() for s in raw.values())
    k = snipmask.weights_to_train(n, q)
    kept = snipmask._Kept(n, k)
    for name, s in reversed(list(raw.items())):  # backward order: last layer first
        kept.add(name, s.clone())
    return kept, snipmask._select(kept, {n: s for n, s in raw.items()}, k)


def test_scores_that_normalisation_merges():
    """Neighbouring floats just below 2 divided by a sum near 3: several become one float32, so the order among
    them is by position, not by raw value, exactly as in the full computation."""
    g = torch.Generator().manual_seed(3)
    near = torch.full((4000,), 2.0).nextafter(torch.zeros(1)) - torch.randint(0, 64, (4000,), generator=g) * 2.0**-23
    small = torch.rand(60000, generator=g) * 1e-6
    raw = {"a": torch.cat([small[:30000], near[:2000]]).view(-1, 16),
           "b": torch.cat([near[2000:], small[30000:]]).view(16, -1)}
    raw["c"] = torch.tensor([0.99e3 - float(sum(float(s.sum()) for s in raw.values()))]).abs()
    merged = (torch.cat([near]) / sum(float(s.sum()) for s in raw.values())).unique().numel()
    assert merged < torch.cat([near]).unique().numel()  # the case is real: division merged some
    for q in (0.95, 0.97, 0.99):
        kept, masks = _kept_select(raw, q)
        assert masks is not None and kept.bound > 0  # taken, and scores were dropped
        want = global_mask(normalise({n: s.clone() for n, s in raw.items()}), q, one_per_layer=False)
        assert_same(masks, want)


def test_refuses_when_dropped_scores_could_tie():
    """Scores that normalise to 0 (underflow) tie with dropped ones: the one-pass selection must say no."""
    raw = {"a": torch.cat([torch.tensor([1e30]), torch.logspace(-30, -25, 999)]), "b": torch.full((1000,), 1e-31)}
    kept, masks = _kept_select(raw, 0.99)
    assert kept.bound > 0 and masks is None


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_thread_counts(threads, light_only):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cls, data, loss_fn = CASES["lm"]
        torch.manual_seed(0)
        model, batch = cls(), data()
        want = global_mask(normalise(_full(model, batch, loss_fn)), 0.95, 3)
        assert_same(snipmask.snip_mask(model, batch, 0.95, 3, loss_fn=loss_fn), want)
    finally:
        torch.set_num_threads(before)


def test_without_compiled_kernels(monkeypatch, light_only):
    monkeypatch.setattr(snipmask.ans, "compiled", lambda: None)  # the histogram by torch.bincount instead
    cls, data, loss_fn = CASES["lm"]
    torch.manual_seed(2)
    model, batch = cls(), data()
    assert_same(snipmask.snip_mask(model, batch, 0.93, 3, loss_fn=loss_fn), reference(model, batch, 0.93, 3,
                                                                                     loss_fn=loss_fn))


def test_device_path_on_cpu(monkeypatch, light_only):
    """The torch-only path that scores on an accelerator take (bincount, nonzero, normalised on their device)."""
    monkeypatch.setattr(snipmask, "_on_host", lambda t: False)
    cls, data, loss_fn = CASES["resnet"]
    torch.manual_seed(4)
    model, batch = cls(), data()
    assert_same(snipmask.snip_mask(model, batch, 0.9, 3), reference(model, batch, 0.9, 3))
    raw = {"a": torch.rand(3000, generator=torch.Generator().manual_seed(5)), "b": torch.rand(900) * 3}
    kept, masks = _kept_select(raw, 0.99)
    assert kept.bound > 0 and kept.count < 3900
    assert_same(masks, global_mask(normalise({n: s.clone() for n, s in raw.items()}), 0.99, one_per_layer=False))


def test_gradients_are_left_as_they_were(light_only):
    model, batch = _mlp()
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    snipmask.snip_mask(model, batch, 0.99)
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")  # biases: not computed


def test_fallback_equals_full_computation(monkeypatch):
    """When the one-pass path gives up (here: told to), the full computation runs and the gradients are intact."""
    model, batch = _mlp()
    want = reference(model, batch, 0.97, 4)
    calls = []

    def give_up(self, name, s):
        calls.append(name)
        raise snipmask._FullPath

    monkeypatch.setattr(snipmask._Kept, "add", give_up)
    assert_same(snipmask.snip_mask(model, batch, 0.97, 4), want)
    assert calls and all(p.grad is None for p in model.parameters())


def test_low_q_takes_the_full_path(monkeypatch):
    model, batch = _mlp()
    monkeypatch.setattr(snipmask, "_light", lambda *a: pytest.fail("one-pass path at q = 0.5"))
    assert_same(snipmask.snip_mask(model, batch, 0.5, 1), reference(model, batch, 0.5, 1))


def test_make_freezenet_mask_unchanged(light_only):
    """make_freezenet (one-pass path) freezes with the mask the full computation chooses, wrapped or not."""
    from freezepack.method.freezenet import init_weights

    for wrap in (lambda m: m, nn.DataParallel):
        ref_model, batch = _mlp()
        init_weights(ref_model, 9, zero_biases=False)  # make_freezenet's first step (biases="keep")
        want = reference(ref_model, batch, 0.97, 9)
        model, _ = _mlp()
        make_freezenet(wrap(model), batch, 0.97, 9)
        assert_same(trainable_masks(model), want)
