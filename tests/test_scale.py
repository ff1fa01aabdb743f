"""Big-model paths: meta-device load_into, progress callbacks, thread-count independence, the mask-coder shortcut."""
import numpy as np
import pytest
import torch
from torch import nn

import freezepack
from freezepack.format import init, maskcode, native, record, rng
from freezepack.method.freezenet import dense_state_dict, make_freezenet


class TiedLM(nn.Module):
    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        return self.head(self.ln(torch.relu(self.fc(self.wte(idx)))))


def lm_loss(model, batch):
    return nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    make_freezenet(model, torch.randint(0, 50, (2, 9)), q=0.9, seed=3, loss_fn=lm_loss)
    path = str(tmp_path / "lm.fpk")
    freezepack.save(path, model)
    return path, {k: v.clone() for k, v in dense_state_dict(model).items()}


def test_load_into_meta_model_equals_a_normal_load(saved):
    path, truth = saved
    with torch.device("meta"):
        model = TiedLM()
    assert model.fc.weight.is_meta
    freezepack.load_into(model, path)
    loaded = freezepack.load(path)
    sd = model.state_dict()
    assert sd.keys() == loaded.keys() == truth.keys()
    for k in sd:
        assert sd[k].device.type == "cpu" and torch.equal(sd[k], loaded[k]) and torch.equal(sd[k], truth[k]), k
    assert model.head.weight is model.wte.weight  # still one Parameter
    assert model.fc.weight.requires_grad and isinstance(model.fc.weight, nn.Parameter)


