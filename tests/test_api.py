"""save -> load is bit-exact for the paper's models at every freezing rate; load_into, open, verify, inspect,
convert."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import freezepack
from freezepack import api
from freezepack.errors import FormatError, IntegrityError, UsageError
from freezepack.experiments import models
from freezepack.format.init import make_init
from freezepack.testing import random_mask, record_for, rewrite, small_record

QS = [0.0, 0.9, 0.99, 0.999, 1.0]


def _shapes(name):
    return {k: tuple(v.shape) for k, v in models.make_model(name).state_dict().items()}


def _assert_bitwise_equal(got: dict, want: dict):
    assert list(got) == list(want) or set(got) == set(want)
    for k, v in want.items():
        g = got[k].cpu()
        assert g.dtype == v.dtype and g.shape == v.shape, k
        assert bytes(api.tensor_bytes(g)) == bytes(api.tensor_bytes(v.cpu())), k  # bitwise, -0.0 and NaN included


@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
@pytest.mark.parametrize("q", QS)
def test_roundtrip_lenets(tmp_path, model, q):
    rec = record_for(_shapes(model), q)
    p = tmp_path / "m.fpk"
    freezepack.save(p, rec)
    _assert_bitwise_equal(freezepack.load(p), rec.state_dict())
    info = freezepack.inspect(p)
    frozen = [t for t in info["tensors"] if t["kind"] == "frozen"]
    assert abs(info["q"] - q) < 1e-3 and all(abs(t["q"] - q) < 2e-3 for t in frozen)


@pytest.mark.slow
@pytest.mark.parametrize("q", QS)
def test_roundtrip_vgg16(tmp_path, q):
    sd = models.make_model("vgg16").state_dict()
    rec = record_for({k: tuple(v.shape) for k, v in sd.items() if v.dtype == torch.float32}, q,
                     init="kaiming_uniform")
    rec.whole.update({k: v for k, v in sd.items() if v.dtype != torch.float32})  # num_batches_tracked (I64)
    p = tmp_path / "vgg.fpk"
    freezepack.save(p, rec)
    _assert_bitwise_equal(freezepack.load(p, verify=q in (0.99, 1.0)), rec.state_dict())
    if q == 0.99:
        assert freezepack.inspect(p)["compression_factor"] > 50  # the storage claim at q = 0.99, masks included


def test_frozen_scale_roundtrip(tmp_path):
    rec = record_for({"w": (64, 32), "v": (10, 10, 3, 3)}, 0.9, frozen_scale=0.375)
    rec.frozen["v"].frozen_scale = float(torch.tensor(0.8123, dtype=torch.float32))
    freezepack.save(tmp_path / "wd.fpk", rec)
    got = freezepack.load(tmp_path / "wd.fpk")
    _assert_bitwise_equal(got, rec.state_dict())
    assert not torch.equal(got["w"], record_for({"w": (64, 32)}, 0.9).state_dict()["w"])


def test_metadata_and_lazy_open(tmp_path):
    rec = small_record()
    p = tmp_path / "m.fpk"
    freezepack.save(p, rec, metadata={"arch": "lenet5", "dataset": "mnist"})
    with freezepack.open(p) as f:
        assert f.keys() == list(rec.frozen) + list(rec.whole)
        assert f.metadata() == {"arch": "lenet5", "dataset": "mnist"}
        assert f.seed == rec.seed
        assert torch.equal(f.get_tensor("fc.weight"), rec.state_dict()["fc.weight"])
        with pytest.raises(KeyError):
            f.get_tensor("nope")
        assert "fc.bias" in f and len(f) == len(list(f)) == 7
    with pytest.raises(UsageError, match="metadata"):
        freezepack.save(p, rec, metadata={"n": 1})


def test_load_into_plain_module(tmp_path):
    model = models.make_model("lenet5")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rec = record_for(shapes, 0.99)
    p = tmp_path / "m.fpk"
    freezepack.save(p, rec)
    fresh = models.make_model("lenet5")
    storage = fresh.conv1.weight.data_ptr()
    result = freezepack.load_into(fresh, p)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert fresh.conv1.weight.data_ptr() == storage  # regenerated in place, no second copy
    _assert_bitwise_equal(fresh.state_dict(), rec.state_dict())
    with pytest.raises(FormatError, match="does not fit"):
        freezepack.load_into(models.make_model("lenet300"), p)


def test_save_a_frozen_module(tmp_path):
    from freezepack.method import freezenet

    model = models.make_model("lenet300")
    g = torch.Generator().manual_seed(0)
    masks = {k: random_mask(tuple(v.shape), 0.95, g) for k, v in model.state_dict().items() if v.dim() == 2}
    freezenet.init_weights(model, seed=5)
    freezenet.freeze(model, masks, seed=5)
    p = tmp_path / "m.fpk"
    freezepack.save(p, model)
    want = freezenet.dense_state_dict(model)
    got = freezepack.load(p)
    assert list(got) == list(want)
    _assert_bitwise_equal(got, {k: v.detach() for k, v in want.items()})


def test_verify_reports_each_tensor(tmp_path):
    p = tmp_path / "m.fpk"
    freezepack.save(p, small_record(), version=1)  # edited as v1 JSON below
    report = freezepack.verify(p)
    assert report["ok"] and report["checked"] == 7 and report["failed"] == 0

    def lie(h):  # a consistent file whose dense digest is wrong: regeneration cannot match it
        t = next(t for t in h["tensors"] if t["name"] == "conv.weight")
        t["sha256"] = "ab" * 32

    p.write_bytes(rewrite(p.read_bytes(), lie))
    report = freezepack.verify(p)
    assert not report["ok"] and report["failed"] == 1
    bad = [t for t in report["tensors"] if not t["ok"]]
    assert bad[0]["name"] == "conv.weight" and "bit-exact" in bad[0]["error"]
    with pytest.raises(IntegrityError, match="conv.weight"):
        freezepack.load(p)
    assert freezepack.load(p, verify=False)["fc.bias"].shape == (10,)


def test_inspect_reports_sizes(tmp_path):
    p = tmp_path / "m.fpk"
    rec = record_for(_shapes("lenet300"), 0.99)
    freezepack.save(p, rec)
    info = freezepack.inspect(p)
    assert info["file_bytes"] == p.stat().st_size and info["seed"] == rec.seed
    assert info["dense_bytes"] == 266_610 * 4
    assert info["compression_factor"] == pytest.approx(info["dense_bytes"] / info["file_bytes"])
    fc1 = next(t for t in info["tensors"] if t["name"] == "fc1.weight")
    assert fc1["coder"] in ("ans-gaps", "ans-bernoulli", "ans-ctx")
    assert fc1["values_bytes"] <= 4 * int(rec.frozen["fc1.weight"].mask.sum())  # v2 codes values losslessly
    assert fc1["mask_bytes"] <= 1.01 * fc1["mask_entropy_bytes"] + 16


def _trained_checkpoint(seed=3):
    """A dense state_dict as a user's training would leave it: init values, some trained, one layer pruned."""
    shapes = _shapes("lenet300")
    g = torch.Generator().manual_seed(1)
    sd, expect = {}, {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            init = make_init("xavier_normal", shape)
            w = freezepack.format.init.generate(init, shape, seed, name)
            m = random_mask(shape, 0.95, g)
            if name == "fc2.weight":
                w = torch.zeros(shape)  # pruned
            w[m] = torch.randn(int(m.sum()), generator=g)
            sd[name] = w
            expect[name] = ("pruned" if name == "fc2.weight" else "frozen", int(m.sum()))
        else:
            sd[name] = torch.randn(shape, generator=g)
            expect[name] = ("whole", shape[0])
    return sd, expect


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_convert_finds_frozen_pruned_and_trained(tmp_path, ext):
    sd, expect = _trained_checkpoint()
    src = tmp_path / f"dense{ext}"
    if ext == ".pt":
        torch.save(sd, src)
    else:
        save_file(sd, str(src))
    report = freezepack.convert(src, tmp_path / "c.fpk", seed=3)
    found = {r["name"]: (r["stored_as"], r["trainable"]) for r in report["tensors"]}
    assert found == expect
    _assert_bitwise_equal(freezepack.load(tmp_path / "c.fpk"), sd)
    assert report["compression_factor"] > 10
    # wrong seed: nothing matches the regenerated values, so weights are stored whole, and the file is still exact
    report = freezepack.convert(src, tmp_path / "w.fpk", seed=4)
    assert {r["stored_as"] for r in report["tensors"]} <= {"whole", "pruned"}
    _assert_bitwise_equal(freezepack.load(tmp_path / "w.fpk"), sd)


def test_convert_finds_freezenet_wd_scale(tmp_path):
    rec = record_for({"a.weight": (60, 70), "b.weight": (30, 20)}, 0.97, seed=8, frozen_scale=0.375)
    rec.frozen["b.weight"].frozen_scale = float(torch.tensor(0.0123, dtype=torch.float32))
    sd = rec.state_dict()
    save_file(sd, str(tmp_path / "wd.safetensors"))
    report = freezepack.convert(tmp_path / "wd.safetensors", tmp_path / "wd.fpk", seed=8)
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["a.weight"]["frozen_scale"] == 0.375 and rows["a.weight"]["trainable"] == round(0.03 * 4200)
    assert rows["b.weight"]["frozen_scale"] == rec.frozen["b.weight"].frozen_scale
    _assert_bitwise_equal(freezepack.load(tmp_path / "wd.fpk"), sd)


def test_convert_finds_the_wd_scale_of_a_tensor_larger_than_the_vote_sample(tmp_path, monkeypatch):
    """The factor is voted on a strided sample (no sort of the whole tensor), then checked on every entry."""
    from freezepack import conversion

    monkeypatch.setattr(conversion, "_SCALE_SAMPLE", 1000)  # 200x300: every 60th entry votes
    rec = record_for({"big.weight": (200, 300)}, 0.9, seed=4, frozen_scale=0.8125)
    sd = rec.state_dict()
    save_file(sd, str(tmp_path / "wd.safetensors"))
    report = freezepack.convert(tmp_path / "wd.safetensors", tmp_path / "wd.fpk", seed=4)
    row = report["tensors"][0]
    assert row["frozen_scale"] == 0.8125 and row["trainable"] == int(rec.frozen["big.weight"].mask.sum())
    _assert_bitwise_equal(freezepack.load(tmp_path / "wd.fpk"), sd)


def test_convert_refuses_pickles_and_junk(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match="weights-only"):
        freezepack.convert(tmp_path / "evil.pt", tmp_path / "o.fpk", seed=1)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(FormatError):
        freezepack.convert(tmp_path / "junk.safetensors", tmp_path / "o.fpk", seed=1)
    assert not (tmp_path / "o.fpk").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU twin is test_roundtrip_lenets)")
def test_load_on_cuda_matches_cpu(tmp_path):
    rec = record_for(_shapes("lenet5"), 0.99)
    p = tmp_path / "m.fpk"
    freezepack.save(p, rec)
    got = freezepack.load(p, device="cuda")
    assert all(t.device.type == "cuda" for t in got.values())
    _assert_bitwise_equal(got, rec.state_dict())
    assert freezepack.verify(p, device="cuda")["ok"]
