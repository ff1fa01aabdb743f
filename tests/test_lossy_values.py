"""Opt-in lossy values (freezepack.method.quantize) and the v2 value coders that store them exactly.

The contract: ``save(..., values=CODING)`` writes the model *with quantized trained values*; that file verifies
bit for bit, records the coding, loads to exactly ``quantize_model(copy, CODING)``, and the model in memory is
left alone. The coders (``cast``, ``codebook`` table and grid) are lossless for any input and refuse malformed
blocks with a FormatError.
"""
from __future__ import annotations

import copy
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import freezepack
from freezepack import FormatError, MethodError, UsageError
from freezepack.cli import cli
from freezepack.format import dtypes, entropy
from freezepack.format import reader as fpreader
from freezepack.format.v2 import wire
from freezepack.format.v2 import writer as v2_writer
from freezepack.method.freezenet import dense_state_dict, frozen_parametrizations
from freezepack.method.quantize import ValueCoding, finetune_clusters, quantize, quantize_model
from freezepack.testing.models import trained
from freezepack.testing.v2 import body_with_whole, codebook_head, fuzz_resigned

CODINGS = ["bf16", "f16", "int8", "uniform:3", "kmeans:4", "kmeans:1"]


# ------------------------------------------------------------------------------------------------ the quantizer
@pytest.mark.parametrize("text,kind,bits", [("f32", "f32", 0), (None, "f32", 0), ("BF16", "bf16", 0),
                                            ("int8", "uniform", 8), ("kmeans:4", "kmeans", 4),
                                            ("uniform:2", "uniform", 2), (" kmeans:8 ", "kmeans", 8)])
def test_codings_parse(text, kind, bits):
    c = ValueCoding.parse(text)
    assert (c.kind, c.bits) == (kind, bits)


@pytest.mark.parametrize("text", ["f64", "kmeans", "kmeans:0", "kmeans:9", "uniform:1", "int4", "", 4])
def test_bad_codings_are_usage_errors(text):
    with pytest.raises(UsageError):
        ValueCoding.parse(text)


def _values(n=3000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_casts_round_to_nearest_even_like_torch():
    v = _values()
    assert torch.equal(quantize(v, "bf16")[0], v.bfloat16().float())
    assert torch.equal(quantize(v, "f16")[0], v.half().float())
    with pytest.raises(UsageError, match="f16 range"):
        quantize(torch.tensor([1e6, 0.5]), "f16")


@pytest.mark.parametrize("bits", [1, 2, 4, 6])
def test_kmeans_has_at_most_2_to_the_k_values_is_deterministic_and_idempotent(bits):
    v = _values(seed=bits)
    q, hint = quantize(v, f"kmeans:{bits}")
    assert hint == {} and q.dtype == v.dtype and q.shape == v.shape
    assert 1 < torch.unique(q).numel() <= 2 ** bits or bits == 1 and torch.unique(q).numel() == 2
    assert torch.equal(q, quantize(v.clone(), f"kmeans:{bits}")[0])
    assert torch.equal(quantize(q, f"kmeans:{bits}")[0], q)  # already few values: kept exactly
    # every value went to its nearest centroid
    cents = torch.unique(q)
    nearest = cents[(v[:, None] - cents[None, :]).abs().argmin(1)]
    assert torch.equal((v - nearest).abs(), (v - q).abs())


@pytest.mark.parametrize("coding,levels", [("uniform:3", 7), ("int8", 255)])
def test_uniform_grid_is_exact_f32_multiples_of_its_step(coding, levels):
    v = _values()
    q, hint = quantize(v, coding)
    step = hint["step"]
    lv = np.rint(q.numpy().astype(np.float64) / step).astype(np.int64)
    assert np.abs(lv).max() <= (levels - 1) // 2
    assert np.array_equal(entropy.grid_values(lv, step), q.numpy())
    assert (q - v).abs().max() <= step / 2 * (1 + 1e-6)


def test_half_tensors_quantize_in_their_dtype():
    v = _values().half()
    for coding in ("kmeans:3", "uniform:4", "bf16"):
        q, _ = quantize(v, coding)
        assert q.dtype == torch.float16 and torch.isfinite(q).all()
    assert torch.unique(quantize(v, "kmeans:3")[0]).numel() <= 8


# ------------------------------------------------------------------------------------------------ save / load
@pytest.fixture(scope="module")
def bag():
    model, batch = trained("bag", steps=30)
    return model, batch


@pytest.mark.parametrize("coding", CODINGS)
def test_lossy_file_is_exactly_the_quantized_model(bag, coding, tmp_path):
    model, batch = bag
    before = {k: v.clone() for k, v in dense_state_dict(model).items()}
    p = tmp_path / "m.fpk"
    freezepack.save(p, model, values=coding)
    assert all(torch.equal(before[k], v) for k, v in dense_state_dict(model).items())  # memory untouched
    assert freezepack.verify(p)["ok"]
    expected = copy.deepcopy(model)
    quantize_model(expected, coding)
    sd = freezepack.load(p)
    want = dense_state_dict(expected)
    assert set(sd) == set(want) and all(torch.equal(sd[k], want[k]) for k in want)
    info = freezepack.inspect(p)
    assert info["values"] == str(ValueCoding.parse(coding)) == info["metadata"]["freezepack.values"]
    lossless = tmp_path / "f32.fpk"
    freezepack.save(lossless, model)
    assert p.stat().st_size < lossless.stat().st_size
    assert freezepack.inspect(lossless)["values"] == "f32 (lossless)"
    coded = {t["values_coding"] for t in info["tensors"] if t["kind"] == "frozen" and t["trainable"]}
    assert coded <= {"cast:BF16", "cast:BF16+planes", "cast:F16", "cast:F16+planes", "planes"} or \
        all(c.startswith("codebook:") for c in coded)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["resnet", "lm"])
