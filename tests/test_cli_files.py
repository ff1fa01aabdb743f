"""The file commands: readable output, --json for scripts, one-line errors and non-zero exits on bad input."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import freezepack
from freezepack.cli import cli

from fpk_helpers import record_for, rewrite, small_record


@pytest.fixture()
def fpk(tmp_path):
    p = tmp_path / "m.fpk"
    freezepack.save(p, small_record(), {"task": "cli"})
    return p


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_inspect_table_and_json(fpk):
    r = run("inspect", fpk)
    assert r.exit_code == 0, r.output
    assert "conv.weight" in r.output and "ans-bernoulli" in r.output and "ans-gaps" in r.output
    assert "metadata task = cli" in r.output and "compression factor" in r.output
    r = run("inspect", "--json", fpk)
    info = json.loads(r.output)
    assert info["seed"] == 11 and {t["name"] for t in info["tensors"]} >= {"conv.weight", "fc.bias"}


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
    r = run("verify", "--device", "bogus", fpk)
    assert r.exit_code == 1 and r.output.startswith("error: ") and "not a torch device" in r.output
    if not torch.cuda.is_available():
        r = run("unpack", "--device", "cuda", fpk, fpk.with_suffix(".safetensors"))
        assert r.exit_code == 1 and "CUDA is not available" in r.output
