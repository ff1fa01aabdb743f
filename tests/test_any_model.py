"""Any model, and a file that verifies is the model you trained (architectures the paper never used).

Each model is built here: a ResNet with BatchNorm, residual adds, depthwise, grouped and bias-free convs; a
transformer LM with tied input/output embeddings, LayerNorm and MultiheadAttention; an EmbeddingBag model. Each is
frozen, trained, saved from the plain model and from every wrapper, loaded into a fresh model (outputs bit-identical),
resumed from the file, and verified.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freezepack
from freezepack import FormatError, MethodError
from freezepack.method.freezenet import (
    FrozenParametrization,
    dense_state_dict,
    frozen_parametrizations,
    make_freezenet,
    trainable_masks,
)
from freezepack.testing.models import CASES, ResNet, TinyLM, inputs, lm_loss, loss, tokens, trained


def _same_outputs(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return torch.equal(ya, yb)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", [pytest.param("resnet", marks=pytest.mark.slow),
                                  pytest.param("lm", marks=pytest.mark.slow), "bag"])
def test_freeze_train_save_load_resume(case, tmp_path):
    model, batch = trained(case)
    x = inputs(case, batch)
    assert frozen_parametrizations(model), "something must be frozen"
    path = tmp_path / f"{case}.fpk"
    freezepack.save(path, model)
    assert freezepack.verify(path)["ok"]

    fresh = CASES[case][0]()
    freezepack.load_into(fresh, path)
    fresh.eval()
    assert _same_outputs(model, fresh, x)

    # resume: the file becomes a FreezeNet again, training continues, and unchanged it saves to the same bytes
    resumed = freezepack.load_freezenet(CASES[case][0](), path).eval()
    assert _same_outputs(model, resumed, x)
    again = tmp_path / "again.fpk"
    freezepack.save(again, resumed)
    assert again.read_bytes() == path.read_bytes()
    trainable = [p for p in resumed.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    assert n_train == sum(p.numel() for p in model.parameters())  # the same numbers are trainable
    opt = torch.optim.SGD(trainable, lr=0.05)
    resumed.train()
    before = loss(case, resumed, batch).item()
    for _ in range(20):
        opt.zero_grad()
        loss(case, resumed, batch).backward()
        opt.step()
    assert loss(case, resumed, batch).item() < before
    freezepack.save(tmp_path / "resumed.fpk", resumed)
    assert freezepack.verify(tmp_path / "resumed.fpk")["ok"]


def _wrappers(model):
    parent = nn.Module()
    parent.child = model
    return {
        "DataParallel": nn.DataParallel(model),
        "compile": torch.compile(model, backend="eager"),
        "DataParallel(compile)": nn.DataParallel(torch.compile(model, backend="eager")),
    }, {"Sequential": (nn.Sequential(model), "0."), "parent": (parent, "child.")}


@pytest.mark.parametrize("case", ["resnet", pytest.param("lm", marks=pytest.mark.slow), "bag"])
def test_wrappers_give_the_same_correct_file(case, tmp_path):
    model, batch = trained(case, steps=10)
    x = inputs(case, batch)
    plain = tmp_path / "plain.fpk"
    freezepack.save(plain, model)
    same, prefixed = _wrappers(model)
    for label, wrapped in same.items():
        p = tmp_path / f"{label}.fpk"
        freezepack.save(p, wrapped)
        assert p.read_bytes() == plain.read_bytes(), label
    for label, (wrapped, prefix) in prefixed.items():
        p = tmp_path / f"{label}.fpk"
        freezepack.save(p, wrapped)  # other names, same regenerated values: the streams travel with the tensors
        assert freezepack.verify(p)["ok"]
        fresh = CASES[case][0]()
        freezepack.load_into(fresh, p, prefix_map={prefix: ""})
        assert _same_outputs(model, fresh.eval(), x), label
    # loading into wrapped targets, and files saved from wrappers into plain ones
    dp = nn.DataParallel(CASES[case][0]())
    freezepack.load_into(dp, plain)
    assert _same_outputs(model, dp.module.eval(), x)


def test_freezing_a_child_and_saving_the_parent(tmp_path):
    model, batch = trained("resnet", steps=5)
    parent = nn.Sequential(nn.Identity(), model)
    freezepack.save(tmp_path / "p.fpk", parent)
    sd = freezepack.load(tmp_path / "p.fpk")
    for name, t in dense_state_dict(model).items():
        assert torch.equal(sd["1." + name], t), name
    info = freezepack.inspect(tmp_path / "p.fpk")
    streams = {r["name"]: r.get("stream") for r in info["tensors"] if r["kind"] == "frozen"}
    assert streams["1.stem.weight"] == "stem.weight"


def test_tied_weights_stay_tied_are_stored_once_and_retied(tmp_path):
    model, batch = trained("lm", steps=20)
    assert model.head.weight.shape == model.emb.weight.shape  # not corrupted into a vector
    assert model.head.parametrizations.weight.original is model.emb.parametrizations.weight.original
    path = tmp_path / "lm.fpk"
    freezepack.save(path, model)
    info = freezepack.inspect(path)
    kinds = {r["name"]: r["kind"] for r in info["tensors"]}
    assert kinds["emb.weight"] == "frozen" and kinds["head.weight"] == "alias"
    sd = freezepack.load(path)
    assert sd["head.weight"] is sd["emb.weight"]
    untied = TinyLM()
    untied.head.weight = nn.Parameter(untied.emb.weight.detach().clone())  # a target that is not tied
    freezepack.load_into(untied, path)
    assert untied.head.weight is untied.emb.weight
    assert _same_outputs(model, untied.eval(), batch[:, :-1])


def test_attention_and_embedding_weights_are_frozen_norms_and_biases_not():
    model, _ = trained("lm", steps=1)
    frozen = set(frozen_parametrizations(model))
    assert {"emb.weight", "head.weight", "attn.in_proj_weight", "attn.out_proj.weight", "ff.0.weight",
            "ff.2.weight"} == frozen
    names = {n for n, _ in model.named_parameters()}
    assert "ln1.weight" in names and "ff.0.bias" in names and "pos" in names


@pytest.mark.parametrize("select,expected", [
    (["ff.*.weight"], {"ff.0.weight", "ff.2.weight"}),
    ("re:attn\\..*weight", {"attn.in_proj_weight", "attn.out_proj.weight"}),
    (lambda name, t: t.dim() == 2 and name.startswith("ff"), {"ff.0.weight", "ff.2.weight"}),
    (["pos"], {"pos"}),
])
def test_user_selectors(select, expected):
    model = TinyLM()
    make_freezenet(model, tokens(), q=0.5, seed=1, loss_fn=lm_loss, select=select)
    assert set(frozen_parametrizations(model)) == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_round_trip_exactly(dtype, tmp_path):
    model, batch = trained("resnet", steps=5)
    model = model.to(dtype)
    x = batch[0].to(dtype)
    path = tmp_path / "half.fpk"
    freezepack.save(path, model)
    info = freezepack.inspect(path)
    assert {r["dtype"] for r in info["tensors"] if r["kind"] == "frozen"} == {
        {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]}
    sd = freezepack.load(path)
    for name, t in dense_state_dict(model).items():
        assert sd[name].dtype == t.dtype and torch.equal(sd[name], t), name
    fresh = ResNet().to(dtype).eval()
    freezepack.load_into(fresh, path)
    assert _same_outputs(model, fresh, x)
    resumed = freezepack.load_freezenet(ResNet().to(dtype), path).eval()
    assert _same_outputs(model, resumed, x)


def test_save_refuses_a_model_whose_memory_differs_from_the_file(tmp_path):
    model, _ = trained("resnet", steps=2)
    p = frozen_parametrizations(model)["blocks.0.pw.weight"]
    with torch.no_grad():
        p.frozen.view(-1)[3] += 1.0  # the frozen part no longer is what seed + init + stream regenerate
    with pytest.raises(MethodError, match="would not reproduce the model") as err:
        freezepack.save(tmp_path / "x.fpk", model)
    assert err.value.tensor == "blocks.0.pw.weight"
    assert not (tmp_path / "x.fpk").exists()
    assert not list(tmp_path.iterdir())  # no temp file left either


def test_wrong_stream_is_refused_not_saved(tmp_path):
    model, _ = trained("resnet", steps=2)
    frozen_parametrizations(model)["stem.weight"].stream = "something.else"  # a lie about the origin
    with pytest.raises(MethodError, match="would not reproduce"):
        freezepack.save(tmp_path / "x.fpk", model)


def test_scoring_failures_name_the_step():
    with pytest.raises(MethodError, match="SNIP scoring: computing the loss failed.*loss_fn"):
        make_freezenet(TinyLM(), tokens(), q=0.5, seed=0)  # the default loss wants (inputs, labels)
    with pytest.raises(MethodError, match="scalar"):
        make_freezenet(TinyLM(), tokens(), q=0.5, seed=0, loss_fn=lambda m, b: m(b))
    with pytest.raises(MethodError, match="not finite"):
        make_freezenet(TinyLM(), tokens(), q=0.5, seed=0, loss_fn=lambda m, b: lm_loss(m, b) * float("nan"))


def test_dict_batches_and_tuple_outputs_score_with_loss_fn():
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x), {"aux": x.sum()}

    batch = {"x": torch.randn(8, 4), "y": torch.randint(0, 3, (8,))}
    model = make_freezenet(TupleOut(), batch, q=0.5, seed=0,
                           loss_fn=lambda m, b: F.cross_entropy(m(b["x"])[0], b["y"]))
    assert int(trainable_masks(model)["fc.weight"].sum()) == 6


def test_state_dict_round_trips(tmp_path):
    model, batch = trained("lm", steps=5)
    sd = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())  # tensors only: safetensors/weights_only safe
    torch.save(sd, tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    torch.manual_seed(0)  # the same model as trained() built (make_freezenet keeps its biases as made)
    twin = TinyLM()
    make_freezenet(twin, tokens(), q=0.8, seed=7, loss_fn=lm_loss)
    twin.load_state_dict(loaded)
    assert _same_outputs(model, twin.eval(), batch[:, :-1])
    freezepack.save(tmp_path / "a.fpk", model)
    freezepack.save(tmp_path / "b.fpk", twin)
    assert (tmp_path / "a.fpk").read_bytes() == (tmp_path / "b.fpk").read_bytes()


def test_load_freezenet_refuses_a_model_that_does_not_fit(tmp_path):
    model, _ = trained("resnet", steps=1)
    freezepack.save(tmp_path / "r.fpk", model)
    with pytest.raises(FormatError, match="does not fit"):
        freezepack.load_freezenet(TinyLM(), tmp_path / "r.fpk")


def test_compile_and_export_of_a_freezenet_forward():
    model, batch = trained("resnet", steps=2)
    x = batch[0][:4]
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="aot_eager")(x)
    assert torch.equal(got, want)  # aot_eager runs the same aten kernels: exact, not close
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(exported.module()(x), want)


@pytest.mark.slow
def test_compile_inductor_of_a_freezenet_forward():
    model, batch = trained("resnet", steps=2)
    x = batch[0][:4]
    with torch.no_grad():
        got, want = torch.compile(model)(x), model(x)
    # inductor fuses and reorders float32 sums: a bound relative to the outputs' magnitude, far above reordering
    # error (~depth * fan-in * 2^-24) and far below what a wrong frozen weight would give (O(1) of the scale)
    assert float((got - want).abs().max()) <= 1e-3 * float(want.abs().max())


@pytest.mark.parametrize("trial", [*range(3), *(pytest.param(t, marks=pytest.mark.slow) for t in range(3, 16))])
def test_property_random_wrappers_prefixes_renames_reproduce_or_refuse(trial, tmp_path):
    """For random wrappers, prefixes and renames: the file reproduces the model in memory bit for bit, or save
    refuses. No third outcome."""
    rnd = random.Random(trial)
    case = rnd.choice(["resnet", "bag"])
    model, batch = trained(case, steps=3, seed=rnd.randrange(1 << 32))
    net = model
    for _ in range(rnd.randrange(4)):
        kind = rnd.choice(["seq", "parent", "dp", "compile"])
        if kind == "seq":
            net = nn.Sequential(*([nn.Identity()] * rnd.randrange(2)), net)
        elif kind == "parent":
            parent = nn.Module()
            parent.add_module(rnd.choice(["a", "enc", "x_y"]), net)
            net = parent
        elif kind == "dp":
            net = nn.DataParallel(net)
        elif not hasattr(net, "_orig_mod"):  # compiling a compiled module gives a function, not a module
            net = torch.compile(net, backend="eager")
    tamper = rnd.random() < 0.3
    if tamper:  # change one *frozen* entry (a trainable position's frozen value is never used)
        p = rnd.choice(list(frozen_parametrizations(model).values()))
        frozen_at = (~p.mask).reshape(-1).nonzero().squeeze(1)
        with torch.no_grad():
            p.frozen.view(-1)[int(frozen_at[rnd.randrange(frozen_at.numel())])] += 1.0
    path = tmp_path / "x.fpk"
    try:
        freezepack.save(path, net)
    except MethodError:
        assert tamper and not path.exists()
        return
    assert not tamper
    from freezepack.method.freezenet import unwrap
    truth = dense_state_dict(unwrap(net))
    sd = freezepack.load(path)
    assert set(sd) == set(truth)
    for k, t in truth.items():
        assert torch.equal(sd[k], t), k
    assert isinstance(next(iter(frozen_parametrizations(model).values())), FrozenParametrization)
