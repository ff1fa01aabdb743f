"""The file commands: readable output, --json for scripts, one-line errors and non-zero exits on bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import freezepack
from freezepack.cli import cli
from freezepack.testing import record_for, rewrite, small_record


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# the mask coders small_record's tensors get: v2's writer finds 'ans-bernoulli' cheaper where v1 picks 'ans-gaps'
CODERS = {1: {"ans-bernoulli", "ans-gaps"}, 2: {"ans-bernoulli"}}


@pytest.mark.parametrize("version", [1, 2])
def test_inspect_table_and_json_and_verify(tmp_path, version):
    p = tmp_path / "m.fpk"
    freezepack.save(p, small_record(), {"task": "test"}, version=version)
    r = run("inspect", p)
    assert r.exit_code == 0, r.output
    assert f"freezepack format v{version}," in r.output and "conv.weight" in r.output
    assert all(c in r.output for c in CODERS[version])
    assert "metadata task = test" in r.output and "compression factor" in r.output
    r = run("inspect", "--json", p)
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["seed"] == 11 and {t["name"] for t in info["tensors"]} >= {"conv.weight", "fc.bias"}
    assert info["format_version"] == version and info["metadata"] == {"task": "test"}
    assert run("verify", p).exit_code == 0


def test_verify_ok_and_mismatch(fpk):
    r = run("verify", fpk)
    assert r.exit_code == 0 and "OK" in r.output
    report = json.loads(run("verify", "--json", fpk).output)
    assert report["ok"] is True

    def lie(h):
        next(t for t in h["tensors"] if t["name"] == "fc.weight")["sha256"] = "cd" * 32

    fpk.write_bytes(rewrite(fpk.read_bytes(), lie))
    r = run("verify", fpk)
    assert r.exit_code == 1 and "fc.weight" in r.output and "Traceback" not in r.output
    r = run("verify", "--json", fpk)
    assert r.exit_code == 1 and json.loads(r.stdout)["failed"] == 1


def test_unpack_gives_a_dense_safetensors_file(fpk, tmp_path):
    out = tmp_path / "dense.safetensors"
    r = run("unpack", fpk, out)
    assert r.exit_code == 0, r.output
    dense = load_file(str(out))
    want = small_record().state_dict()
    assert set(dense) == set(want) and all(torch.equal(dense[k], want[k]) for k in want)


def test_unpack_streams_every_dtype_shape_and_metadata_as_safetensors_reads_them(tmp_path):
    """unpack writes the dense file tensor by tensor (its own safetensors header): every dtype, an empty and a
    0-d tensor, a tied name and non-ASCII metadata must come back through safetensors itself, equal to load()."""
    from safetensors import safe_open

    from freezepack.format.init import make_init
    from freezepack.format.record import FreezeRecord, FrozenTensor

    rec = FreezeRecord(seed=5)
    for name, dtype in (("f32.weight", torch.float32), ("f16.weight", torch.float16), ("bf16.weight", torch.bfloat16)):
        m = torch.zeros(6, 7, dtype=torch.bool)
        m[2, 3] = True
        rec.frozen[name] = FrozenTensor(make_init("kaiming_uniform", (6, 7)), m, torch.ones(1, dtype=dtype))
    rec.whole.update({"steps": torch.tensor(7, dtype=torch.int64), "flags": torch.tensor([True, False, True]),
                      "empty": torch.zeros(0, 3), "u8": torch.arange(5, dtype=torch.uint8), "caf\u00e9": torch.ones(2)})
    rec.aliases["head.weight"] = "f32.weight"
    src, out = tmp_path / "m.fpk", tmp_path / "d.safetensors"
    freezepack.save(src, rec, {"note": "\u00e9t\u00e9 \"quoted\""})
    r = run("unpack", src, out)
    assert r.exit_code == 0, r.output
    want = {k: v for k, v in freezepack.load(src).items() if k != "head.weight"}
    got = load_file(str(out))
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["note"] == "\u00e9t\u00e9 \"quoted\"" and "head.weight" in meta["freezepack.shared"]


def test_unpack_failing_midway_publishes_nothing(fpk, tmp_path):
    """A tensor that fails its digest while the stream is written: exit 1 naming it, no output, no temp file."""
    def lie(h):
        next(t for t in h["tensors"] if t["name"] == "fc.weight")["sha256"] = "cd" * 32

    fpk.write_bytes(rewrite(fpk.read_bytes(), lie))
    out = tmp_path / "out" / "d.safetensors"
    out.parent.mkdir()
    r = run("unpack", fpk, out)
    assert r.exit_code == 1 and "fc.weight" in r.output and "Traceback" not in r.output
    assert os.listdir(out.parent) == []


def test_convert_reports_and_roundtrips(tmp_path):
    rec = record_for({"a.weight": (50, 40), "a.bias": (50,)}, 0.95, seed=9)
    sd = rec.state_dict()
    src = tmp_path / "dense.safetensors"
    save_file(sd, str(src))
    r = run("convert", src, tmp_path / "c.fpk", "--seed", 9, "--meta", "by=test")
    assert r.exit_code == 0, r.output
    assert "a.weight: frozen, 100 of 2000 stored" in r.output and "verified bit-exact" in r.output
    assert freezepack.inspect(tmp_path / "c.fpk")["metadata"] == {"by": "test"}
    r = run("convert", src, tmp_path / "d.fpk", "--seed", 9, "--init-for", "a.weight=whole", "--json")
    assert r.exit_code == 0 and {t["stored_as"] for t in json.loads(r.stdout)["tensors"]} == {"whole"}
    r = run("convert", src, tmp_path / "e.fpk", "--seed", 9, "--init", "no_such_init")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "unknown initializer" in r.output


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_bad_inputs_give_one_line_and_exit_1(tmp_path, command):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    junk = tmp_path / "junk.fpk"
    junk.write_bytes(b"\xff" * 100)
    for path in (tmp_path / "missing.fpk", tmp_path, plain, junk):
        r = run(command, path)
        assert r.exit_code == 1, (path, r.output)
        assert r.output.startswith("error: ") and r.output.count("\n") == 1 and "Traceback" not in r.output


def test_help_teaches():
    for command in ("inspect", "verify", "unpack", "convert"):
        r = run(command, "--help")
        assert r.exit_code == 0 and "Example:" in r.output


def test_bad_device_is_one_line(fpk):
    r = run("unpack", "--device", "meta", fpk, fpk.with_suffix(".safetensors"))  # found by test_fuzz_files
    assert r.exit_code == 2 and "meta" in r.output and "Traceback" not in r.output
    r = run("verify", "--device", "meta", fpk)
    assert r.exit_code == 1 and r.output.startswith("error: ") and "meta" in r.output
    r = run("verify", "--device", "bogus", fpk)
    assert r.exit_code == 1 and r.output.startswith("error: ") and "not a torch device" in r.output
    if not torch.cuda.is_available():
        r = run("unpack", "--device", "cuda", fpk, fpk.with_suffix(".safetensors"))
        assert r.exit_code == 1 and "CUDA is not available" in r.output


# ---------------------------------------------------------------------------------------------------------------
# convert never lies; every refusal is one line
# ---------------------------------------------------------------------------------------------------------------

def _trained(shape, seed, name, changed, init="xavier_normal"):
    """A tensor still at its regenerated initial values except the entries selected by ``changed``."""
    from freezepack.format.init import generate, make_init

    t = generate(make_init(init, shape), shape, seed, name).clone()
    t.view(-1)[changed] = 0.5
    return t


def test_convert_prefix_of_trained_entries_gives_a_readable_file(tmp_path):
    """(an empty 'ans-gaps' stream: the trainable entries are a prefix) the file loads, bit for bit."""
    sd = {"w": _trained((60, 50), 4, "w", slice(0, 40))}
    src = tmp_path / "p.safetensors"
    save_file(sd, str(src))
    r = run("convert", src, tmp_path / "p.fpk", "--seed", 4)
    assert r.exit_code == 0, r.output
    with freezepack.open(tmp_path / "p.fpk") as f:
        assert f.entry("w").coder in ("ans-gaps", "ans-ctx")  # v1: an empty stream, no mask tensor (test_container)
    assert torch.equal(freezepack.load(tmp_path / "p.fpk")["w"], sd["w"])


def test_convert_publishes_nothing_its_reader_refuses(tmp_path, monkeypatch):
    import freezepack.conversion as conversion
    from freezepack.errors import FormatError

    sd = {"w": _trained((30, 20), 4, "w", slice(0, 500, 7))}
    src = tmp_path / "s.safetensors"
    save_file(sd, str(src))
    dst = tmp_path / "out"
    dst.mkdir()

    real_open = conversion.fpk_open

    def refusing_reader(path, *a, **k):  # refuses only the written temp file, which the proof reads back
        if os.path.basename(os.fspath(path)).startswith(".tmp"):
            raise FormatError("refused for the test", path=path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(conversion, "fpk_open", refusing_reader)
    r = run("convert", src, dst / "m.fpk", "--seed", 4)
    assert r.exit_code == 1 and "not written" in r.output and "refused for the test" in r.output
    assert os.listdir(dst) == []  # neither the file nor a temp file


def test_convert_picks_the_cheapest_exact_form(tmp_path):
    """A tensor with few frozen entries costs more frozen (mask + its header entries) than whole: convert stores
    it whole. The file convert writes is the smaller of the two real encodings."""
    from freezepack.api import encode_record
    from freezepack.format.init import make_init
    from freezepack.format.record import FreezeRecord, FrozenTensor

    # trained values are random (incompressible): v2 codes constant values to almost nothing
    sd = {"low_q.weight": torch.randn(100, 100, generator=torch.Generator().manual_seed(0)),
          "high_q.weight": _trained((100, 100), 1, "high_q.weight", slice(0, 10_000, 50))}
    regen = _trained((100, 100), 1, "low_q.weight", slice(0, 0))
    sd["low_q.weight"].view(-1)[::200] = regen.view(-1)[::200]  # 50 of 10 000 entries still at their init
    src = tmp_path / "s.safetensors"
    save_file(sd, str(src))
    report = json.loads(run("convert", src, tmp_path / "a.fpk", "--seed", 1, "--json").stdout)
    rows = {t["name"]: t for t in report["tensors"]}
    assert rows["low_q.weight"]["matched"] == 50
    assert rows["high_q.weight"]["stored_as"] == "frozen"
    assert report["file_bytes"] == os.path.getsize(tmp_path / "a.fpk")
    # whichever form it chose for low_q, the alternative, encoded by the real writer, is not smaller
    mask = torch.ones(100, 100, dtype=torch.bool)
    mask.view(-1)[::200] = False
    t = sd["low_q.weight"]
    for version in (1, 2):
        rec = FreezeRecord(seed=1)
        rec.frozen["low_q.weight"] = FrozenTensor(make_init("xavier_normal", (100, 100)), mask, t[mask].clone())
        as_frozen = sum(map(len, encode_record(rec, version=version)))
        rec = FreezeRecord(seed=1)
        rec.whole["low_q.weight"] = t
        as_whole = sum(map(len, encode_record(rec, version=version)))
        if version == 1:
            assert as_whole < as_frozen  # v1: a frozen tensor's header entries cost more than 50 values save
        else:
            chose_frozen = rows["low_q.weight"]["stored_as"] == "frozen"
            assert chose_frozen == (as_frozen < as_whole), (as_frozen, as_whole)
    # and forcing the other tensor whole makes the file larger
    forced = run("convert", src, tmp_path / "b.fpk", "--seed", 1, "--init-for", "high_q.weight=whole", "--json")
    assert report["file_bytes"] < json.loads(forced.stdout)["file_bytes"]


def test_convert_says_when_nothing_matched(tmp_path):
    sd = {"a.weight": _trained((50, 40), 9, "a.weight", slice(0, 2000, 20)), "a.bias": torch.randn(50)}
    src = tmp_path / "s.safetensors"
    save_file(sd, str(src), metadata={"origin": "lab", "epoch": "3"})
    r = run("convert", src, tmp_path / "good.fpk", "--seed", 9, "--meta", "epoch=4")
    assert r.exit_code == 0 and "warning" not in r.output and "smaller" in r.output
    assert freezepack.inspect(tmp_path / "good.fpk")["metadata"] == {"origin": "lab", "epoch": "4"}
    r = run("convert", src, tmp_path / "bad.fpk", "--seed", 10)  # wrong seed
    assert r.exit_code == 0
    assert "warning:" in r.stderr and "seed" in r.stderr and "probably wrong" in r.stderr
    # v2 codes float values below their raw size, so a file where nothing matched is smaller only by that
    info, dense = freezepack.inspect(tmp_path / "bad.fpk"), 4 * (2000 + 50)
    assert ("larger" in r.stdout) == (info["file_bytes"] >= dense) and info["file_bytes"] > 0.75 * dense
    r = run("convert", src, tmp_path / "q.fpk", "--seed", 9, "--quiet")
    assert r.exit_code == 0 and r.stdout == "" and (tmp_path / "q.fpk").exists()
    r = run("convert", src, tmp_path / "n.fpk", "--seed", 9, "--init-for", "nosuch.weight=normal")
    assert r.exit_code == 1 and "nosuch.weight" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "n.fpk").exists()


def test_convert_bad_sources_are_one_line(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({}, tmp_path / "nothing.pt")
    torch.save({"w": torch.eye(3).to_sparse()}, tmp_path / "sparse.pt")
    torch.save({"w\ud800": torch.zeros(3, 3)}, tmp_path / "surrogate.pt")
    for name, why in (("empty.pt", "empty"), ("nothing.pt", "no tensors"), ("sparse.pt", "sparse"),
                      ("surrogate.pt", "Unicode")):
        r = run("convert", tmp_path / name, tmp_path / "o.fpk", "--seed", 1)
        assert r.exit_code == 1 and r.output.startswith("error: ") and why in r.output, (name, r.output)
        assert r.output.count("\n") == 1 and "Traceback" not in r.output


def test_surrogates_in_arguments_are_usage_errors(tmp_path):
    sd = {"w": torch.zeros(2, 2)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    r = run("convert", tmp_path / "s.safetensors", tmp_path / "o.fpk", "--seed", 1, "--meta", "k=\udcff")
    assert r.exit_code == 2 and "not valid text" in r.output and "Traceback" not in r.output


def test_inspect_names_a_torch_checkpoint(tmp_path):
    p = tmp_path / "dense.pt"
    torch.save({"w": torch.zeros(3)}, p)
    r = run("inspect", p)
    assert r.exit_code == 1 and "torch checkpoint" in r.output and "freezepack convert" in r.output
    assert "byte header" not in r.output


def test_unpack_refuses_a_missing_directory_unless_asked(fpk, tmp_path):
    r = run("unpack", fpk, tmp_path / "new" / "d.safetensors")
    assert r.exit_code == 1 and "does not exist" in r.output and not (tmp_path / "new").exists()
    r = run("unpack", "--parents", fpk, tmp_path / "new" / "d.safetensors")
    assert r.exit_code == 0 and (tmp_path / "new" / "d.safetensors").exists()


_CLI_FSIZE = r"""
import resource, sys
from click.testing import CliRunner
from freezepack.cli import cli
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
r = CliRunner().invoke(cli, ["unpack", sys.argv[1], sys.argv[2]])
print(r.exit_code, r.output)
"""


def test_file_too_large_is_one_line_naming_the_path(fpk, tmp_path):
    import subprocess
    import sys

    dst = tmp_path / "big.safetensors"
    r = subprocess.run([sys.executable, "-c", _CLI_FSIZE, str(fpk), str(dst)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"1 error: {dst}: cannot write: File too large"), r.stdout
    assert not dst.exists()


@pytest.mark.parametrize("version", [1, 2])
def test_inspect_escapes_terminal_control_in_names_and_metadata(tmp_path, version):
    """A crafted file must not drive the terminal: ESC (clear screen, window title), C1 CSI, BEL, bidi override
    in tensor names, an alias target and metadata are shown escaped, as --json and verify already do."""
    from freezepack.format.init import make_init
    from freezepack.format.record import FreezeRecord, FrozenTensor

    evil = "w\x1b[2J\x1b]0;owned\x07\x9b31m\u202e"
    rec = FreezeRecord(seed=1)
    m = torch.zeros(4, 5, dtype=torch.bool)
    m[1, 2] = True
    rec.frozen[evil] = FrozenTensor(make_init("xavier_normal", (4, 5)), m, torch.ones(1))
    rec.whole["b\x1bc"] = torch.zeros(3)
    rec.aliases["tied\x1b[1m"] = evil
    p = tmp_path / "evil.fpk"
    freezepack.save(p, rec, {"k\x1b[31m": "v\x1b]2;title\x07", "plain": "caf\u00e9 \\ ok"}, version=version)
    r = run("inspect", p)
    assert r.exit_code == 0, r.output
    for bad in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert bad not in r.output
    assert "w\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\u202e" in r.output  # shown, escaped, not hidden
    assert "metadata k\\x1b[31m = v\\x1b]2;title\\x07" in r.output
    assert "= w\\x1b[2J" in r.output and "b\\x1bc" in r.output
    assert "metadata plain = caf\u00e9 \\\\ ok" in r.output  # printable non-ASCII stays; a backslash is doubled
    info = json.loads(run("inspect", "--json", p).output)
    assert evil in {t["name"] for t in info["tensors"]}  # --json keeps the exact text (JSON-escaped)


@pytest.mark.parametrize("args", [["inspect", "a\0b"], ["verify", "\0"], ["unpack", "x.fpk", "o\0.safetensors"],
                                  ["fleet", "install", "repo", "net", "--dir", "dev", "--root", "\0"]])
def test_a_nul_byte_in_a_path_is_a_usage_error_not_a_crash(args):
    # os.stat raises a foreign ValueError ('embedded null byte') from inside click's own exists= check
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.output, repr(r.exception))
    assert "NUL byte" in r.output
