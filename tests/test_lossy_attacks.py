"""Lossy values under attack: inputs a demanding user or a hostile file brings (review findings, each a test)."""
from __future__ import annotations

import copy

import pytest
import torch

import freezepack
from freezepack import MethodError, UsageError
from freezepack.method.freezenet import dense_state_dict, frozen_parametrizations
from freezepack.method.quantize import ValueCoding, quantize, quantize_model
from freezepack.testing.models import trained
from freezepack.testing.v2 import body_with_whole, codebook_head


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
    with pytest.raises(MethodError, match="NaN or infinite.*allow_nonfinite") as err:  # refused by default
        freezepack.save(tmp_path / "m.fpk", model, values=coding)
    assert err.value.tensor is not None
    with pytest.raises(UsageError, match="NaN or an infinity") as err:  # and no lossy coding can hold them
        freezepack.save(tmp_path / "m.fpk", model, values=coding, allow_nonfinite=True)
    assert err.value.tensor is not None
    assert not list(tmp_path.iterdir())
    freezepack.save(tmp_path / "m.fpk", model, allow_nonfinite=True)  # lossless, when asked, keeps what it is given
    assert freezepack.verify(tmp_path / "m.fpk")["ok"]


# ------------------------------------------------------------------------------------------------ hostile files
def _hostile(tmp_path, block, payload=b"", dtype="F32", n=8):
    p = tmp_path / "t.fpk"
    p.write_bytes(body_with_whole(block, payload, dtype, n))
    return p


def _zz(*vs):
    from freezepack.format.v2 import wire

    o = wire.Out()
    for i, v in enumerate(vs):
        o.var(wire.zigzag(v) if i == 0 else v)
    return bytes(o.b)


