"""The paths users take from their ecosystem without transformers: safetensors' safe_open, unpack of tied models,
Conv1D-like layers, dropout while scoring, NaN refusal."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import safetensors
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, load_model, save_file
from torch import nn

import freezepack
from freezepack.cli import cli
from freezepack.errors import MethodError, UsageError
from freezepack.method.freezenet import FrozenShareWarning, make_freezenet, rates, trainable_masks
from freezepack.testing import small_record


class TransposedLinear(nn.Module):
    """transformers' Conv1D without transformers: a Linear whose weight is stored (in, out)."""

    def __init__(self, nin, nout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nin, nout) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nout))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=16, tied=True, p=0.2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ff = TransposedLinear(d, 4 * d)
        self.out_proj = TransposedLinear(4 * d, d)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(self.drop(h + self.out_proj(torch.relu(self.ff(h)))))


def lm_loss(m, b):
    return F.cross_entropy(m(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())


TOKENS = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))


def frozen_lm(q=0.9, steps=0, **kw):
    torch.manual_seed(0)
    model = make_freezenet(TinyLM(**kw), TOKENS, q, 5, loss_fn=lm_loss)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        lm_loss(model, TOKENS).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_matrix_weight_layers_are_frozen_by_default():
    model = frozen_lm()
    assert {"ff.weight", "out_proj.weight", "emb.weight"} <= set(trainable_masks(model))
    assert rates(model)[1] > 0.85


