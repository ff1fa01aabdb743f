"""`freezepack train --model package.module:Class`: the CLI trains a user's own architecture, not only LeNets."""
from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

import freezepack
from freezepack.cli import cli
from freezepack.experiments.data import load_mnist
from freezepack.experiments.train import evaluate

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        """A user's model: depthwise + grouped convs, BatchNorm, no bias on the convs."""
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, stride=2, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=8, bias=False)
            self.pw = nn.Conv2d(8, 16, 1, groups=4)
            self.fc = nn.Linear(16 * 6 * 6, 10)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            return self.fc(torch.relu(self.pw(self.dw(x))).flatten(1))

    def factory():
        return Net()

    NOT_A_MODEL = 3
''')


@pytest.mark.slow
def test_train_a_user_model_from_the_cli(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "net.fpk"
    res = CliRunner().invoke(cli, ["train", "--model", "user_models:factory", "--q", "0.8", "--epochs", "1",
                                    "--seed", "3", "--out", str(out), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["model"] == "user_models:factory" and result["test_acc"] > 0.5
    assert freezepack.verify(out)["ok"]
    import user_models

    net = freezepack.load_freezenet(user_models.Net(), out)
    _, test = load_mnist()
    assert abs(evaluate(net, test) - result["test_acc"]) < 1e-9  # the file is the model that was tested
    assert any(not p.requires_grad or p.numel() < 288 for p in net.parameters())
    assert freezepack.inspect(out)["q"] > 0.79


def test_user_model_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "user_models2.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, msg in [("no_such_module_xyz:Net", "cannot import"), ("user_models2:Nope", "has no"),
                      ("user_models2:NOT_A_MODEL", "not a class or function"), ("user_models2:", "expected"),
                      ("lenet9", "unknown model")]:
        res = CliRunner().invoke(cli, ["train", "--model", spec, "--epochs", "1"])
        assert res.exit_code == 1 and msg in res.output and "Traceback" not in res.output, (spec, res.output)


def test_help_and_readme_say_module_class_runs_user_code():
    """--model module:Class imports (executes) a module: the option's help and the README must say so."""
    import os
    import re

    text = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    assert "IMPORTS AND RUNS that module's code" in text and "only code you trust" in text
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    assert re.search(r"module:Class\):\s+#\s+imports and runs mypkg\.nets \(trusted code only\)", readme)
