"""Hugging Face transformers models (tiny GPT-2, BERT, Llama built from configs): the paths their users take."""
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

import freezepack  # noqa: E402
from freezepack import hf  # noqa: E402
from freezepack.method.freezenet import (  # noqa: E402
    FrozenShareWarning,
    frozen_parametrizations,
    make_freezenet,
    rates,
    trainable_masks,
)
from freezepack.testing import HF_KINDS, hf_logits, hf_loss, hf_tokens, tiny_hf_model  # noqa: E402

AUTO = {"gpt2": transformers.AutoModelForCausalLM, "bert": transformers.AutoModelForMaskedLM,
        "llama": transformers.AutoModelForCausalLM}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def frozen(kind, q=0.9, seed=3, **kw):
    model = tiny_hf_model(kind, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenShareWarning)
        return make_freezenet(model, hf_tokens(), q, seed, loss_fn=hf_loss)


def train_steps(model, steps=3):
    """What a transformers user writes: AdamW, gradient clipping, a warmup schedule."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=steps)
    for i in range(steps):
        loss = hf_loss(model, hf_tokens(seed=10 + i))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("kind", HF_KINDS)
def test_default_frozen_set_reaches_q_over_the_whole_model(kind):
    model = frozen(kind)  # and no FrozenShareWarning (it is an error here)
    q, q_beta = rates(model)
    assert abs(q - 0.9) < 1e-3
    assert q_beta > 0.85  # biases and norms are the only trainable tensors left
    if kind == "gpt2":  # its attention and MLP are transformers' Conv1D: frozen too
        assert "transformer.h.0.attn.c_attn.weight" in trainable_masks(model)
        assert "transformer.h.1.mlp.c_proj.weight" in trainable_masks(model)


def test_a_share_far_from_q_warns_and_names_the_tensors_left_out():
    with pytest.warns(FrozenShareWarning, match=r"transformer\.h\.\d\.mlp\.c_fc\.weight"):
        make_freezenet(tiny_hf_model("gpt2"), hf_tokens(), 0.9, 3, loss_fn=hf_loss, select=["transformer.w?e.weight"])


def test_masks_do_not_depend_on_the_global_rng_and_modes_are_restored():
    masks = []
    for rng_seed in (1, 2):
        model = tiny_hf_model("gpt2")  # train mode, dropout 0.1 everywhere, as transformers builds it
        assert model.training
        torch.manual_seed(rng_seed)
        make_freezenet(model, hf_tokens(), 0.9, 3, loss_fn=hf_loss)
        assert model.training and all(m.training for m in model.modules())
        masks.append(trainable_masks(model))
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_biases_are_kept_and_the_models_own_init_is_one_word():
    model = tiny_hf_model("gpt2")
    bias = model.transformer.h[0].attn.c_attn.bias
    with torch.no_grad():
        bias.copy_(torch.linspace(-1, 1, bias.numel()))
    before = bias.detach().clone()
    make_freezenet(model, hf_tokens(), 0.9, 3, loss_fn=hf_loss, init="model")
    assert torch.equal(model.transformer.h[0].attn.c_attn.bias, before)
    p = frozen_parametrizations(model)["transformer.h.0.attn.c_attn.weight"]
    assert (p.init.name, p.init.dist, p.init.a, p.init.b) == ("normal", "normal", 0.0, float(torch.tensor(0.02)))
    zeroed = make_freezenet(tiny_hf_model("gpt2"), hf_tokens(), 0.9, 3, loss_fn=hf_loss, biases="zeros")
    assert not zeroed.transformer.h[0].attn.c_attn.bias.any()


def _count_torch_inits(monkeypatch):
    calls = []
    for fn in ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_", "zeros_", "ones_"):
        orig = getattr(torch.nn.init, fn)
        monkeypatch.setattr(torch.nn.init, fn, lambda *a, _o=orig, _n=fn, **k: (calls.append(_n), _o(*a, **k))[1])
    return calls


@pytest.mark.parametrize("kind", HF_KINDS)
def test_trained_model_directory_loads_bit_exactly_without_a_dense_init(kind, tmp_path, monkeypatch):
    model = train_steps(frozen(kind))
    ids = hf_tokens(seed=99)
    want = hf_logits(model, ids)
    out = hf.save_pretrained(model, tmp_path / "m")
    assert sorted(os.listdir(out)) == sorted(["config.json", hf.FPK_NAME]
                                             + (["generation_config.json"] if kind != "bert" else []))
    calls = _count_torch_inits(monkeypatch)
    back = hf.from_pretrained(out, AUTO[kind])
    assert calls == []  # built without running any initializer: storage filled once, by the generator
    assert type(back) is type(model) and not back.training
    assert torch.equal(hf_logits(back, ids), want)
    assert not frozen_parametrizations(back)
    head, emb = back.get_output_embeddings().weight, back.get_input_embeddings().weight
    assert head is emb  # ties restored
    again = hf.from_pretrained(tmp_path / "m" / hf.FPK_NAME, freezenet=True)  # the file alone: config inside
    assert torch.equal(hf_logits(again, ids), want)
    assert rates(again) == rates(model)


def test_bf16_and_untied_models_round_trip(tmp_path):
    model = train_steps(frozen("llama", tied=False).to(torch.bfloat16), steps=2)
    ids = hf_tokens(seed=5)
    hf.save_pretrained(model, tmp_path / "m")
    back = hf.from_pretrained(tmp_path / "m")
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert back.lm_head.weight is not back.model.embed_tokens.weight
    assert torch.equal(hf_logits(back, ids), hf_logits(model, ids))


@pytest.mark.parametrize("kind,tied", [("gpt2", True), ("llama", False)])
def test_transformers_save_pretrained_of_a_freezenet_loads_bit_exactly(kind, tied, tmp_path):
    model = train_steps(frozen(kind, tied=tied), steps=2)
    ids = hf_tokens(seed=7)
    with pytest.warns(UserWarning, match="freezepack.hf.save_pretrained"):
        model.save_pretrained(tmp_path / "dense")
    back = type(model).from_pretrained(tmp_path / "dense").eval()
    assert torch.equal(hf_logits(back, ids), hf_logits(model, ids))
    # a FreezeNet loaded for more training keeps the guard
    hf.save_pretrained(model, tmp_path / "fpk")
    resumed = hf.from_pretrained(tmp_path / "fpk", freezenet=True)
    with pytest.warns(UserWarning, match="dense model"):
        resumed.save_pretrained(tmp_path / "dense2")
    again = type(model).from_pretrained(tmp_path / "dense2").eval()
    assert torch.equal(hf_logits(again, ids), hf_logits(model, ids))


def test_strict_load_into_ties_a_head_the_file_stores_once(tmp_path):
    model = train_steps(frozen("gpt2"), steps=1)
    path = tmp_path / "m.fpk"
    freezepack.save(path, model)
    sd = freezepack.load(path)
    del sd["lm_head.weight"]  # what a dense HF checkpoint holds: the tied head once
    rec = freezepack.format.record.FreezeRecord(seed=0, whole=dict(sd))
    freezepack.save(tmp_path / "dense.fpk", rec)
    plain = tiny_hf_model("gpt2", seed=1)
    freezepack.load_into(plain, tmp_path / "dense.fpk")  # strict: the tied head is not "missing"
    ids = hf_tokens(seed=3)
    assert torch.equal(hf_logits(plain.eval(), ids), hf_logits(model, ids))
    untied = tiny_hf_model("gpt2", tied=False)
    with pytest.raises(freezepack.FormatError, match=r"'lm_head.weight' has the shape of 'transformer.wte.weight'.*"
                                                     r"tie_weights"):
        freezepack.load_into(untied, tmp_path / "dense.fpk")


def test_the_directorys_fpk_ships_over_a_fleet_and_rebuilds_the_model(tmp_path):
    pytest.importorskip("tuf")
    from freezepack.fleet import Device, Publisher, open_store

    model = train_steps(frozen("gpt2"), steps=1)
    hf.save_pretrained(model, tmp_path / "m")
    store = open_store(str(tmp_path / "repo"))
    (tmp_path / "root.json").write_bytes(Publisher(store, tmp_path / "keys").init())
    Publisher(store, tmp_path / "keys").load().publish(str(tmp_path / "m" / hf.FPK_NAME), "tiny-gpt2")
    report = Device(str(tmp_path / "device")).install(str(tmp_path / "repo"), "tiny-gpt2",
                                                      root_file=str(tmp_path / "root.json"))
    back = hf.from_pretrained(report.path)  # one file on the device: config and class come from its metadata
    ids = hf_tokens(seed=4)
    assert torch.equal(hf_logits(back, ids), hf_logits(model, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convert_of_a_transformers_checkpoint_keeps_ties_and_precision(dtype, tmp_path):
    from freezepack.conversion import convert_checkpoint

    model = train_steps(frozen("gpt2"), steps=2).to(dtype)
    hf.save_pretrained(model, tmp_path / "fpk")
    with pytest.warns(UserWarning, match="dense model"):
        model.save_pretrained(tmp_path / "dense")  # transformers' file: the tied head stored once
    src = tmp_path / "dense" / "model.safetensors"
    report = convert_checkpoint(src, tmp_path / "c.fpk", 3)
    kinds = {t["name"]: t["stored_as"] for t in report["tensors"]}
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "frozen" and "lm_head.weight" not in kinds
    assert report["file_bytes"] <= 1.05 * (tmp_path / "fpk" / hf.FPK_NAME).stat().st_size
    plain = tiny_hf_model("gpt2").to(dtype)
    freezepack.load_into(plain, tmp_path / "c.fpk")  # strict; the head comes with its tied embedding
    ids = hf_tokens(seed=8)
    assert torch.equal(hf_logits(plain.eval(), ids), hf_logits(model, ids))
    # a .pt of the state dict shares the tied storage: one alias, and lossy values code it once
    torch.save(freezepack.load(tmp_path / "fpk" / hf.FPK_NAME), tmp_path / "sd.pt")
    report = convert_checkpoint(tmp_path / "sd.pt", tmp_path / "k.fpk", 3, values="kmeans:4")
    assert report["ties"] == {"lm_head.weight": "transformer.wte.weight"}
    back = freezepack.load(tmp_path / "k.fpk")
    assert back["lm_head.weight"] is back["transformer.wte.weight"]
    assert {t["name"] for t in report["tensors"] if t.get("values") == "kmeans:4"} >= {
        "transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"}


def test_convert_stores_a_tie_under_the_name_it_was_frozen_with(tmp_path):
    from safetensors.torch import save_file

    from freezepack.conversion import convert_checkpoint

    model = train_steps(frozen("gpt2"), steps=1)
    sd = freezepack.load(hf.save_pretrained(model, tmp_path / "m") + "/" + hf.FPK_NAME)
    save_file({k: v.clone() for k, v in sd.items()}, tmp_path / "both.safetensors")  # sorted: lm_head first
    report = convert_checkpoint(tmp_path / "both.safetensors", tmp_path / "c.fpk", 3)
    assert report["ties"] == {"lm_head.weight": "transformer.wte.weight"}
    kinds = {t["name"]: t["stored_as"] for t in report["tensors"]}
    assert kinds["transformer.wte.weight"] == "frozen"
    assert report["file_bytes"] <= 1.05 * (tmp_path / "m" / hf.FPK_NAME).stat().st_size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU twin: the directory round trips above)")
def test_directory_loads_onto_the_gpu_bit_exactly(tmp_path):
    model = train_steps(frozen("llama"), steps=1)
    hf.save_pretrained(model, tmp_path / "m")
    back = hf.from_pretrained(tmp_path / "m", device="cuda")
    assert back.lm_head.weight.device.type == "cuda" and back.lm_head.weight is back.model.embed_tokens.weight
    want = freezepack.load(tmp_path / "m" / hf.FPK_NAME)
    got = back.state_dict()
    assert all(torch.equal(got[k].cpu(), v) for k, v in want.items())
