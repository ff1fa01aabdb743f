"""FreezeNet parametrization: frozen entries bit-exact through SGD, optimizer state ~ (1-q), records, FreezeNet-WD."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from freezepack import MethodError, UsageError
from freezepack.experiments.models import make_model
from freezepack.format.init import generate, make_init
from freezepack.method.freezenet import (
    apply_frozen_decay,
    dense_state_dict,
    freeze,
    freeze_record,
    init_weights,
    make_freezenet,
    parameter_count,
    rates,
    trainable_count,
    trainable_masks,
)
from freezepack.method.saliency import global_mask, random_scores

torch.set_num_threads(2)


class SmallNet(nn.Module):
    """Conv + BatchNorm + Linear: small, but has every kind of tensor a record must carry."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 6 * 6, 10))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def data(n=32, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def regenerated(name, shape, seed, init="xavier_normal"):
    return generate(make_init(init, shape), shape, seed, name)


def sgd_steps(model, n=5, frozen_decay=False, wd=1e-2, lr=0.1, momentum=0.9, size=8):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    for i in range(n):
        x, y = data(seed=i, size=size)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if frozen_decay:
            apply_frozen_decay(model, lr, wd, momentum)
    return opt


def frozen_small(q=0.9, seed=3):
    model = SmallNet()
    init_weights(model, seed)
    return freeze(model, global_mask(random_scores(model, seed), q, seed), seed)


def test_frozen_entries_stay_bit_identical_under_momentum_and_weight_decay():
    model = frozen_small()
    before = {k: v.clone() for k, v in dense_state_dict(model).items()}
    masks = trainable_masks(model)
    opt = sgd_steps(model)
    after = dense_state_dict(model)
    for name, mask in masks.items():
        regen = regenerated(name, mask.shape, 3)
        assert torch.equal(after[name][~mask], regen[~mask]), name  # bitwise, not approximately
        assert torch.equal(before[name], regen)                     # training started from the generator
        changed = after[name][mask] != before[name][mask]
        assert changed.float().mean() > 0.9, name                   # trainable entries did train
    # optimizer state exists only for the trainable numbers: values, biases, BatchNorm
    state = sum(s["momentum_buffer"].numel() for s in opt.state.values())
    k = sum(int(m.sum()) for m in masks.values())
    assert state == trainable_count(model) == k + 6 + 6 + 6 + 10
    assert all(p.numel() < 216 or p.ndim == 1 for p in model.parameters())  # no dense weight is a Parameter


def test_optimizer_state_scales_with_one_minus_q():
    x, y = torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    counts = {}
    for q in (0.9, 0.99):
        model = make_model("lenet5")
        init_weights(model, 0)
        freeze(model, global_mask(random_scores(model, 0), q, 0), 0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        counts[q] = sum(s["momentum_buffer"].numel() for s in opt.state.values())
    assert counts[0.9] == 43_050 + 580 and counts[0.99] == 4_305 + 580


def test_record_regenerates_the_model_bitwise_under_clean_names():
    model = frozen_small()
    sgd_steps(model, 3)
    model.eval()
    rec = freeze_record(model)
    dense = dense_state_dict(model)
    assert set(dense) == set(SmallNet().state_dict())  # the plain model's names
    assert set(rec.frozen) == {"conv.weight", "head.1.weight"}
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "conv.bias"} <= set(rec.whole)
    regen = rec.state_dict()
    assert set(regen) == set(dense)
    for k in dense:
        assert regen[k].dtype == dense[k].dtype and torch.equal(regen[k], dense[k]), k
    for name, ft in rec.frozen.items():
        assert torch.equal(ft.values, dense[name][ft.mask])  # values in row-major order
    # the plain model loaded from the record computes the same function
    plain = SmallNet().eval()
    plain.load_state_dict(regen)
    x, _ = data()
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_plain_module_record_is_all_whole():
    model = SmallNet()
    rec = freeze_record(model, seed=5)
    assert rec.frozen == {} and rec.seed == 5
    assert set(rec.whole) == set(model.state_dict())
    assert rates(model) == (0.0, 0.0)


def test_freezenet_wd_frozen_part_is_generator_times_one_scale():
    model = frozen_small()
    masks = trainable_masks(model)
    lr, wd, mom, n = 0.1, 0.05, 0.9, 6
    sgd_steps(model, n, frozen_decay=True, wd=wd, lr=lr, momentum=mom)
    rec = freeze_record(model)
    dense = dense_state_dict(model)
    # reference: plain SGD recursion on one frozen weight in float64
    s, b = 1.0, 0.0
    for _ in range(n):
        b = mom * b + wd * s
        s -= lr * b
    for name, mask in masks.items():
        scale = rec.frozen[name].frozen_scale
        assert scale == float(np.float32(s)) and scale < 0.95
        expect = regenerated(name, mask.shape, 3) * scale
        assert torch.equal(dense[name][~mask], expect[~mask]), name
    regen = rec.state_dict()
    assert all(torch.equal(regen[k], dense[k]) for k in dense)
    # a checkpoint (early stopping restores one) carries the scale into a fresh frozen model
    other = frozen_small()
    other.load_state_dict(model.state_dict())
    assert all(torch.equal(v, dense[k]) for k, v in dense_state_dict(other).items())


