"""Saliency and threshold against independent computations; exact trainable counts; one-per-layer; q and q_beta."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from freezepack import MethodError, UsageError
from freezepack.experiments.models import count_parameters, make_model
from freezepack.method.saliency import (
    freezing_rates,
    global_mask,
    grasp_scores,
    prunable_weights,
    random_scores,
    snip_scores,
    weights_to_train,
)


def tiny_mlp(dtype=torch.float64):
    torch.manual_seed(0)  # test fixture only; the library never uses torch's RNG for weights
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(dtype)


def batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 4, generator=g, dtype=dtype), torch.tensor([0, 1, 1, 0, 1])


def manual_grads(model, x, y):
    """Backpropagation written out in numpy (paper eq. 2) for Linear-ReLU-Linear + mean cross-entropy."""
    W1, b1 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    W2, b2 = model[2].weight.detach().numpy(), model[2].bias.detach().numpy()
    x, y = x.numpy(), y.numpy()
    y1 = x @ W1.T + b1
    x1 = np.maximum(y1, 0)
    z = x1 @ W2.T + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = p.copy()
    dz[np.arange(len(y)), y] -= 1
    dz /= len(y)
    dW2 = dz.T @ x1
    dy1 = (dz @ W2) * (y1 > 0)
    dW1 = dy1.T @ x
    return {"0.weight": dW1, "2.weight": dW2}


def test_snip_matches_hand_backprop():
    model = tiny_mlp()
    x, y = batch()
    scores = snip_scores(model, x, y)
    grads = manual_grads(model, x, y)
    raw = {n: np.abs(grads[n] * w.detach().numpy()) for n, w in prunable_weights(model).items()}
    total = sum(r.sum() for r in raw.values())
    assert set(scores) == {"0.weight", "2.weight"}
    for n in raw:
        np.testing.assert_allclose(scores[n].numpy(), raw[n] / total, rtol=1e-10, atol=1e-14)
    assert abs(sum(float(s.sum()) for s in scores.values()) - 1.0) < 1e-12


def test_grasp_matches_finite_difference_hessian_gradient_product():
    model = tiny_mlp()
    x, y = batch()
    T = 3.0
    scores = grasp_scores(model, x, y, temperature=T)
    weights = prunable_weights(model)

    def grad_at(shift):
        with torch.no_grad():
            for n, w in weights.items():
                w.add_(shift[n])
        loss = nn.functional.cross_entropy(model(x) / T, y)
        g = torch.autograd.grad(loss, list(weights.values()))
        with torch.no_grad():
            for n, w in weights.items():
                w.sub_(shift[n])
        return dict(zip(weights, g))

    g0 = grad_at({n: torch.zeros_like(w) for n, w in weights.items()})
    eps = 1e-6
    gp = grad_at({n: eps * g0[n] for n in weights})
    gm = grad_at({n: -eps * g0[n] for n in weights})
    for n, w in weights.items():
        hg = (gp[n] - gm[n]) / (2 * eps)
        np.testing.assert_allclose(scores[n].numpy(), (w.detach() * hg).numpy(), rtol=1e-5, atol=1e-9)


def test_threshold_keeps_exactly_the_top_scores():
    g = torch.Generator().manual_seed(5)
    scores = {"a.weight": torch.rand(7, 9, generator=g), "b.weight": torch.rand(30, generator=g)}
    for q in (0.0, 0.5, 0.9, 0.97, 1.0):
        masks = global_mask(scores, q, one_per_layer=False)
        k = int(np.floor((1 - q) * 93 + 1e-9))
        assert sum(int(m.sum()) for m in masks.values()) == k
        allv = torch.cat([s.reshape(-1) for s in scores.values()])
        kept = torch.cat([s[m] for s, m in zip(scores.values(), masks.values())])
        if 0 < k < 93:  # every kept score beats every dropped one: one global threshold
            dropped = allv[~torch.cat([m.reshape(-1) for m in masks.values()])]
            assert kept.min() > dropped.max()


def test_trainable_count_uses_the_decimal_q():
    assert weights_to_train(430_500, 0.99) == 4305
    assert weights_to_train(430_500, 0.995) == 2152
    assert weights_to_train(100, 0.07) == 93      # float 1-0.07 = 0.9299999999999999 would floor to 92
    for bad in (-0.1, 1.5, "0.9", True):
        with pytest.raises(UsageError):
            weights_to_train(10, bad)


def test_ties_break_by_position_deterministically():
    scores = {"a.weight": torch.ones(10), "b.weight": torch.ones(10)}
    masks = global_mask(scores, 0.75, one_per_layer=False)
    assert masks["a.weight"].tolist() == [True] * 5 + [False] * 5
    assert not masks["b.weight"].any()


def test_one_per_layer_rule():
    scores = {"a.weight": torch.full((4, 5), 10.0), "b.weight": torch.full((6,), 1e-9),
              "c.weight": torch.full((3, 3), 5.0)}
    masks = global_mask(scores, 0.9, seed=11)  # k = floor(0.1 * 35) = 3, all from a.weight
    assert int(masks["a.weight"].sum()) == 3
    assert int(masks["b.weight"].sum()) == 1 and int(masks["c.weight"].sum()) == 1
    again = global_mask(scores, 0.9, seed=11)
    assert all(torch.equal(masks[n], again[n]) for n in masks)
    picks = {int(global_mask(scores, 0.9, seed=s)["b.weight"].nonzero()[0, 0]) for s in range(12)}
    assert len(picks) > 1  # the flagged entry is random (by seed), not always the first
    assert int(global_mask(scores, 0.9, seed=11, one_per_layer=False)["b.weight"].sum()) == 0


def test_random_scores_are_seeded():
    model = make_model("lenet300")
    a, b, c = random_scores(model, 1), random_scores(model, 1), random_scores(model, 2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])


@pytest.mark.parametrize("q,q_beta", [(0.9, 0.899), (0.99, 0.989), (0.995, 0.994), (0.999, 0.998)])
def test_lenet5_real_freezing_rate_matches_paper_table2(q, q_beta):
    model = make_model("lenet5")
    masks = global_mask(random_scores(model, 0), q, seed=0)
    q_real, q_b = freezing_rates(masks, count_parameters(model))
    assert round(q_real, 3) == q and round(q_b, 3) == q_beta
    k = weights_to_train(430_500, q)
    # exactly k by the threshold, plus at most one per layer left empty (4 layers, paper sect. 4)
    assert k <= sum(int(m.sum()) for m in masks.values()) <= k + 4
    masks = global_mask(random_scores(model, 0), q, seed=0, one_per_layer=False)
    assert sum(int(m.sum()) for m in masks.values()) == k


def test_scoring_a_model_without_weights_is_an_error():
    with pytest.raises(MethodError, match="no tensor to freeze"):
        snip_scores(nn.Sequential(nn.ReLU()), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
