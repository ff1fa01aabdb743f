"""Fixtures shared by several test modules. Builders that tools/ also use live in :mod:`freezepack.testing`."""
from __future__ import annotations

import pytest

import freezepack
from freezepack.testing import small_record


@pytest.fixture()
def fpk(tmp_path):
    """A few-KB v1 .fpk using every v1 mask coder and several dtypes, with metadata ``{"task": "test"}``.

    Version 1 because tests edit its JSON header (v2 files are covered by tests/test_compact.py)."""
    p = tmp_path / "m.fpk"
    freezepack.save(p, small_record(), {"task": "test"}, version=1)
    return p


@pytest.fixture(scope="session")
def mnist():
    """The shipped MNIST subset as (train, test), loaded once per session."""
    from freezepack.experiments.data import load_mnist

    return load_mnist()


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """native with nothing loaded yet and its cache in tmp_path; the real state comes back after the test."""
    from freezepack.format import native

    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setenv("FREEZEPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FREEZEPACK_NO_NATIVE", raising=False)
    return tmp_path
