"""docs/ERRORS.md tells the truth about freezepack/errors.py: its class tree lists every error class, and the
raise sites it names raise the class it names."""
from __future__ import annotations

import inspect
import os
import re

import pytest
import torch

import freezepack
import freezepack.errors as errors
from freezepack.format.init import make_init
from freezepack.format.record import FreezeRecord, FrozenTensor

DOC = open(os.path.join(os.path.dirname(__file__), "..", "docs", "ERRORS.md"), encoding="utf-8").read()


def test_the_tree_lists_exactly_the_error_classes():
    tree = DOC[DOC.index("```\nException"):]
    tree = tree[:tree.index("```", 4)]
    listed = set(re.findall(r"── (\w+Error)", tree))
    defined = {n for n, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.FreezepackError)}
    assert listed == defined
    for name in defined - {"FreezepackError"}:
        assert getattr(errors, name).__bases__[0] is errors.FreezepackError
        assert hasattr(freezepack, name) and f"| `{name}` |" in DOC


def test_bad_arguments_are_usage_errors_as_documented(tmp_path):
    rec = FreezeRecord(seed=1)
    rec.frozen["w"] = FrozenTensor(make_init("xavier_normal", (3, 4)), torch.ones(3, 4, dtype=torch.bool),
                                   torch.ones(5))  # 12 trainable entries, 5 values: do not fit the mask
    with pytest.raises(errors.UsageError, match="values must be 12"):
        freezepack.save(tmp_path / "a.fpk", rec)
    with pytest.raises(errors.UsageError, match="metadata"):
        freezepack.save(tmp_path / "b.fpk", FreezeRecord(seed=1), {"k": 3})
    with pytest.raises(errors.UsageError, match="device"):
        freezepack.load(tmp_path / "b.fpk", device="no-such-device")
    with pytest.raises(errors.SpecError, match="unknown initializer"):
        make_init("glorot", (3, 4))