def test_warns_when_the_frozen_share_is_far_from_q():
    with pytest.warns(FrozenShareWarning, match=r"ff\.weight"):
        make_freezenet(TinyLM(), TOKENS, 0.9, 5, loss_fn=lm_loss, select=["emb.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenShareWarning)
        frozen_lm()


def test_scoring_ignores_dropout_and_restores_each_modules_mode():
    masks = []
    for s in (1, 2):
        model = TinyLM(p=0.5)
        model.ff.eval()  # a user's own mix of modes survives scoring
        torch.manual_seed(s)
        make_freezenet(model, TOKENS, 0.9, 5, loss_fn=lm_loss)
        assert model.training and model.drop.training and not model.ff.training
        masks.append(trainable_masks(model))
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_save_refuses_nonfinite_trained_values_unless_asked(tmp_path):
    model = frozen_lm()
    with torch.no_grad():
        model.ff.bias[3] = float("nan")
    with pytest.raises(MethodError, match=r"ff\.bias.*NaN or infinite.*allow_nonfinite"):
        freezepack.save(tmp_path / "m.fpk", model)
    assert not (tmp_path / "m.fpk").exists()
    freezepack.save(tmp_path / "m.fpk", model, allow_nonfinite=True)
    assert torch.isnan(freezepack.load(tmp_path / "m.fpk")["ff.bias"][3])
    model = frozen_lm()
    with torch.no_grad():
        model.emb.parametrizations.weight.original[0] = float("inf")
    with pytest.raises(MethodError, match="emb.weight"):
        freezepack.save(tmp_path / "m2.fpk", model)


def test_unpack_stores_tied_tensors_once_and_names_them(tmp_path):
    model = frozen_lm()
    freezepack.save(tmp_path / "m.fpk", model)
    r = CliRunner().invoke(cli, ["unpack", str(tmp_path / "m.fpk"), str(tmp_path / "d.safetensors")])
    assert r.exit_code == 0, r.output
    assert "head.weight shares emb.weight" in r.output
    sd = load_file(tmp_path / "d.safetensors")
    assert "head.weight" not in sd and "emb.weight" in sd
    with safetensors.safe_open(tmp_path / "d.safetensors", "pt") as f:
        assert json.loads(f.metadata()["freezepack.shared"]) == {"head.weight": "emb.weight"}
    plain = TinyLM(p=0.0)
    load_model(plain, tmp_path / "d.safetensors")  # safetensors' own loader re-ties it
    model.eval()
    assert torch.equal(plain(TOKENS), model(TOKENS))


def test_safe_open_is_a_drop_in_for_safetensors(tmp_path):
    p = tmp_path / "m.fpk"
    freezepack.save(p, small_record(), {"task": "x"})
    dense = tmp_path / "d.safetensors"
    assert CliRunner().invoke(cli, ["unpack", str(p), str(dense)]).exit_code == 0
    for opener in (lambda f: f(p, framework="pt"), lambda f: f(p, "pt"), lambda f: f(p, "pt", device="cpu"),
                   lambda f: f(p, framework="pt", device=0) if torch.cuda.is_available() else f(p, "pt")):
        with opener(freezepack.safe_open) as f, safetensors.safe_open(dense, framework="pt") as g:
            assert sorted(f.keys()) == sorted(g.keys())
            assert f.metadata()["task"] == g.metadata()["task"] == "x"
            for k in g.keys():
                assert torch.equal(f.get_tensor(k).cpu(), g.get_tensor(k))
                fs, gs = f.get_slice(k), g.get_slice(k)
                assert fs.get_shape() == gs.get_shape() and fs.get_dtype() == gs.get_dtype()
                if gs.get_shape():
                    assert torch.equal(fs[1:3].cpu(), gs[1:3])
                    assert torch.equal(fs[:, ...].cpu(), gs[:, ...])
    with freezepack.safe_open(p, "np") as f, safetensors.safe_open(dense, "np") as g:
        assert np.array_equal(f.get_tensor("conv.weight"), g.get_tensor("conv.weight"))
    with pytest.raises(UsageError, match="framework 'tf'"):
        freezepack.safe_open(p, "tf")
    with pytest.raises(UsageError, match="not a torch device"):
        freezepack.safe_open(p, "pt", "nowhere")


# ------------------------------------------------------------------------------------------------ convert
def convert(src, dst, *args):
    r = CliRunner().invoke(cli, ["convert", str(src), str(dst), "--json", *map(str, args)])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def dense_of(model, tmp_path):  # (trained: its trainable entries differ from the generator's)
    """The dense state dict a user's checkpoint of ``model`` holds (tied names one tensor, as torch keeps it)."""
    freezepack.save(tmp_path / "saved.fpk", model)
    return freezepack.load(tmp_path / "saved.fpk")


def test_convert_keeps_ties_once_and_codes_them_once(tmp_path):
    model = frozen_lm(steps=3)
    sd = dense_of(model, tmp_path)
    assert sd["head.weight"] is sd["emb.weight"]
    torch.save(sd, tmp_path / "ckpt.pt")  # one storage for both names
    report = convert(tmp_path / "ckpt.pt", tmp_path / "out.fpk", "--seed", 5)
    saved = (tmp_path / "saved.fpk").stat().st_size
    assert report["file_bytes"] <= saved * 1.05  # not the head stored whole a second time
    assert report["ties"] == {"head.weight": "emb.weight"}
    report = convert(tmp_path / "ckpt.pt", tmp_path / "k4.fpk", "--seed", 5, "--values", "kmeans:4")
    back = freezepack.load(tmp_path / "k4.fpk")
    assert back["head.weight"] is back["emb.weight"] and not torch.equal(back["emb.weight"], sd["emb.weight"])
    assert freezepack.verify(tmp_path / "k4.fpk")["ok"]
    plain = TinyLM()
    freezepack.load_into(plain, tmp_path / "k4.fpk")
    assert plain.head.weight is plain.emb.weight and torch.equal(plain.emb.weight, back["emb.weight"])
    # safetensors cannot share: equal bytes are the tie (two zero biases are not)
    save_file({k: v.clone() for k, v in sd.items()}, tmp_path / "ckpt.safetensors")
    report = convert(tmp_path / "ckpt.safetensors", tmp_path / "st.fpk", "--seed", 5)
    assert report["ties"] == {"head.weight": "emb.weight"}
    assert report["file_bytes"] <= saved * 1.05


def test_convert_of_a_bfloat16_freezenet_finds_its_frozen_entries(tmp_path):
    model = frozen_lm(steps=3).to(torch.bfloat16)
    sd = dense_of(model, tmp_path)
    torch.save(sd, tmp_path / "bf16.pt")
    report = convert(tmp_path / "bf16.pt", tmp_path / "out.fpk", "--seed", 5)
    kinds = {t["name"]: t["stored_as"] for t in report["tensors"]}
    assert kinds["ff.weight"] == kinds["emb.weight"] == "frozen" and kinds["head.weight"] == "alias"
    assert report["file_bytes"] <= (tmp_path / "saved.fpk").stat().st_size * 1.05
    back = freezepack.load(tmp_path / "out.fpk")
    assert all(torch.equal(back[k].view(torch.int16), v.view(torch.int16)) for k, v in sd.items())
    report = convert(tmp_path / "bf16.pt", tmp_path / "k4.fpk", "--seed", 5, "--values", "kmeans:4")
    coded = {t["name"] for t in report["tensors"] if t.get("values") == "kmeans:4"}
    assert {"ff.weight", "out_proj.weight", "emb.weight"} <= coded
    codings = {t["name"]: t.get("values_coding") for t in freezepack.inspect(tmp_path / "k4.fpk")["tensors"]}
    assert codings["ff.weight"].startswith("codebook:") and int(codings["ff.weight"].split(":")[1]) <= 16


def test_values_on_a_dense_checkpoint_says_what_it_coded_and_keeps_dense_tensors_exact(tmp_path):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16, padding_idx=0)  # a zero padding row: looks 'pruned' in a dense tensor
    sd = {"emb.weight": emb.weight.detach().clone(), "fc.weight": torch.randn(8, 16), "fc.bias": torch.randn(8)}
    save_file(sd, tmp_path / "dense.safetensors")
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "dense.safetensors"), str(tmp_path / "o.fpk"),
                                 "--seed", 1, "--values", "kmeans:4"])
    assert r.exit_code == 0, r.output
    assert "emb.weight: pruned" in r.output and "values exact" in r.output and "--lossy-whole" in r.output
    assert "values of 0 of 3 tensors quantized" in r.output
    back = freezepack.load(tmp_path / "o.fpk")
    assert all(torch.equal(back[k], v) for k, v in sd.items())  # nothing coded lossily by accident
    report = convert(tmp_path / "dense.safetensors", tmp_path / "w.fpk", "--seed", 1, "--values", "kmeans:4",
                     "--lossy-whole")
    coded = {t["name"] for t in report["tensors"] if t.get("values") == "kmeans:4"}
    assert coded == {"emb.weight", "fc.weight"}  # 1-D biases stay exact
    back = freezepack.load(tmp_path / "w.fpk")
    assert len(torch.unique(back["fc.weight"])) <= 16 and torch.equal(back["fc.bias"], sd["fc.bias"])


