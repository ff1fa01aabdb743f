"""freezepack.format.rules: each rule on what a header means refuses a file of either version the same way, with a
FreezepackError naming the file and the tensor; plus the hostile inputs the one rule set was built for.

The files are written from typed headers by the version's own writer, with v1's self-check turned off (a writer
never publishes what its reader refuses; here it must, so that the reader's refusal can be seen).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import freezepack
from freezepack.errors import FormatError, SpecError
from freezepack.format import rules
from freezepack.format.init import InitSpec, make_init
from freezepack.format.model import AliasEntry, FrozenEntry, Header, Limits
from freezepack.format.reader import open_file
from freezepack.format.record import FreezeRecord, FrozenTensor
from freezepack.format.v1 import writer as v1_writer
from freezepack.format.v2 import writer as v2_writer
from freezepack.format.writer import encode_file
from freezepack.testing.v2 import body_rest, name_bomb, resigned

VERSIONS = [1, 2]
DIGEST = "ab" * 32
INIT = make_init("xavier_normal", (4, 4))


def frozen(name="w", shape=(4, 4), dtype="F32", init=INIT, scale=1.0, stream=None) -> FrozenEntry:
    """An all-frozen tensor (const mask, nothing stored): only its header fields can be wrong."""
    return FrozenEntry(name, shape, dtype, DIGEST, init, scale, 0, "const", {}, 0, stream)


def write(path, version, entries, monkeypatch, metadata=None, parts=None):
    monkeypatch.setattr(v1_writer, "parse_header", lambda *a, **k: None)  # publish what the reader must refuse
    h = Header(seed=5, entries=tuple(entries), metadata=metadata or {}, producer="test_rules", version=version)
    path.write_bytes(b"".join(encode_file(h, parts or {}, version)))
    return path


def refused(path, err=FormatError, match="", tensor=None, limits=None):
    with pytest.raises(err, match=match) as e:
        with open_file(path, limits or Limits()):
            pass
    assert e.value.path == str(path), "the error names the file"
    assert e.value.tensor == tensor, "the error names the tensor"
    return e.value


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["", "__metadata__"])
def test_reserved_or_empty_names(tmp_path, monkeypatch, version, name):
    p = write(tmp_path / "f.fpk", version, [frozen(name)], monkeypatch)
    refused(p, FormatError, "invalid tensor name")


@pytest.mark.parametrize("version", VERSIONS)
def test_a_name_twice(tmp_path, monkeypatch, version):
    p = write(tmp_path / "f.fpk", version, [frozen("w"), frozen("w")], monkeypatch)
    refused(p, FormatError, "appears twice", tensor="w")


@pytest.mark.parametrize("version", VERSIONS)
def test_alias_of_an_alias(tmp_path, monkeypatch, version):
    entries = [frozen("w"), AliasEntry("a", "w"), AliasEntry("b", "w")]
    p = write(tmp_path / "f.fpk", version, entries, monkeypatch)
    data = p.read_bytes()
    if version == 1:  # edit the JSON
        from freezepack.testing import rewrite

        def lie(h):
            h["tensors"][2]["of"] = "a"
        p.write_bytes(rewrite(data, lie))
    else:  # the last byte of a payload-free body is b's target index j (0-based, counting every entry): 0 -> 1
        rest = bytearray(body_rest(data))
        assert rest[-1] == 0
        rest[-1] = 1
        p.write_bytes(resigned(data, bytes(rest)))
    refused(p, FormatError, "not an earlier non-alias", tensor="b")


def test_v1_alias_of_a_later_tensor(tmp_path, monkeypatch):
    p = write(tmp_path / "f.fpk", 1, [AliasEntry("a", "w"), frozen("w")], monkeypatch)
    refused(p, FormatError, "not an earlier non-alias", tensor="a")


@pytest.mark.parametrize("version", VERSIONS)
def test_frozen_dtype(tmp_path, monkeypatch, version):
    p = write(tmp_path / "f.fpk", version, [frozen(dtype="I32")], monkeypatch)
    refused(p, FormatError, "not allowed for a frozen tensor", tensor="w")


@pytest.mark.parametrize("version", VERSIONS)
def test_one_dimension_is_bounded_even_with_a_zero_beside_it(tmp_path, monkeypatch, version):
    """[0, 2**60] holds no element, yet no reader should accept a dimension of 2**60 (a zero would otherwise let
    the others be anything, up to numbers a float64 reader cannot even hold)."""
    p = write(tmp_path / "f.fpk", version, [frozen(shape=(0, 1 << 60))], monkeypatch)
    refused(p, FormatError, "a dimension", tensor="w")


@pytest.mark.parametrize("version", VERSIONS)
def test_elements_of_all_tensors(tmp_path, monkeypatch, version):
    p = write(tmp_path / "f.fpk", version, [frozen("a"), frozen("b")], monkeypatch)
    refused(p, FormatError, "max_total_elements", tensor="b", limits=Limits(max_total_elements=20))
    with open_file(p, Limits(max_total_elements=32)):
        pass


@pytest.mark.parametrize("version", VERSIONS)
def test_frozen_scale_exact_in_its_dtype(tmp_path, monkeypatch, version):
    scale = float(np.float32(0.1))  # a float32 number, but no F16 one
    p = write(tmp_path / "f.fpk", version, [frozen(dtype="F16", scale=scale)], monkeypatch)
    refused(p, FormatError, "not exactly a F16 number", tensor="w")


@pytest.mark.parametrize("version", VERSIONS)
def test_stream_only_when_it_differs_from_the_name(tmp_path, monkeypatch, version):
    p = write(tmp_path / "f.fpk", version, [frozen(stream="")], monkeypatch)
    refused(p, FormatError, "stream must be given only when it differs", tensor="w")


KAIMING = make_init("kaiming_uniform", (4, 4))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("params,match", [
    ({"a": 0.0, "mode": "fan_sideways", "nonlinearity": "relu"}, "mode='fan_sideways'.*not one of"),
    ({"a": 0.0, "mode": "fan_in", "nonlinearity": "swish"}, "nonlinearity='swish'.*not one of"),
    ({"a": 0.0, "mode": "fan_in", "nonlinearity": "relu", "extra": 1.0}, "must be exactly"),
    ({"a": 0.0, "mode": "fan_in"}, "must be exactly"),
    ({"a": 0, "mode": "fan_in", "nonlinearity": "relu"}, "must be exactly"),  # 0 is no float
])
def test_init_params_are_checked_alike(tmp_path, monkeypatch, version, params, match):
    init = InitSpec(KAIMING.name, KAIMING.dist, KAIMING.a, KAIMING.b, params)
    p = write(tmp_path / "f.fpk", version, [frozen(init=init)], monkeypatch)
    refused(p, SpecError, match, tensor="w")


def test_v2_init_params_text_must_be_canonical(tmp_path, monkeypatch):
    init = InitSpec(KAIMING.name, KAIMING.dist, KAIMING.a, KAIMING.b,
                    {"a": 0.5, "mode": "fan_in", "nonlinearity": "relu"})
    monkeypatch.setattr(v2_writer, "canonical_json", lambda v: json.dumps(v))  # spaces after ':' and ','
    p = write(tmp_path / "f.fpk", 2, [frozen(init=init)], monkeypatch)
    refused(p, FormatError, "not canonical", tensor="w")


@pytest.mark.parametrize("version", VERSIONS)
def test_unknown_initializer(tmp_path, monkeypatch, version):
    init = InitSpec("xavier_normal", "normal", 0.0, 0.5, {"gain": 1.0})
    p = write(tmp_path / "f.fpk", version, [frozen(init=init)], monkeypatch)
    with open_file(p):  # the valid twin opens
        pass
    if version == 1:
        from freezepack.testing import rewrite

        p.write_bytes(rewrite(p.read_bytes(), lambda h: h["tensors"][0]["init"].update(name="lecun")))
        refused(p, SpecError, "unknown initializer", tensor="w")
    else:  # v2 names initializers by code: an unknown code is refused by the parser
        rest = bytearray(body_rest(p.read_bytes()))
        i = rest.index(bytes([0, 0, 0, 0]) + bytes.fromhex("0000003f"))  # init a = 0.0, b = 0.5 follow the code
        rest[i - 1] = 60 << 2
        p.write_bytes(resigned(b"", bytes(rest)))
        refused(p, SpecError, "unknown initializer code", tensor="w")


@pytest.mark.parametrize("version", VERSIONS)
def test_metadata_is_measured_one_way(tmp_path, monkeypatch, version):
    """The UTF-8 bytes of every key and value, in both versions (spec §5): non-ASCII text counts its UTF-8 bytes, not
    the \\uXXXX escapes of v1's JSON (v1 used to measure those, so a limit between the two measures refused a v1
    file whose v2 twin loaded)."""
    meta = {"k": "\u00e9" * 100, "\u20ac": "x"}
    size = rules.metadata_bytes(meta)
    assert size == 1 + 200 + 3 + 1
    p = write(tmp_path / "f.fpk", version, [frozen()], monkeypatch, metadata=meta)
    with open_file(p, Limits(max_metadata_bytes=size)):
        pass
    refused(p, FormatError, "metadata: UTF-8 bytes", limits=Limits(max_metadata_bytes=size - 1))


def test_a_newer_version_says_upgrade(tmp_path):
    import struct

    from freezepack.format.strictjson import canonical_json

    text = canonical_json({"__metadata__": {"freezepack": "3"},
                           "freezepack": {"dtype": "U8", "shape": [40], "data_offsets": [0, 40]}}).encode()
    text += b" " * (-(8 + len(text)) % 8)
    p = tmp_path / "v3.fpk"
    p.write_bytes(struct.pack("<Q", len(text)) + text + bytes(40))
    refused(p, FormatError, "newer than this reader's .*upgrade freezepack")
    with pytest.raises(FormatError, match="upgrade freezepack"):
        freezepack.inspect(p)


def test_which_error_wins_is_the_rules_order():
    """Of two defects the rules' order decides (module docstring, spec §12.9): name, shape, then the frozen dtype."""
    h = Header(seed=1, entries=(frozen("", dtype="I32"),), version=2)
    with pytest.raises(FormatError, match="invalid tensor name"):
        rules.check_header(h, Limits())
    h = Header(seed=1, entries=(frozen("w", dtype="I32", shape=(0, 1 << 60)),), version=2)
    with pytest.raises(FormatError, match="a dimension"):
        rules.check_header(h, Limits())
    h = Header(seed=1, entries=(frozen("w", dtype="I32", stream=""),), version=2)
    with pytest.raises(FormatError, match="not allowed for a frozen tensor"):
        rules.check_header(h, Limits())