def test_snip_pruning_and_reinit():
    x, y = data(16, size=28)
    pruned = make_freezenet(make_model("lenet5"), (x, y), 0.9, 1, prune=True)
    for name, p in dense_state_dict(pruned).items():
        if name.endswith("weight"):
            mask = trainable_masks(pruned)[name]
            assert (p[~mask] == 0).all() and (p[mask] != 0).all()
    assert freeze_record(pruned).frozen["fc3.weight"].init.name == "zeros"
    re = make_freezenet(make_model("lenet5"), (x, y), 0.9, 1, reinit="pm_sigma")
    w = dense_state_dict(re)["fc3.weight"]
    sigma = make_init("pm_sigma", w.shape).a
    assert set(w.abs().unique().tolist()) == {sigma}
    assert freeze_record(re).frozen["fc3.weight"].init.name == "pm_sigma"


def test_make_freezenet_is_deterministic_and_counts_are_exact():
    x, y = data(16, size=28)
    # biases="zeros" (the paper's setup): the biases make_model draws from torch's RNG would change the scores
    a = make_freezenet(make_model("lenet5"), (x, y), 0.99, 4, biases="zeros")
    b = make_freezenet(make_model("lenet5"), (x, y), 0.99, 4, biases="zeros")
    ma, mb = trainable_masks(a), trainable_masks(b)
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
    assert 4305 <= sum(int(m.sum()) for m in ma.values()) <= 4305 + 4
    assert parameter_count(a) == 431_080
    q, q_beta = rates(a)
    assert round(q, 3) == 0.99 and round(q_beta, 3) == 0.989
    for method in ("grasp", "random"):
        m = make_freezenet(make_model("lenet5"), (x, y), 0.99, 4, method=method)
        assert not torch.equal(trainable_masks(m)["fc3.weight"], ma["fc3.weight"])


def test_bad_masks_and_seeds_are_clear_errors():
    model = SmallNet()
    with pytest.raises(MethodError, match="mask shape"):
        freeze(model, {"conv.weight": torch.ones(3, dtype=torch.bool)}, 0)
    with pytest.raises(MethodError, match="not a freezable tensor"):
        freeze(model, {"nosuch.weight": torch.ones(6, dtype=torch.bool)}, 0)
    with pytest.raises(MethodError, match="not a freezable tensor"):  # a buffer, not a parameter
        freeze(model, {"bn.num_batches_tracked": torch.ones((), dtype=torch.bool)}, 0)
    frozen = frozen_small(seed=3)
    with pytest.raises(MethodError, match="already frozen"):
        freeze(frozen, {"conv.weight": torch.ones(6, 1, 3, 3, dtype=torch.bool)}, 3)
    with pytest.raises(MethodError, match="already a FreezeNet"):
        make_freezenet(frozen, data(), 0.9, 3)
    with pytest.raises(UsageError, match="differs from the seed 3"):
        freeze_record(frozen, seed=4)
    with pytest.raises(UsageError, match="unknown mask method"):
        make_freezenet(SmallNet(), data(), 0.9, 0, method="magnitude")


def _cuda_roundtrip(device):
    model = frozen_small().to(device)
    sgd_steps_device(model, device)
    rec = freeze_record(model)
    regen = rec.state_dict(device=device)
    dense = dense_state_dict(model)
    for k in dense:
        assert torch.equal(regen[k], dense[k]), k
    return {k: v.cpu() for k, v in dense.items()}


def sgd_steps_device(model, device, n=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=1e-2)
    for i in range(n):
        x, y = data(seed=i)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
        opt.zero_grad()


def test_train_and_regenerate_on_cpu():
    dense = _cuda_roundtrip("cpu")
    masks = trainable_masks(frozen_small())
    for name, mask in masks.items():
        assert torch.equal(dense[name][~mask], regenerated(name, mask.shape, 3)[~mask])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU twin: test_train_and_regenerate_on_cpu)")
def test_train_and_regenerate_on_cuda():
    dense = _cuda_roundtrip("cuda")
    masks = trainable_masks(frozen_small())
    for name, mask in masks.items():  # frozen entries made on the GPU equal the CPU generator bit for bit
        assert torch.equal(dense[name][~mask], regenerated(name, mask.shape, 3)[~mask])
