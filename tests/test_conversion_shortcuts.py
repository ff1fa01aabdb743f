"""convert's shortcuts change its cost, never its output: the whole-tensor size floor is below every real whole
encoding, and files converted with and without the shortcuts are byte-identical, for any thread count."""
import pytest
import torch
from safetensors.torch import save_file

import freezepack
from freezepack import conversion
from freezepack.api import encode_record
from freezepack.format.record import FreezeRecord
from freezepack.testing import record_for


def _tensors():
    g = torch.Generator().manual_seed(3)
    n = 70_000
    sparse = torch.zeros(n)
    sparse[torch.randint(0, n, (n // 100,), generator=g)] = torch.randn(n // 100, generator=g)
    return {
        "gauss": torch.randn(n, generator=g),
        "constant": torch.full((n,), 0.25),
        "two": torch.where(torch.rand(n, generator=g) < 0.3, 1.0, -2.0),
        "ints": torch.randint(-40, 40, (n,), generator=g).float(),
        "bf16-exact": torch.randn(n, generator=g).to(torch.bfloat16).float(),
        "f16": torch.randn(n, generator=g).to(torch.float16),
        "bf16": torch.randn(n, generator=g).to(torch.bfloat16),
        "sparse": sparse,
        "tiny-range": 1 + torch.rand(n, generator=g) * 1e-6,
        "small": torch.randn(37, generator=g),
    }


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name", list(_tensors()))
def test_whole_bytes_floor_is_below_the_real_whole_encoding(name, version):
    t = _tensors()[name]
    real = sum(map(len, encode_record(FreezeRecord(seed=1, whole={"x": t}), version=version)))
    assert conversion._whole_bytes_floor(t) <= real


def test_convert_with_and_without_shortcuts_gives_the_same_bytes(tmp_path, monkeypatch):
    """Shortcut on (floor, sampled scale vote, threads) vs everything encoded and voted in full on one thread."""
    rec = record_for({"a.weight": (300, 200), "b.weight": (64, 64), "c.weight": (120, 30)}, 0.9, seed=6)
    rec.frozen["c.weight"].frozen_scale = 0.625
    sd = rec.state_dict()
    sd["norm.weight"] = torch.ones(200)
    sd["whole.weight"] = torch.randn(50, 40)  # nothing matches: stored whole
    save_file(sd, str(tmp_path / "m.safetensors"))
    fast = [freezepack.convert(tmp_path / "m.safetensors", tmp_path / f"fast{k}.fpk", seed=6, threads=k)
            for k in (1, 2, 4)]
    monkeypatch.setattr(conversion, "_whole_bytes_floor", lambda t: float("-inf"))
    monkeypatch.setattr(conversion, "_SCALE_SAMPLE", 1 << 40)
    full = freezepack.convert(tmp_path / "m.safetensors", tmp_path / "full.fpk", seed=6, threads=1)
    want = (tmp_path / "full.fpk").read_bytes()
    for k in (1, 2, 4):
        assert (tmp_path / f"fast{k}.fpk").read_bytes() == want, k
    assert all(f["tensors"] == full["tensors"] for f in fast)
    rows = {r["name"]: r for r in full["tensors"]}
    assert rows["c.weight"]["frozen_scale"] == 0.625 and rows["whole.weight"]["stored_as"] == "whole"