def test_lossy_values_on_other_architectures_reload_into_a_fresh_model(case, tmp_path):
    from freezepack.testing.models import CASES
    from freezepack.testing.models import inputs as _inputs

    model, batch = trained(case, steps=20)
    p = tmp_path / "m.fpk"
    freezepack.save(p, model, values="kmeans:3")
    expected = copy.deepcopy(model)
    quantize_model(expected, "kmeans:3")
    fresh = CASES[case][0]()
    freezepack.load_freezenet(fresh, p)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(_inputs(case, batch)), expected.eval()(_inputs(case, batch)))
    for name in frozen_parametrizations(fresh):
        assert torch.unique(fresh.get_parameter(name.rpartition(".")[0] + ".parametrizations."
                                                + name.rpartition(".")[2] + ".original")).numel() <= 8


def test_lossy_values_need_format_v2(bag, tmp_path):
    with pytest.raises(UsageError, match="version 2"):
        freezepack.save(tmp_path / "m.fpk", bag[0], version=1, values="bf16")
    freezepack.save(tmp_path / "m.fpk", bag[0], version=1, values="f32")  # lossless: any version
    assert freezepack.verify(tmp_path / "m.fpk")["ok"]


def test_lossy_save_still_proves_the_frozen_part(bag, tmp_path):
    model = copy.deepcopy(bag[0])
    name, p = next(iter(frozen_parametrizations(model).items()))
    with torch.no_grad():
        p.frozen.view(-1)[0] += 1.0
    with pytest.raises(MethodError, match="would not reproduce"):
        freezepack.save(tmp_path / "m.fpk", model, values="kmeans:4")
    assert not list(tmp_path.iterdir())


def test_finetuned_clusters_are_stored_exactly_and_resaving_is_lossless(bag, tmp_path):
    model = copy.deepcopy(bag[0]).train()
    clusters = quantize_model(model, "kmeans:2")
    before = copy.deepcopy(model)
    finetune_clusters(model, clusters, [bag[1]] * 3, lr=0.05)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))  # it moved
    for name in clusters:
        mod, attr = name.rpartition(".")[0], name.rpartition(".")[2]
        values = model.get_submodule(mod).parametrizations[attr].original
        assert torch.unique(values).numel() <= 4
    a, b = tmp_path / "a.fpk", tmp_path / "b.fpk"
    freezepack.save(a, model, values="kmeans:2")  # the fine-tuned values already are a codebook: kept exactly
    freezepack.save(b, model)                     # lossless: the writer finds the codebook by itself
    assert freezepack.inspect(a)["values"] == "kmeans:2"
    sa, sb = freezepack.load(a), freezepack.load(b)
    want = dense_state_dict(model)
    assert all(torch.equal(sa[k], want[k]) and torch.equal(sb[k], want[k]) for k in want)
    assert abs(a.stat().st_size - b.stat().st_size) < 64  # same coding; only the metadata differs