def test_a_nested_training_checkpoint_is_found_or_named(tmp_path):
    model = frozen_lm(steps=1)
    sd = dense_of(model, tmp_path)
    torch.save({"model": sd, "step": 3, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "n.pt")
    report = convert(tmp_path / "n.pt", tmp_path / "o.fpk", "--seed", 5)
    assert report["ties"] == {"head.weight": "emb.weight"}
    torch.save({"model": sd, "ema": {k: v * 0.5 for k, v in sd.items()}}, tmp_path / "two.pt")
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "two.pt"), str(tmp_path / "x.fpk"), "--seed", "5"])
    assert r.exit_code == 1 and "several dicts of tensors (model, ema)" in r.output and "--key" in r.output
    convert(tmp_path / "two.pt", tmp_path / "ema.fpk", "--seed", 5, "--key", "ema")
    assert torch.equal(freezepack.load(tmp_path / "ema.fpk")["ff.weight"], sd["ff.weight"] * 0.5)
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "two.pt"), str(tmp_path / "x.fpk"), "--seed", "5",
                                 "--key", "nope"])
    assert r.exit_code == 1 and "--key 'nope': no entry 'nope'" in r.output


def test_load_freezenet_ties_a_head_the_file_stores_once(tmp_path):
    from freezepack.method.freezenet import freeze_record, frozen_parametrizations

    model = frozen_lm(steps=2)
    rec = freeze_record(model)
    del rec.aliases["head.weight"]  # a file that holds the tied head only under the embedding's name
    freezepack.save(tmp_path / "m.fpk", rec)
    back = freezepack.load_freezenet(TinyLM(), tmp_path / "m.fpk")  # strict: the module ties them
    params = frozen_parametrizations(back)
    assert params["head.weight"] is params["emb.weight"]
    assert back.head.parametrizations.weight.original is back.emb.parametrizations.weight.original
    back.eval()
    assert torch.equal(back(TOKENS), model(TOKENS))
