"""spec/FORMAT.md and spec/RNG.md state facts the code and the vectors can check: their examples, tables and
claims are compared with what the reference implementation does."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import torch

from freezepack.format import init, rng
from freezepack.format.v2.wire import outer_header

SPEC = os.path.join(os.path.dirname(__file__), "..", "spec")
FORMAT = open(os.path.join(SPEC, "FORMAT.md"), encoding="utf-8").read()
RNG = open(os.path.join(SPEC, "RNG.md"), encoding="utf-8").read()


def test_v2_outer_header_example_is_the_writers_text():
    example = re.search(r"for `L = 1234` the text is\n`([^`]+)`, (\d+)\nbytes, then (\d) spaces", FORMAT)
    raw = outer_header(1234)[8:]
    assert raw.rstrip(b" ").decode() == example.group(1)
    assert len(example.group(1)) == int(example.group(2)) and raw.count(b" ") == int(example.group(3))


def test_dist_by_name_is_what_make_init_resolves():
    line = RNG[RNG.index("`dist` follows from `name`:"):]
    line = " ".join(line[:line.index("\n\n")].split())
    said = []
    for dist, names in re.findall(r"`(normal|uniform|sign|constant)` for ((?:`\w+`(?:, )?)+)", line):
        for name in re.findall(r"`(\w+)`", names):
            assert init.make_init(name, (4, 3)).dist == dist, name
            said.append(name)
    assert sorted(said) == sorted(init.INITIALIZERS)  # every name, once


def test_every_vector_file_is_documented():
    for f in os.listdir(os.path.join(SPEC, "vectors")):
        if f.endswith(".json"):
            assert f"vectors/{f}" in RNG, f
    for f in os.listdir(os.path.join(SPEC, "vectors", "fpk")):
        if f.startswith("manifest"):
            assert f"`{f}`" in FORMAT or f"fpk/{f}`" in FORMAT, f
    rules = json.load(open(os.path.join(SPEC, "vectors", "fpk", "manifest_rules.json")))
    assert {v["version"] for v in rules["valid"]} == {1, 2}


def test_the_normal_fraction_is_exact_as_rng_md_says():
    """RNG.md §5.3: rem has its low 7 bits zero, so rem >> sh drops no one bit and f = rem / 2^e exactly."""
    w = np.concatenate([rng.words_np(5, 9, 0, 1 << 18), np.array([0, 1, 0x7FFFFFFF, 0xFFFFFFFF], np.uint32)])
    n = 2 * (w.astype(np.int64) & 0x7FFFFFFF) + 1
    e = np.floor(np.log2(n.astype(np.float64))).astype(np.int64)
    e -= (np.left_shift(1, e) > n)  # exact bit_length - 1 whatever log2 rounds
    r = (n - np.left_shift(1, e)) << 7
    rem = r - ((r >> e) << e)
    assert not np.any(rem & 127) and np.all(rem < np.left_shift(1, e))
    sh = np.maximum(e - 24, 0)
    assert np.array_equal((rem >> sh) << sh, rem)


def test_frozen_scale_rounds_twice_and_that_differs_from_once():
    """FORMAT.md §5.3: dense = R(f32(R(G) x s)); at s = 0.75 about 30 % of F16/BF16 elements differ from R(G x s)."""
    from freezepack.format.record import reconstruct

    spec = init.make_init("xavier_uniform", (300, 300))
    g = init.generate_np(spec, (300, 300), 1, "w")
    for dtype in (torch.float16, torch.bfloat16):
        got = reconstruct(spec, (300, 300), 1, "w", dtype, 0.75, None, None)
        twice = (torch.from_numpy(g).to(dtype).float() * 0.75).to(dtype)
        once = (torch.from_numpy(g) * 0.75).to(dtype)
        assert torch.equal(got, twice)
        share = (once != twice).double().mean().item()
        assert 0.2 < share < 0.4, share  # exact arithmetic: the same number on every machine
    assert "~30 %" in FORMAT