# ------------------------------------------------------------------------------------------------ the coders
def _read(tmp_path, data: bytes):
    p = tmp_path / "t.fpk"
    p.write_bytes(data)
    return freezepack.load(p)["x"]


@pytest.mark.parametrize("dtype,values", [
    ("F32", [0.5, -0.25, 0.5, 0.5, 3.0, -0.25, 0.5, 0.5]),
    ("F16", [1.0, 2.0, 1.0, 1.0, 1.0, 2.0, -4.0, 1.0]),
    ("I64", [5, 5, -1, 5, 5, 5, 2**40, 5]),
])
def test_codebook_tables_round_trip_any_dtype(dtype, values, tmp_path):
    t = torch.tensor(values, dtype={"F32": torch.float32, "F16": torch.float16, "I64": torch.int64}[dtype])
    raw = bytes(freezepack.api.tensor_bytes(t))
    head, payload = v2_writer._codebook_block(raw, dtype, None)
    assert head[0] == wire.VALUE_CODERS.index("codebook")
    assert torch.equal(_read(tmp_path, body_with_whole(head, payload, dtype)), t)


def test_value_blocks_are_lossless_on_random_inputs(tmp_path):
    rng = np.random.default_rng(5)
    for trial in range(30):
        n = int(rng.integers(2, 400))
        kind = trial % 5
        if kind == 0:
            v = rng.standard_normal(n).astype(np.float32)
        elif kind == 1:
            v = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).bfloat16().float().numpy()
        elif kind == 2:
            v = rng.standard_normal(n).astype(np.float16).astype(np.float32)
        elif kind == 3:
            v = rng.choice(rng.standard_normal(int(rng.integers(1, 40))).astype(np.float32), n)
        step = None
        if kind == 4:
            step = float(np.float32(rng.random() / 10 + 1e-3))
            v = entropy.grid_values(rng.integers(-100, 100, n), step)
        head, payload, coder = v2_writer._value_block(v.tobytes(), "F32", step)
        got = _read(tmp_path, body_with_whole(head, payload, "F32", n))
        assert got.numpy().tobytes() == v.tobytes(), (trial, coder)


def test_grid_block_round_trips_and_beats_a_table(tmp_path, monkeypatch):
    step = float(np.float32(0.0123))
    v = entropy.grid_values(np.random.default_rng(1).integers(-127, 128, 5000), step)
    grid = v2_writer._codebook_block(v.tobytes(), "F32", step)
    assert v2_writer._codebook_block(v.tobytes(), "F32", None) == grid  # found without the quantizer's hint
    monkeypatch.setattr(v2_writer, "_grid_step", lambda values: None)
    table = v2_writer._codebook_block(v.tobytes(), "F32", None)
    assert grid[0][1] == 1 and table[0][1] == 0
    assert len(grid[0]) + 600 < len(table[0])  # 255 f32 entries vs a step and small gaps
    assert _read(tmp_path, body_with_whole(*grid, "F32", 5000)).numpy().tobytes() == v.tobytes()


@pytest.mark.parametrize("block,payload,dtype,match", [
    (codebook_head(0, 2, struct.pack("<ff", 1.0, 0.5), [4, 4], 0), b"", "F32", "not strictly increasing"),
    (codebook_head(0, 2, struct.pack("<ff", 0.5, 1.0), [4, 3], 0), b"", "F32", "histogram"),
    (codebook_head(1, 1, struct.pack("<f", 0.0) + b"\x00"), b"", "F32", "step must be > 0"),
    (codebook_head(1, 1, struct.pack("<f", -1.0) + b"\x00"), b"", "F32", "step must be > 0"),
    (codebook_head(1, 1, struct.pack("<f", 0.5) + b"\x00"), b"", "F16", "F32 only"),
    (codebook_head(7, 1, struct.pack("<f", 0.5)), b"", "F32", "unknown 'codebook' form"),
    (codebook_head(0, 2, struct.pack("<ff", 0.5, 1.0), [4, 4], 4), b"\0\0\0\0", "F32", "zero word"),
    (bytes([wire.VALUE_CODERS.index("cast"), dtypes.DTYPES.index("I8"), 0]), b"\0" * 8, "F32", "'cast'"),
    (bytes([wire.VALUE_CODERS.index("cast"), dtypes.DTYPES.index("BF16"), 0]), b"\0" * 16, "F16", "'cast'"),
    (bytes([wire.VALUE_CODERS.index("cast"), dtypes.DTYPES.index("BF16"),
            wire.VALUE_CODERS.index("codebook")]), b"", "F32", "inside 'cast'"),
    (bytes([len(wire.VALUE_CODERS)]), b"", "F32", "unknown value coder"),
])
def test_malformed_value_blocks_are_format_errors(block, payload, dtype, match, tmp_path):
    n = 8
    with pytest.raises(FormatError, match=match) as err:
        _read(tmp_path, body_with_whole(block, payload, dtype, n))
    assert err.value.path is not None