@pytest.mark.parametrize("version", VERSIONS)
def test_the_first_entry_s_defect_wins(tmp_path, monkeypatch, version):
    """v2 applies each rule as it reads the field (byte order), v1 after its JSON, in entry order: either way the
    earlier entry's defect is the one reported."""
    p = write(tmp_path / "f.fpk", version, [frozen("a", stream=""), frozen("b", dtype="I32")], monkeypatch)
    refused(p, FormatError, "stream must be given", tensor="a")


# ------------------------------------------------------------------------------------------------ hostile input

def test_v2_name_bomb_is_refused_before_the_names_are_built(tmp_path):
    """Front-coded names: 4000 aliases whose names share a 60,000-byte prefix cost ~100 KB of file and would cost
    240 MB of names; every derived size is bounded (<= the body again + 64 MiB) before it is allocated."""
    p = tmp_path / "bomb.fpk"
    p.write_bytes(name_bomb(4000, 60_000))
    assert p.stat().st_size < 200_000
    e = refused(p, FormatError, "tensor names are longer in all than the file can justify")
    assert e.tensor is None
    with pytest.raises(FormatError, match="names are longer"):
        freezepack.load(p, device="meta")
    with pytest.raises(FormatError, match="names are longer"):
        freezepack.inspect(p)


