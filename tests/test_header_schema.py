"""spec/fpk-header-v1.schema.json describes the shape of every v1 header the writer makes and the vectors hold,
and rejects the shape errors the reader rejects (the cross-field checks stay in the reader, FORMAT.md §7)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from freezepack.testing import small_record, split_file

jsonschema = pytest.importorskip("jsonschema")
SPEC = Path(__file__).resolve().parents[1] / "spec"
SCHEMA = json.loads((SPEC / "fpk-header-v1.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _inner(data: bytes) -> dict:
    return split_file(data)[1]


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_every_valid_v1_vector_and_a_fresh_file_match_the_schema():
    manifest = json.loads((SPEC / "vectors" / "fpk" / "manifest.json").read_text())
    assert manifest["valid"]
    rules = json.loads((SPEC / "vectors" / "fpk" / "manifest_rules.json").read_text())  # the third set, §11.1
    for item in manifest["valid"] + [v for v in rules["valid"] if v["version"] == 1]:
        VALIDATOR.validate(_inner((SPEC / "vectors" / "fpk" / item["file"]).read_bytes()))
    from freezepack.api import encode_record

    VALIDATOR.validate(_inner(b"".join(encode_record(small_record(), version=1))))


@pytest.mark.parametrize("edit", [
    lambda h: h.update(extra=1),                                      # unknown member
    lambda h: h.update(version=2),
    lambda h: h.update(seed=7),                                       # the seed is a string
    lambda h: h["metadata"].update(k=1),                              # metadata values are strings
    lambda h: h["tensors"][0].update(kind="lazy"),
    lambda h: h["tensors"][0].update(shape=[1] * 17),
    lambda h: h["tensors"][0].update(sha256="ABC"),
    lambda h: h["tensors"][0].pop("name"),
    lambda h: next(t for t in h["tensors"] if t["kind"] == "frozen")["mask"]["params"].update({"x-a": 1.5}),
    lambda h: next(t for t in h["tensors"] if t["kind"] == "frozen")["init"].update(dist="cauchy"),
    # RNG.md §6.1, one rule for both versions: dist by name, exact params keys, mode and nonlinearity values
    lambda h: next(t for t in h["tensors"] if t["init"]["name"] == "kaiming_uniform")["init"].update(dist="normal"),
    lambda h: next(t for t in h["tensors"] if t["init"]["name"] == "kaiming_uniform")["init"]["params"].update(
        mode="fan_avg"),
    lambda h: next(t for t in h["tensors"] if t["init"]["name"] == "kaiming_uniform")["init"]["params"].update(
        nonlinearity="gelu"),
    lambda h: next(t for t in h["tensors"] if t["init"]["name"] == "xavier_uniform")["init"]["params"].update(
        scale=1.0),
    lambda h: next(t for t in h["tensors"] if t["init"]["name"] == "xavier_uniform")["init"]["params"].pop("gain"),
    lambda h: next(t for t in h["tensors"] if t["kind"] == "whole").update(init={}),
])
def test_shape_errors_are_rejected(edit):
    from freezepack.api import encode_record

    h = _inner(b"".join(encode_record(small_record(), version=1)))
    VALIDATOR.validate(h)
    edit(h)
    assert not VALIDATOR.is_valid(h)


def test_extension_members_only_where_section_9_allows_them():
    from freezepack.api import encode_record

    h = _inner(b"".join(encode_record(small_record(), version=1)))
    frozen = next(t for t in h["tensors"] if t["kind"] == "frozen")
    h["x-a"], frozen["x-b"], frozen["init"]["x-c"], frozen["mask"]["x-d"] = 1, [2], {"e": None}, "f"
    next(iter(h["stored"].values()))["x-g"] = True
    VALIDATOR.validate(h)
    h["metadata"]["x-key"] = "an ordinary metadata key"
    VALIDATOR.validate(h)
