"""Corruption sweep and header fuzzing: no damaged file is ever loaded silently, and nothing but a
FreezepackError ever escapes the parser."""
from __future__ import annotations

import json
import random
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import freezepack
from freezepack import api
from freezepack.errors import FreezepackError
from freezepack.format.v1 import layout as v1_layout
from freezepack.format.v1 import reader as v1_reader
from freezepack.testing import rewrite, small_record, split_file


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    p = tmp_path_factory.mktemp("c") / "m.fpk"
    freezepack.save(p, small_record(), version=1)  # edited as v1 JSON below
    data = p.read_bytes()
    want = {k: bytes(api.tensor_bytes(v)) for k, v in freezepack.load(p).items()}
    return data, want


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """{version: (file bytes, dense tensor bytes)}: the same model in each file-format version."""
    out = {}
    for version in (1, 2):
        p = tmp_path_factory.mktemp(f"v{version}") / "m.fpk"
        freezepack.save(p, small_record(), version=version)
        out[version] = p.read_bytes(), {k: bytes(api.tensor_bytes(v)) for k, v in freezepack.load(p).items()}
    return out


def _outcome(path, data: bytes, want: dict) -> str:
    path.write_bytes(data)
    try:
        got = freezepack.load(path)
    except FreezepackError:
        return "rejected"
    same = set(got) == set(want) and all(bytes(api.tensor_bytes(got[k])) == want[k] for k in want)
    return "harmless" if same else "MISREAD"


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_flip_every_byte(tmp_path, originals, version):
    data, want = originals[version]
    assert len(data) < 9000  # keep the sweep exhaustive and quick
    p = tmp_path / "x.fpk"
    outcomes = {}
    rnd = random.Random(0)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 1 << rnd.randrange(8)  # one flipped bit: the subtlest damage
        outcomes.setdefault(_outcome(p, bytes(bad), want), []).append(i)
    assert "MISREAD" not in outcomes, outcomes.get("MISREAD")
    # The canonical-header rule and the digests leave no byte that could change unnoticed, padding included.
    assert set(outcomes) == {"rejected"}


@pytest.mark.parametrize("version", [1, 2])
def test_flip_whole_bytes_sample(tmp_path, originals, version):
    data, want = originals[version]
    p = tmp_path / "x.fpk"
    rnd = random.Random(1)
    for i in rnd.sample(range(len(data)), 300):
        bad = bytearray(data)
        bad[i] ^= rnd.randrange(1, 256)
        assert _outcome(p, bytes(bad), want) == "rejected", i
    rnd = random.Random(1)
    for i in rnd.sample(range(len(data)), 60) + [0, 8, len(data) - 1]:  # every bit of a byte, the edges included
        bad = bytearray(data)
        bad[i] ^= 0xFF
        assert _outcome(p, bytes(bad), want) == "rejected", i


def test_every_truncation_is_rejected(tmp_path, original):
    data, want = original
    p = tmp_path / "x.fpk"
    for cut in range(0, len(data), 7):
        assert _outcome(p, data[:cut], want) == "rejected", cut


def test_padding_bytes_are_checked_too(tmp_path, original):
    data, want = original
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n]
    pad = len(header) - len(header.rstrip(b" "))
    p = tmp_path / "x.fpk"
    for j in range(pad):  # a space turned into a tab or newline would still be valid JSON: refuse it anyway
        for b in (b"\t", b"\n", b"\r"):
            bad = bytearray(data)
            bad[8 + n - pad + j] = b[0]
            assert _outcome(p, bytes(bad), want) == "rejected"


# ---------------------------------------------------------------------------------------------------------------
# hypothesis: the header parser on arbitrary bytes and on structured mutations of a real header
# ---------------------------------------------------------------------------------------------------------------

def _parse(raw: bytes, file_size: int):
    try:
        v1_reader.parse_header(raw, file_size, "fuzz.fpk")
    except FreezepackError:
        pass  # the only acceptable failure


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.integers(0, 10_000))
def test_parser_on_random_bytes(raw, extra):
    _parse(raw, 8 + len(raw) + extra)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20))
def test_parser_on_random_json(value):
    text = json.dumps({"__metadata__": {v1_layout.HEADER_KEY: json.dumps(value), "x": "y"}, "t": value})
    _parse(text.encode(), 8 + len(text))


_JSON_LEAF = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6) | \
    st.lists(st.integers(-5, 2**40), max_size=3)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_parser_on_mutated_real_headers(original, data):
    """Replace one field anywhere in a real inner header (re-signed, so only semantic checks can object)."""
    raw, want = original
    outer, inner, body = split_file(raw)
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + (k,))
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                paths.append(path + (i,))
                walk(v, path + (i,))

    walk(inner, ())
    path = data.draw(st.sampled_from(paths))
    node = inner
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = data.draw(_JSON_LEAF)
    try:
        mutated = rewrite(raw, lambda h: h.clear() or h.update(inner))
    except ValueError:  # NaN/Infinity cannot even be written canonically
        return
    n = struct.unpack("<Q", mutated[:8])[0]
    try:
        v1_reader.parse_header(mutated[8:8 + n], len(mutated), "fuzz.fpk")
    except FreezepackError:
        return
    # accepted: then the whole file must still load to exactly the original tensors, or be refused on load
    with tempfile.TemporaryDirectory() as d:
        assert _outcome(Path(d) / "m.fpk", mutated, want) in ("rejected", "harmless"), path