def test_grid_whose_values_overflow_is_a_quiet_format_error(tmp_path):
    import struct
    import warnings

    from freezepack import FormatError

    p = _hostile(tmp_path, codebook_head(1, 2, struct.pack("<f", 3e38) + _zz(1, 0), [4, 4], 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was a numpy RuntimeWarning (an exception under -W error)
        with pytest.raises(FormatError, match="not finite") as err:
            freezepack.load(p)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("case", ["grid256_edge", "grid_gaps_past_2_24", "counts_overflow", "stream_past_end",
                                  "stream_not_words", "huge_n"])
def test_hostile_codebook_blocks_are_format_errors_naming_the_file(case, tmp_path):
    import struct

    import numpy as np

    from freezepack import FormatError

    M, n = 1 << 24, 8
    half = struct.pack("<ff", 0.5, 1.0)
    block = {
        # 256 levels ending at 2^24 + 1: the last one is out of range
        "grid256_edge": codebook_head(1, 256, struct.pack("<f", 0.5) + _zz(M - 254, *[0] * 255), [1] * 256, 0),
        "grid_gaps_past_2_24": codebook_head(1, 256, struct.pack("<f", 0.5) + _zz(-M, *[2 * M] * 255), [1] * 256),
        "counts_overflow": codebook_head(0, 256, np.arange(256, dtype="<u4").tobytes(), [(1 << 64) - 1] * 256),
        "stream_past_end": codebook_head(0, 2, half, [4, 4], 32),
        "stream_not_words": codebook_head(0, 2, half, [4, 4], 3),
        "huge_n": codebook_head(0, 1, struct.pack("<f", 0.5)),
    }[case]
    if case.startswith("grid256") or case.startswith("grid_gaps"):
        n = 256
    if case == "huge_n":
        n = 1 << 33
    p = _hostile(tmp_path, block, b"\x01\x02\x03" if case == "stream_not_words" else b"", n=n)
    with pytest.raises(FormatError) as err:
        freezepack.load(p)
    assert err.value.path is not None and str(p) in str(err.value)
    try:  # verify: a header that cannot be trusted raises, a tensor that fails is reported
        assert not freezepack.verify(p)["ok"]
    except FormatError as e:
        assert str(p) in str(e)


def test_stored_nan_codebooks_and_f16_nan_payloads_are_kept_bit_exact(tmp_path):
    """A table of NaN bit patterns and F16 NaN/inf payloads under 'cast' are legal: the reader must return them
    bit for bit (a float compare would lose them)."""
    import numpy as np

    from freezepack.format import dtypes, entropy
    from freezepack.format.v2 import wire

    table = np.array([0x7FC00000, 0x7FC00001], dtype="<u4")
    sym = np.array([0, 1, 1, 0, 0, 1, 0, 1])
    pay = entropy.encode_symbols(sym, [4, 4])
    got = freezepack.load(_hostile(tmp_path, codebook_head(0, 2, table.tobytes(), [4, 4], len(pay)), pay))["x"]
    assert got.numpy().view("<u4").tolist() == table[sym].tolist()
    h = np.array([0x7E01, 0x7C01, 0xFC00, 0x7C00] * 2, dtype="<u2")
    cast = bytes([wire.VALUE_CODERS.index("cast"), dtypes.DTYPES.index("F16"), 0])
    got = freezepack.load(_hostile(tmp_path, cast, h.tobytes()))["x"]
    assert got.numpy().view("<u4").tolist() == h.view("<f2").astype("<f4").view("<u4").tolist()


# ------------------------------------------------------------------------------------------------ re-coding
@pytest.mark.parametrize("coding", ["int8", "uniform:3", "kmeans:3", "bf16", "f16"])
def test_recoding_a_lossy_file_with_its_own_coding_changes_nothing(bag, coding, tmp_path):
    from freezepack.conversion import convert_checkpoint

    a, b, c = tmp_path / "a.fpk", tmp_path / "b.fpk", tmp_path / "c.fpk"
    freezepack.save(a, bag, values=coding)
    convert_checkpoint(a, b, freezepack.inspect(a)["seed"], values=coding)
    assert b.read_bytes() == a.read_bytes()  # same values, and the metadata does not say "int8, then int8"
    from freezepack.testing.models import BagModel

    fresh = freezepack.load_freezenet(BagModel(), a)
    freezepack.save(c, fresh, values=coding)  # load, then re-save: a quantized model is a fixed point
    assert c.read_bytes() == a.read_bytes()


def test_recoding_chain_records_each_different_step_once(bag, tmp_path):
    from freezepack.conversion import convert_checkpoint

    src = tmp_path / "0.fpk"
    freezepack.save(src, bag, values="kmeans:4")
    for i, coding in enumerate(["int8", "int8", None, "bf16", "bf16"]):
        dst = tmp_path / f"{i + 1}.fpk"
        convert_checkpoint(src, dst, freezepack.inspect(src)["seed"], values=coding)
        src = dst
    assert freezepack.inspect(src)["values"] == "kmeans:4, then uniform:8, then bf16"
    assert freezepack.verify(src)["ok"]


def test_bf16_coding_of_a_float16_tensor_never_makes_an_infinity():
    v = torch.tensor([65504.0, 1.0], dtype=torch.float16)  # bf16 rounds 65504 to 65536: inf as float16
    with pytest.raises(UsageError, match="bf16 range"):
        quantize(v, "bf16")
    q, _ = quantize(torch.tensor([65000.0, -3.0], dtype=torch.float16), "bf16")
    assert q.dtype == torch.float16 and torch.isfinite(q).all()


# ------------------------------------------------------------------------------------------------ fleet
def test_fleet_ships_lossy_releases_bit_exact_and_fetches_only_changed_payloads(tmp_path):
    pytest.importorskip("tuf")
    import hashlib

    from freezepack.testing.fleet import Fleet, record

    fleet = Fleet(tmp_path / "fleet")
    a, b = tmp_path / "a.fpk", tmp_path / "b.fpk"
    freezepack.save(a, record(), version=2, values="int8")
    freezepack.save(b, record(head_seed=1), version=2, values="int8")  # only fc3's values differ
    for path, fetched_most in ((a, None), (b, 0.5)):
        fleet.publish(path)
        r = fleet.install()
        assert r.status == "installed"
        got = open(r.path, "rb").read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(path.read_bytes()).digest()
        assert freezepack.inspect(r.path)["values"] == "uniform:8" and freezepack.verify(r.path)["ok"]
        if fetched_most is not None:
            assert r.fetched_bytes < fetched_most * r.full_bytes


def test_kmeans_counts_signed_zeros_as_two_stored_values():
    v = torch.tensor([-0.0, 0.0, 0.5, 0.5])
    q, _ = quantize(v, "kmeans:1")  # 3 bit patterns > 2: clustered, not kept
    assert torch.unique(q.view(torch.int32)).numel() <= 2


def test_writer_tries_cast_on_values_beyond_f16_without_warnings():
    import warnings

    import numpy as np

    from freezepack.format import dtypes
    from freezepack.format.v2 import writer as v2_writer

    v = np.array([3e38, 1.0, 0.5, float("nan")], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was "overflow encountered in cast": an exception under -W error
        head, payload, coder = v2_writer._value_block(v.tobytes(), "F32")
    assert coder != "cast" or head[1] == dtypes.DTYPES.index("BF16")


@pytest.mark.parametrize("coding", ["bf16", "int8", "uniform:3", "kmeans:3"])
def test_freezenet_wd_scale_and_float16_models_store_exactly_the_quantized_model(bag, coding, tmp_path):
    for dtype in (torch.float32, torch.float16):
        model = copy.deepcopy(bag).to(dtype)
        for p in frozen_parametrizations(model).values():
            p.set_frozen_scale(0.75)  # FreezeNet-WD: frozen part decayed
        path = tmp_path / f"{dtype}.fpk"
        freezepack.save(path, model, values=coding)
        want = copy.deepcopy(model)
        quantize_model(want, coding)
        sd, ref = freezepack.load(path), dense_state_dict(want)
        assert all(torch.equal(sd[k], ref[k]) for k in ref) and freezepack.verify(path)["ok"]
        info = freezepack.inspect(path)
        assert {t["frozen_scale"] for t in info["tensors"] if t["kind"] == "frozen"} == {0.75}


@pytest.mark.parametrize("coder", ["codebook", "codebook1", "cast:BF16", "cast:F16"])
def test_value_decoders_write_the_dense_bytes_once(coder, tmp_path):
    """A tiny file can expand up to the reader's max_dense_bytes: decoding must not need several times that
    (was 2-4x: widened temporaries, astype/tobytes/bytearray copies, 8-byte take() indices)."""
    import struct
    import tracemalloc

    import numpy as np

    from freezepack.format import dtypes, entropy
    from freezepack.format.reader import open_file
    from freezepack.format.v2 import wire

    n = 1 << 22
    if coder == "codebook":
        sym = np.random.default_rng(0).integers(0, 2, n)
        counts = np.bincount(sym).tolist()
        payload = entropy.encode_symbols(sym, counts)
        block = codebook_head(0, 2, struct.pack("<ff", 0.5, 1.0), counts, len(payload))
    elif coder == "codebook1":
        block, payload = codebook_head(0, 1, struct.pack("<f", 0.5)), b""
    else:
        block = bytes([wire.VALUE_CODERS.index("cast"), dtypes.DTYPES.index(coder[5:]), 0])
        payload = np.full(n, 0x3C00, "<u2").tobytes()  # 1.0 as F16, 1.875 as BF16 (before widening)
    p = _hostile(tmp_path, block, payload, n=n)
    with open_file(p) as r:
        e = r.header.entries[0]
        tracemalloc.start()
        try:
            got = r.whole_bytes(e)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert len(got) == 4 * n and peak < 1.6 * 4 * n  # the dense bytes + (cast) the 2-byte half
    if coder.startswith("cast"):
        want = np.float32(1.0) if coder == "cast:F16" else np.uint32(0x3C00 << 16).view(np.float32)
        assert (np.frombuffer(got, "<f4") == want).all()


@pytest.mark.parametrize("coding", [ValueCoding("uniform", 30), ValueCoding("foo"), ValueCoding("kmeans", 0),
                                    ValueCoding("kmeans", 20)])
def test_hand_made_value_codings_are_checked_like_text(coding, bag, tmp_path):
    with pytest.raises(UsageError, match="unknown values coding"):
        quantize(torch.randn(10), coding)  # was an AssertionError, or a silent 2-value k-means
    with pytest.raises(UsageError):
        freezepack.save(tmp_path / "m.fpk", bag, values=coding)
    assert not list(tmp_path.iterdir())
    assert ValueCoding.parse(ValueCoding("uniform", 8)) == ValueCoding.parse("int8")


# ------------------------------------------------------------------------------------------------ odd tensors
def _odd_record():
    from freezepack.format.init import make_init
    from freezepack.format.record import FreezeRecord, FrozenTensor

    shape = (6, 10)
    masks = {"empty": torch.zeros(shape, dtype=torch.bool), "one": torch.zeros(shape, dtype=torch.bool),
             "equal": torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.5,
             "few": torch.rand(shape, generator=torch.Generator().manual_seed(2)) < 0.3}
    masks["one"][2, 3] = True
    vals = {"empty": torch.zeros(0), "one": torch.tensor([0.3]),
            "equal": torch.full((int(masks["equal"].sum()),), -0.0625),
            "few": torch.tensor([0.1, -0.2, 0.1])[torch.arange(int(masks["few"].sum())) % 3]}  # 2 values, K = 8
    frozen = {k: FrozenTensor(make_init("kaiming_uniform", shape), masks[k], vals[k]) for k in masks}
    return FreezeRecord(11, frozen=frozen, whole={"bias": torch.zeros(6)})


@pytest.mark.parametrize("coding", ["bf16", "f16", "int8", "uniform:2", "kmeans:1", "kmeans:8"])
def test_empty_single_all_equal_and_few_valued_tensors_with_every_coding(coding, tmp_path):
    rec = _odd_record()
    a, b = tmp_path / "a.fpk", tmp_path / "b.fpk"
    freezepack.save(a, rec, values=coding)
    freezepack.save(b, rec, values=coding)
    assert a.read_bytes() == b.read_bytes()  # deterministic
    assert freezepack.verify(a)["ok"]
    sd = freezepack.load(a)
    for name, ft in rec.frozen.items():
        got = sd[name][ft.mask]
        want = quantize(ft.values, coding)[0]
        assert torch.equal(got, want), name
    if coding.startswith("kmeans"):  # 2 distinct values <= 2**K: kept exactly
        assert torch.equal(sd["few"][rec.frozen["few"].mask], rec.frozen["few"].values)
    assert torch.unique(sd["equal"][rec.frozen["equal"].mask]).numel() == 1


def test_lossy_save_through_data_parallel_and_compile_wrappers(bag, tmp_path):
    want = copy.deepcopy(bag)
    quantize_model(want, "kmeans:3")
    ref = dense_state_dict(want)
    for i, wrapped in enumerate((torch.nn.DataParallel(bag), torch.compile(bag))):
        p = tmp_path / f"{i}.fpk"
        freezepack.save(p, wrapped, values="kmeans:3")
        sd = freezepack.load(p)
        assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------------------ reports
def test_verify_and_convert_reports_say_when_values_are_lossy(bag, tmp_path):
    import json

    from click.testing import CliRunner

    from freezepack.cli import cli
    from freezepack.conversion import convert_checkpoint

    src, dst = tmp_path / "m.fpk", tmp_path / "k.fpk"
    freezepack.save(src, bag)
    assert freezepack.verify(src)["values"] is None
    report = convert_checkpoint(src, dst, freezepack.inspect(src)["seed"], values="int8")
    assert report["values"] == "uniform:8" and freezepack.verify(dst)["values"] == "uniform:8"
    assert convert_checkpoint(src, tmp_path / "f.fpk", 7, values="f32")["values"] is None
    r = CliRunner().invoke(cli, ["verify", str(dst)])
    assert r.exit_code == 0 and "lossy: uniform:8" in r.output
    r = CliRunner().invoke(cli, ["verify", "--json", str(dst)])
    assert json.loads(r.stdout)["values"] == "uniform:8"
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "c.fpk"), "--values", "kmeans:2"])
    assert r.exit_code == 0 and "quantized (kmeans:2, lossy)" in r.output  # not a bare "verified bit-exact"
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "d.fpk")])
    assert r.exit_code == 0 and "lossy" not in r.output and "verified bit-exact" in r.output