def test_load_into_meta_model_without_the_tie_is_tied_by_the_file(saved):
    path, truth = saved
    with torch.device("meta"):
        model = TiedLM()
    model.head.weight = nn.Parameter(torch.empty(50, 16, device="meta"))  # untied
    freezepack.load_into(model, path)
    assert model.head.weight is model.wte.weight
    assert torch.equal(model.head.weight, truth["head.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU twin: test_load_into_meta_model_equals_a_"
                                                            "normal_load)")
def test_load_into_meta_model_on_cuda(saved):
    path, truth = saved
    with torch.device("meta"):
        model = TiedLM()
    freezepack.load_into(model, path, device="cuda")
    for k, v in model.state_dict().items():
        assert v.device.type == "cuda" and torch.equal(v.cpu(), truth[k]), k


def _monotone(calls):
    assert calls, "progress was never called"
    done = [d for d, _ in calls]
    totals = {t for _, t in calls}
    assert len(totals) == 1 and done == sorted(done) and done[-1] == calls[-1][1] and done[0] >= 1
    return calls[-1][1]


def test_progress_callbacks_are_monotone_and_end_at_the_total(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    calls = []
    make_freezenet(model, torch.randint(0, 50, (2, 9)), q=0.9, seed=3, loss_fn=lm_loss,
                   progress=lambda d, t: calls.append((d, t)))
    assert _monotone(calls) == 3 + 2  # init, score, threshold, then the two frozen tensors (wte/head once, fc)
    path = str(tmp_path / "p.fpk")
    calls = []
    freezepack.save(path, model, progress=lambda d, t: calls.append((d, t)))
    n = len(freezepack.inspect(path)["tensors"])
    assert _monotone(calls) == 2 * n
    for verify in (True, False):
        seen = []
        freezepack.load(path, verify=verify, progress=lambda d, t, seen=seen: seen.append((d, t)))
        assert _monotone(seen) == n
    calls = []
    freezepack.load_into(TiedLM(), path, progress=lambda d, t: calls.append((d, t)))
    assert _monotone(calls) == n


@pytest.mark.parametrize("dist", ["normal", "uniform", "sign"])
def test_generator_is_bit_identical_for_1_2_and_4_threads(dist):
    if not native.available():
        pytest.skip(f"compiled kernel unavailable: {native.unavailable_reason()}")
    n = (1 << 18) + 4 * 64 + 3  # several threads' worth, and a ragged end
    outs = []
    for threads in (1, 2, 4):
        out = torch.empty(n)
        native.fill(out, dist, -0.25, 0.5, seed=2**63 + 5, stream=rng.stream_id("t"), start=3, threads=threads)
        outs.append(out.view(torch.int32))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    ref = init.generate_np(init.InitSpec("x", dist, -0.25, 0.5), (n + 3,), 2**63 + 5, "t")[3:]
    assert torch.equal(outs[0], torch.from_numpy(ref).view(torch.int32))


def test_bernoulli_shortcut_picks_what_computing_every_coder_picks():
    gen = np.random.default_rng(0)
    for p in (0.01, 0.05, 0.2):
        mask = gen.random(1 << 20) < p
        n, k = mask.size, int(mask.sum())
        chosen, tried = maskcode.encode_candidates(mask)
        assert not any(c.coder == "ans-bernoulli" for c in tried)  # the shortcut applied
        full = maskcode._pick(tried + [maskcode._encode_ans(mask, n, k)], n, k)
        assert (chosen.coder, chosen.params) == (full.coder, full.params)
        assert np.array_equal(chosen.payload, full.payload)


@pytest.mark.parametrize("method", ["snip", "random"])
def test_made_freezenet_holds_the_generator_values_unaliased(method):
    torch.manual_seed(0)
    model = TiedLM()
    make_freezenet(model, torch.randint(0, 50, (2, 9)), q=0.9, seed=3, loss_fn=lm_loss, method=method)
    from freezepack.method.freezenet import frozen_parametrizations

    for name, p in frozen_parametrizations(model).items():
        want = init.generate(p.init, p.frozen.shape, 3, p.stream)
        assert torch.equal(p.frozen.view(torch.int32), want.view(torch.int32)), name
        mod, _, attr = name.rpartition(".")
        values = model.get_submodule(mod).parametrizations[attr].original
        assert values.data_ptr() != p.frozen.data_ptr() and values.numel() == int(p.mask.sum())
        with torch.no_grad():
            values.add_(1.0)  # training the values never moves a frozen entry
        assert torch.equal(p.frozen.view(torch.int32), want.view(torch.int32)), name
        assert torch.equal(p.index, p.mask.reshape(-1).nonzero().squeeze(1))


def test_convert_progress_covers_converting_coding_and_proving(tmp_path):
    from safetensors.torch import save_file

    from freezepack.conversion import convert_checkpoint
    from freezepack.testing import record_for

    sd = record_for({"a.weight": (50, 40), "a.bias": (50,), "b.weight": (30, 50)}, 0.95, seed=9).state_dict()
    src = str(tmp_path / "dense.safetensors")
    save_file(sd, src)
    calls = []
    convert_checkpoint(src, str(tmp_path / "c.fpk"), 9, progress=lambda d, t: calls.append((d, t)))
    assert _monotone(calls) == 3 * len(sd)


@pytest.mark.parametrize("no_native", [False, True])
def test_generate_from_an_offset_is_that_slice_of_the_stream(monkeypatch, no_native):
    if no_native:
        monkeypatch.setenv("FREEZEPACK_NO_NATIVE", "1")
    spec = init.make_init("xavier_normal", (300, 70))
    whole = init.generate(spec, (300, 70), 5, "w").view(-1)
    for s, c in ((0, 1), (3, 1000), (4096, 77), (20999, 1)):
        piece = init.generate(spec, (c,), 5, "w", start=s)
        assert torch.equal(piece.view(torch.int32), whole[s:s + c].view(torch.int32))


def test_streamed_verify_agrees_with_every_conformance_vector(monkeypatch):
    """verify() hashes frozen tensors chunk by chunk; with tiny chunks (boundaries everywhere) every valid vector
    still verifies and every invalid one is still refused."""
    import json
    import os

    from freezepack import api

    monkeypatch.setattr(record, "STREAM_CHUNK", 37)
    root = os.path.join(os.path.dirname(__file__), "..", "spec", "vectors", "fpk")
    names = sorted(f for f in os.listdir(root) if f.endswith(".fpk"))
    assert len(names) > 20
    for name in names:
        path = os.path.join(root, name)
        try:
            ok = api.verify(path)["ok"]
        except freezepack.FreezepackError:
            ok = False
        assert ok == ("invalid" not in name), name
    with open(os.path.join(root, "manifest.json")) as f:
        assert json.load(f)  # (the manifest still lists them)


def test_streamed_verify_on_scaled_half_precision_and_fully_trained_tensors(tmp_path, monkeypatch):
    from freezepack import api
    from freezepack.format.record import FreezeRecord, FrozenTensor

    gen = torch.Generator().manual_seed(1)
    frozen = {}
    for name, dtype, p, scale in (("a", torch.float16, 0.1, 0.5), ("b", torch.bfloat16, 0.3, 1.0),
                                  ("c", torch.float32, 1.0, 1.0), ("d", torch.float32, 0.02, 0.75)):
        mask = torch.rand(40, 31, generator=gen) < p
        frozen[name] = FrozenTensor(init=init.make_init("xavier_uniform", (40, 31)), mask=mask,
                                    values=torch.randn(int(mask.sum()), generator=gen).to(dtype), frozen_scale=scale)
    rec = FreezeRecord(seed=3, frozen=frozen, whole={})
    path = str(tmp_path / "h.fpk")
    freezepack.save(path, rec)
    from freezepack.api.materialize import materialize, streamed_digest
    from freezepack.format.reader import open_file

    monkeypatch.setattr(record, "STREAM_CHUNK", 101)
    assert api.verify(path)["ok"]
    with open_file(path) as r:  # the streamed digest is the digest of the whole reconstruction
        for e in r.header.entries:
            assert streamed_digest(r, e, None) == api.digest(materialize(r, e, None, False)), e.name


def test_load_into_still_refuses_a_reconstruction_that_misses_its_digest(saved, monkeypatch):
    from freezepack.api import materialize

    path, _ = saved
    monkeypatch.setattr(materialize, "digest_ok", lambda want, got: False)  # every regenerated tensor now "differs"
    with pytest.raises(freezepack.IntegrityError, match="does not match its digest"):
        freezepack.load_into(TiedLM(), path)
    freezepack.load_into(TiedLM(), path, verify=False)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1.0), (torch.float32, 0.75), (torch.float16, 0.5)])
