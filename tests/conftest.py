"""Fixtures shared by several test modules. Builders that tools/ also use live in :mod:`freezepack.testing`."""
from __future__ import annotations

import pytest

import freezepack
from freezepack.testing import small_record


@pytest.fixture()
def fpk(tmp_path):
    """A few-KB .fpk using every mask coder and several dtypes, with metadata ``{"task": "test"}``."""
    p = tmp_path / "m.fpk"
    freezepack.save(p, small_record(), {"task": "test"})
    return p


@pytest.fixture(scope="session")
def mnist():
    """The shipped MNIST subset as (train, test), loaded once per session."""
    from freezepack.experiments.data import load_mnist

    return load_mnist()