@pytest.mark.parametrize("coding,top", [("int8", 127), ("uniform:4", 7)])
def test_values_already_on_a_foreign_grid_are_kept_exactly(coding, top, tmp_path):
    """A grid whose step s is not a fixed point of step = fl32(fl32(top * s) / top) (e.g. int8 from another
    quantizer) used to move by an ulp on every re-quantization; it is kept, and stored as that grid."""
    import numpy as np

    from freezepack.format import entropy
    from freezepack.format.v2 import writer as v2_writer

    cand = (np.random.default_rng(0).random(20000) + 1.0).astype(np.float32) * np.float32(2 ** -8)
    amax = (np.float32(top) * cand).astype(np.float32)
    foreign = cand[(amax.astype(np.float64) / top).astype(np.float32) != cand]
    assert foreign.size  # such steps exist
    levels = np.random.default_rng(1).integers(-top, top + 1, 500)
    levels[0] = top
    for s in foreign[:20]:
        v = torch.from_numpy(entropy.grid_values(levels, float(s)))
        q, hint = quantize(v, coding)
        assert torch.equal(q.view(torch.int32), v.view(torch.int32)) and hint == {"step": float(s)}
    block = v2_writer._value_block(v.numpy().tobytes(), "F32", hint["step"])
    assert block[2] == "codebook" and block[0][1] == 1  # the grid form


def test_convert_says_when_values_had_nothing_to_quantize(bag, tmp_path):
    from safetensors.torch import save_file

    from freezepack.conversion import convert_checkpoint

    src = tmp_path / "half.safetensors"  # with a wrong seed nothing is found frozen, so nothing to quantize
    save_file({k: v.half().contiguous() for k, v in dense_state_dict(bag).items()}, src)
    report = convert_checkpoint(src, tmp_path / "h.fpk", 12345, values="kmeans:3")
    assert any("changed nothing" in h for h in report["hints"])
    f32 = tmp_path / "m.fpk"
    freezepack.save(f32, bag)
    report = convert_checkpoint(f32, tmp_path / "k.fpk", freezepack.inspect(f32)["seed"], values="kmeans:3")
    assert not any("changed nothing" in h for h in report["hints"])
