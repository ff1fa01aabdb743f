"""Lossy values under attack: inputs a demanding user or a hostile file brings (review findings, each a test)."""
from __future__ import annotations

import copy

import pytest
import torch

import freezepack
from freezepack import UsageError
from freezepack.method.freezenet import dense_state_dict, frozen_parametrizations
from freezepack.method.quantize import quantize, quantize_model

from .test_any_model import trained


@pytest.fixture(scope="module")
def bag():
    return trained("bag", steps=10)[0]


def _first_values(model):
    name = next(iter(frozen_parametrizations(model)))
    mod, _, attr = name.rpartition(".")
    return model.get_submodule(mod).parametrizations[attr].original


@pytest.mark.parametrize("coding", ["kmeans:1", "kmeans:3", "kmeans:8"])
def test_kmeans_of_bfloat16_values(coding):
    v = (torch.randn(500, generator=torch.Generator().manual_seed(3)) * 0.1).bfloat16()
    q, _ = quantize(v, coding)  # was a TypeError: numpy has no bfloat16
    assert q.dtype == torch.bfloat16 and torch.unique(q).numel() <= 2 ** int(coding[-1])
    assert torch.equal(quantize(q, coding)[0], q)


@pytest.mark.parametrize("coding", ["bf16", "f16", "int8", "kmeans:3"])
def test_bfloat16_model_saves_with_every_coding(bag, coding, tmp_path):
    model = copy.deepcopy(bag).bfloat16()
    freezepack.save(tmp_path / "m.fpk", model, values=coding)
    want = copy.deepcopy(model)
    quantize_model(want, coding)
    sd, ref = freezepack.load(tmp_path / "m.fpk"), dense_state_dict(want)
    assert all(torch.equal(sd[k], ref[k]) for k in ref) and freezepack.verify(tmp_path / "m.fpk")["ok"]


def test_f16_overflow_is_refused_even_next_to_an_infinity():
    # one inf already there used to hide 1e6 -> inf
    with pytest.raises(UsageError):
        quantize(torch.tensor([float("inf"), 1e6, 0.5]), "f16")
    with pytest.raises(UsageError, match="f16 range"):
        quantize(torch.tensor([65520.0, 0.5]), "f16")
    assert quantize(torch.tensor([65519.0]), "f16")[0].item() == 65504.0
    with pytest.raises(UsageError, match="bf16 range"):
        quantize(torch.tensor([3.4e38, 0.5]), "bf16")


@pytest.mark.parametrize("coding", ["bf16", "f16", "int8", "kmeans:3"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_by_every_lossy_coding_and_nothing_is_written(bag, coding, bad, tmp_path):
    model = copy.deepcopy(bag)
    with torch.no_grad():
        _first_values(model).view(-1)[0] = bad
    with pytest.raises(UsageError, match="NaN or an infinity") as err:
        freezepack.save(tmp_path / "m.fpk", model, values=coding)
    assert err.value.tensor is not None
    assert not list(tmp_path.iterdir())
    freezepack.save(tmp_path / "m.fpk", model)  # lossless keeps what it is given
    assert freezepack.verify(tmp_path / "m.fpk")["ok"]