def test_long_shared_names_within_the_bound_still_load(tmp_path):
    p = tmp_path / "ok.fpk"
    p.write_bytes(name_bomb(100, 60_000))  # 6 MB of names from ~60 KB: within the 64 MiB allowance
    sd = freezepack.load(p)
    assert len(sd) == 100 and all(int(t) == 7 for t in sd.values())


def test_inspect_of_a_name_bomb_is_one_line_in_the_cli(tmp_path):
    from click.testing import CliRunner

    from freezepack.cli import cli

    p = tmp_path / "bomb.fpk"
    p.write_bytes(name_bomb(4000, 60_000))
    r = CliRunner().invoke(cli, ["inspect", str(p)])
    assert r.exit_code != 0 and "Traceback" not in r.output and "names are longer" in r.output


def _tied_file(tmp_path, b_out=3):
    """A file whose 'b.weight' is tied to a [10, 20] 'a.weight' (and 'b.bias' has ``b_out`` entries)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(10, 20, generator=g) < 0.3
    rec = FreezeRecord(seed=3, frozen={"a.weight": FrozenTensor(make_init("xavier_normal", (10, 20)), mask,
                                                                torch.randn(int(mask.sum()), generator=g))},
                       whole={"a.bias": torch.zeros(10), "b.bias": torch.zeros(b_out)},
                       aliases={"b.weight": "a.weight"})
    p = tmp_path / "tied.fpk"
    freezepack.save(p, rec)
    return p


class _Two(torch.nn.Module):
    def __init__(self, b_in=5, b_out=3):
        super().__init__()
        self.a = torch.nn.Linear(20, 10)
        self.b = torch.nn.Linear(b_in, b_out)


@pytest.mark.parametrize("loader", ["load_into", "load_freezenet"])
def test_an_alias_that_does_not_fit_is_refused_by_both_loaders(tmp_path, loader):
    """The file's 'b.weight' is [10, 20]; the module's is [3, 5]: refused, and the module is left as it was."""
    p = _tied_file(tmp_path)
    m = _Two()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(FormatError, match=r"shape \[10, 20\] does not fit the module's \[3, 5\]") as e:
        getattr(freezepack, loader)(m, p)
    assert e.value.tensor == "b.weight" and e.value.path == str(p)
    assert m.b.weight.shape == (3, 5)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_a_fitting_alias_is_tied_again(tmp_path):
    p = _tied_file(tmp_path, b_out=10)
    m = freezepack.load_freezenet(_Two(b_in=20, b_out=10), p)
    assert m.b.parametrizations.weight.original is m.a.parametrizations.weight.original  # one trained Parameter
    assert torch.equal(m.b.weight, m.a.weight)


def _names_file(tmp_path, names):
    rec = FreezeRecord(seed=1, whole={n: torch.full((2,), float(i)) for i, n in enumerate(names)})
    p = tmp_path / "names.fpk"
    freezepack.save(p, rec)
    return p


class _Fc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Module()
        self.fc.register_buffer("weight", torch.zeros(2))


@pytest.mark.parametrize("loader", ["load_into", "load_freezenet"])
@pytest.mark.parametrize("strict", [True, False])
def test_two_file_tensors_for_one_module_tensor_is_a_collision(tmp_path, loader, strict):
    """'fc.weight' and 'module.fc.weight' would both fill the module's fc.weight: an error, never "later wins"."""
    p = _names_file(tmp_path, ["fc.weight", "module.fc.weight"])
    kw = {"strict": strict} if loader == "load_into" else {}
    with pytest.raises(FormatError, match="would both fill the module's 'fc.weight'") as e:
        getattr(freezepack, loader)(_Fc(), p, **kw)
    assert e.value.path == str(p)


def test_exact_names_win_over_wrapper_prefixes(tmp_path):
    p = _names_file(tmp_path, ["module.fc.weight"])  # saved from a DataParallel model
    m = _Fc()
    freezepack.load_into(m, p)
    assert m.fc.weight.tolist() == [0.0, 0.0]
    p = _names_file(tmp_path, ["fc.weight"])
    freezepack.load_into(m, p)


def test_a_prefix_map_that_maps_two_names_to_one_is_a_collision(tmp_path):
    p = _names_file(tmp_path, ["old.weight", "older.weight"])
    m = torch.nn.Module()
    m.register_buffer("weight", torch.zeros(2))
    with pytest.raises(FormatError, match="collision"):
        freezepack.load_into(m, p, prefix_map={"old.": "", "older.": ""}, strict=False)
    m2 = torch.nn.Module()
    m2.register_buffer("weight", torch.zeros(2))
    freezepack.load_into(m2, _names_file(tmp_path, ["old.weight"]), prefix_map={"old.": ""})
    assert m2.weight.tolist() == [0.0, 0.0]