def test_grid_levels_beyond_2_to_the_24_are_refused(tmp_path):
    o = wire.Out()
    o.var(wire.zigzag((1 << 24) + 1))
    block = codebook_head(1, 1, struct.pack("<f", 0.5) + bytes(o.b))
    with pytest.raises(FormatError):
        _read(tmp_path, body_with_whole(block, b""))


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_convert_values_shrinks_a_file_without_a_seed_and_inspect_says_lossy(bag, tmp_path):
    src, dst = tmp_path / "m.fpk", tmp_path / "k4.fpk"
    freezepack.save(src, bag[0])
    r = CliRunner().invoke(cli, ["convert", str(src), str(dst), "--values", "kmeans:4"])
    assert r.exit_code == 0, r.output
    assert dst.stat().st_size < src.stat().st_size and freezepack.verify(dst)["ok"]
    r = CliRunner().invoke(cli, ["inspect", str(dst)])
    assert r.exit_code == 0 and "trained values: kmeans:4 (lossy" in r.output and "codebook:" in r.output
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "x.fpk"), "--values", "kmeans:99"])
    assert r.exit_code != 0 and "unknown values coding" in r.output and "Traceback" not in r.output


def test_cli_train_values_needs_out():
    r = CliRunner().invoke(cli, ["train", "--values", "bf16", "--epochs", "1"])
    assert r.exit_code != 0 and "--out" in r.output


def test_fuzzed_value_blocks_never_escape_as_other_errors(tmp_path):
    """Random bytes changed in the body of the value-coder vector (re-digested): only FreezepackError escapes."""
    import os


    path = os.path.join(os.path.dirname(__file__), "..", "spec", "vectors", "fpk", "v2_values.fpk")
    fuzz_resigned(tmp_path, open(path, "rb").read(), seed=11, max_changes=3)


def test_cli_finetune_needs_kmeans(tmp_path):
    r = CliRunner().invoke(cli, ["train", "--values", "bf16", "--finetune", "1", "--out", str(tmp_path / "x.fpk")])
    assert r.exit_code != 0 and "kmeans" in r.output and not (tmp_path / "x.fpk").exists()


@pytest.mark.slow
def test_cli_train_with_kmeans_and_finetuning_stores_what_it_tested(tmp_path):
    out = tmp_path / "k3.fpk"
    r = CliRunner().invoke(cli, ["train", "--q", "0.99", "--epochs", "1", "--values", "kmeans:3", "--finetune", "1",
                                 "--out", str(out), "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    import json

    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["values"] == "kmeans:3" and 0.5 < res["stored_test_acc"] <= 1.0
    assert freezepack.verify(out)["ok"] and freezepack.inspect(out)["values"] == "kmeans:3"
    from freezepack.experiments.models import make_model

    m = freezepack.load_freezenet(make_model("lenet5"), out)
    for name in frozen_parametrizations(m):
        mod, _, attr = name.rpartition(".")
        assert torch.unique(m.get_submodule(mod).parametrizations[attr].original).numel() <= 8


@pytest.mark.parametrize("coding", ["int8", "uniform:4", "kmeans:4", "bf16"])
def test_resaving_a_lossy_model_without_values_keeps_its_size(bag, coding, tmp_path):
    """The writer finds the codebook (and a uniform grid) by itself: a loaded lossy file re-saved losslessly is
    the same model and no larger (only the metadata record of the coding is gone)."""
    from freezepack.testing.models import BagModel

    a, b = tmp_path / "a.fpk", tmp_path / "b.fpk"
    freezepack.save(a, bag[0], values=coding)
    freezepack.save(b, freezepack.load_freezenet(BagModel(), a))
    assert b.stat().st_size <= a.stat().st_size
    sa, sb = freezepack.load(a), freezepack.load(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if coding in ("int8", "uniform:4"):
        with fpreader.open_file(b) as r:
            assert any((r.part_coding(e.values_key) or "").startswith("codebook") for e in r.header.entries
                       if e.kind == "frozen")