def test_streamed_truth_digest_is_the_digest_of_the_forward(dtype, scale):
    from freezepack import api
    from freezepack.method.freezenet import frozen_parametrizations

    torch.manual_seed(0)
    model = TiedLM().to(dtype)
    make_freezenet(model, torch.randint(0, 50, (2, 9)), q=0.9, seed=3, method="random")
    for name, p in frozen_parametrizations(model).items():
        if scale != 1.0:
            p.set_frozen_scale(scale)
        mod, _, attr = name.rpartition(".")
        module = model.get_submodule(mod)
        values = module.parametrizations[attr].original
        with torch.no_grad():
            values.add_(0.125)
        dense = getattr(module, attr)
        for chunk in (7, 100, 1 << 22):
            assert p.dense_digest(values, chunk=chunk) == api.digest(dense), (name, chunk)


def test_bernoulli_stream_pushed_in_pieces_is_the_same_stream(monkeypatch):
    mask = np.random.default_rng(3).random(10_007) < 0.07
    n, k = mask.size, int(mask.sum())
    whole = maskcode._encode_ans(mask, n, k)
    for piece in (1, 100, 4096):
        monkeypatch.setattr(maskcode, "ANS_PIECE", piece)
        assert np.array_equal(maskcode._encode_ans(mask, n, k).payload, whole.payload), piece
