"""Fuzzing the .fpk file surface: file bytes, header JSON, mask streams and the file commands' arguments.

Every input ends in a correct result or a FreezepackError (a usage error for the CLI), within bounded time and
memory, touching no file but the command's target. The crafted allocation/JSON bombs are measured in a
subprocess: peak RSS while refusing each stays within 2 x the file's bytes + 64 MiB, under an address-space
limit of the same size (so an attempted big allocation fails loudly instead of passing unnoticed).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import freezepack
from freezepack.api import tensor_bytes
from freezepack.cli import cli
from freezepack.errors import FreezepackError
from freezepack.format import framing, maskcode, strictjson
from freezepack.format.v1 import reader as v1_reader
from freezepack.testing import hostile, rewrite, small_record, split_file

BASE = hostile.base_file()
BASE_DENSE = None


def _dense(data: bytes, tmp) -> dict | str:
    p = os.path.join(tmp, "f.fpk")
    with open(p, "wb") as f:
        f.write(data)
    try:
        return {k: bytes(tensor_bytes(v)) for k, v in freezepack.load(p).items()}
    except FreezepackError:
        return "rejected"


def _want():
    global BASE_DENSE
    if BASE_DENSE is None:
        BASE_DENSE = {k: bytes(tensor_bytes(v)) for k, v in small_record().state_dict().items()}
    return BASE_DENSE


# ---------------------------------------------------------------------------------------------------------------
# the crafted bombs: refused, with peak RSS <= 2 x file + 64 MiB
# ---------------------------------------------------------------------------------------------------------------

def _check_probe(tmp_path, size_mb, extra=()):
    paths = list(hostile.cases(str(tmp_path), size_mb).values())
    warm = tmp_path / "warm.fpk"
    warm.write_bytes(BASE)
    results = {r["file"]: r for r in hostile.probe(str(warm), paths + list(extra))}
    for name, r in results.items():
        if name in {os.path.basename(p) for p in extra}:
            continue
        assert not r["outcome"].startswith(("FOREIGN", "accepted")), r
        assert r["peak_rss"] <= r["allowance"], r
    return results


def test_bombs_are_refused_within_the_memory_bound(tmp_path):
    """Also: a valid prefix mask over 2**22 entries (an empty 'ans-gaps' stream) loads with about the dense
    tensor's memory, not ~9x it (no decoder arrays)."""
    prefix = tmp_path / "prefix.fpk"
    prefix.write_bytes(hostile.gaps_prefix_file(1 << 22, 7))
    got = _check_probe(tmp_path, 2, [str(prefix)])
    assert "max_dense_bytes" in got["frozen_16GiB.fpk"]["outcome"]
    assert "max_json_values" in got["x_braces.fpk"]["outcome"]
    assert "torch checkpoint" in got["torch_zip.fpk"]["outcome"]
    r = got["prefix.fpk"]
    assert r["outcome"] == "accepted", r
    assert r["peak_rss"] <= 2 * (4 << 22) + (16 << 20), r  # the tensor and the digest pass only


@pytest.mark.slow
def test_big_bombs_are_refused_within_the_memory_bound(tmp_path):
    got = _check_probe(tmp_path, 15)  # headers near the reader's default 16 MiB header limit
    assert max(r["bytes"] for r in got.values()) > 15 << 20
    assert "max_json_values" in got["x_braces.fpk"]["outcome"]
    got = _check_probe(tmp_path, 90)  # near the format's 100 000 000-byte cap: refused by the limit, unread
    assert all(("max_header_bytes" in r["outcome"] or "over the cap of 100000000" in r["outcome"])
               for r in got.values() if r["bytes"] > 17 << 20)


def test_values_count_matches_a_real_parse():
    texts = ['{"a":[1,2,{"b":"x,y{["}],"c":"\\\\\\"[,"}', '[' + ','.join(['{}'] * 50) + ']', '"\\\\"', '[]']
    for t in texts:
        n = 0
        stack = [json.loads(t)]
        while stack:
            v = stack.pop()
            n += 1
            stack.extend(v.values() if isinstance(v, dict) else v if isinstance(v, list) else [])
        assert strictjson.scan_text(t, step=3).values >= n
        assert strictjson.scan_text(t, step=3) == strictjson.scan_text(t) == strictjson.scan(t.encode())


# ---------------------------------------------------------------------------------------------------------------
# file bytes
# ---------------------------------------------------------------------------------------------------------------

_EDITS = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                            st.integers(0, len(BASE) - 1), st.integers(0, 255)), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=_EDITS)
def test_mutated_bytes_are_refused_or_read_exactly(tmp_path, edits):
    b = bytearray(BASE)
    for op, i, v in edits:
        if not b:
            break
        i %= len(b)
        if op == "flip":
            b[i] ^= 1 << (v % 8)
        elif op == "set":
            b[i] = v
        elif op == "insert":
            b[i:i] = bytes([v])
        elif op == "delete":
            del b[i]
        else:
            del b[i:]
    got = _dense(bytes(b), str(tmp_path))
    assert got == "rejected" or got == _want()


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0, max_size=64), st.integers(0, 1 << 64 - 1))
def test_random_prefixes_and_lengths(prefix, n):
    """Any 8-byte length with any bytes after it: a FormatError, never an allocation of the declared size."""
    data = struct.pack("<Q", n) + prefix
    try:
        h = framing.parse_prefix(data[:8], len(data))
        v1_reader.parse_header(data[8:8 + h], len(data), "fuzz.fpk")
    except FreezepackError:
        return
    raise AssertionError("random bytes accepted as a header")


# ---------------------------------------------------------------------------------------------------------------
# header JSON: typed values anywhere in the inner header, re-signed so only the semantic checks can object
# ---------------------------------------------------------------------------------------------------------------

_LEAF = (st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.floats(allow_nan=False, allow_infinity=False)
         | st.text(alphabet=st.characters(), max_size=6) | st.sampled_from(["\ud800", "x-", "F32", "U32", "BOOL"]))
_JSONISH = st.recursive(_LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                        max_leaves=8)


def _paths(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,)
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield path + (i,)
            yield from _paths(v, path + (i,))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_header_values_of_any_type(tmp_path, data):
    outer, inner, body = split_file(BASE)
    paths = list(_paths(inner))
    path = data.draw(st.sampled_from(paths))
    node = inner
    for key in path[:-1]:
        node = node[key]
    action = data.draw(st.sampled_from(["replace", "delete", "x-member", "add"]))
    if action == "replace" or not isinstance(node, dict):
        node[path[-1]] = data.draw(_JSONISH)
    elif action == "delete":
        del node[path[-1]]
    else:
        key = ("x-" if action == "x-member" else "") + data.draw(st.text(max_size=5))
        node[key] = data.draw(_JSONISH)
    try:
        mutated = rewrite(BASE, lambda h: h.clear() or h.update(inner))
    except (ValueError, UnicodeEncodeError):
        return  # not even representable as canonical text
    got = _dense(mutated, str(tmp_path))
    assert got == "rejected" or got == _want(), (path, action)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.sampled_from(list('{}[],:"\\ 0123456789.eE-+truefalsn') + ["\\u", "\\ud800", "\"x-\""]),
                     max_size=80).map("".join))
def test_inner_header_text_of_any_shape(tmp_path, text):
    """Arbitrary inner-header text, correctly signed and wrapped: strict parsing refuses all but valid headers."""
    got = _dense(hostile.with_inner_text(BASE, text), str(tmp_path))
    assert got == "rejected"


# ---------------------------------------------------------------------------------------------------------------
# mask streams
# ---------------------------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(coder=st.sampled_from(maskcode.CODERS), n=st.integers(1, 5000), kfrac=st.floats(0, 1),
       value=st.integers(-1, 2), b=st.integers(-1, 17), phi=st.integers(0, 2**32),
       words=st.lists(st.integers(0, 2**32 - 1), max_size=40))
def test_mask_streams_decode_or_refuse(coder, n, kfrac, value, b, phi, words):
    k = int(kfrac * n)
    params = {"const": {}, "positions": {"value": value}, "ans-gaps": {"value": value, "b": b, "phi": phi},
              "ans-bernoulli": {"cdf1": maskcode.ans_threshold(n, k) if 0 < k < n else 1}}[coder]
    payload = np.array(words, dtype=np.uint32)
    try:
        idx = maskcode.decode_indices(coder, n, k, params, payload, where="fuzz", tensor="w")
    except FreezepackError:
        return
    assert idx.dtype == np.int64 and idx.size == k
    assert np.all(np.diff(idx) > 0) and (k == 0 or (idx[0] >= 0 and idx[-1] < n))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 3000), seed=st.integers(0, 2**32 - 1), p=st.floats(0.001, 0.999))
def test_mask_streams_roundtrip_and_one_corrupted_word_never_misreads(n, seed, p):
    rng = np.random.default_rng(seed)
    mask = rng.random(n) < p
    coded = maskcode.encode(mask)
    idx = maskcode.decode_indices(coded.coder, n, coded.ones, coded.params, coded.payload)
    assert np.array_equal(idx, np.flatnonzero(mask))
    if coded.payload.size:
        bad = coded.payload.copy()
        bad[rng.integers(bad.size)] ^= np.uint32(1 << int(rng.integers(32)))
        try:
            got = maskcode.decode_indices(coded.coder, n, coded.ones, coded.params, bad)
        except FreezepackError:
            return
        assert got.size == coded.ones  # a different but well-formed mask: caught by the dense digest on load


# ---------------------------------------------------------------------------------------------------------------
# CLI arguments: inspect / verify / unpack / convert
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "good.fpk").write_bytes(BASE)
    (d / "bomb.fpk").write_bytes(hostile.frozen_bomb(BASE))
    (d / "junk.fpk").write_bytes(b"\x00" * 64)
    save_file({"w": torch.zeros(4, 4), "b": torch.ones(4)}, str(d / "dense.safetensors"))
    torch.save({"w": torch.zeros(2)}, d / "dense.pt")
    (d / "sub").mkdir()
    return d


_TOKENS = ["good.fpk", "bomb.fpk", "junk.fpk", "dense.safetensors", "dense.pt", "missing.fpk", "sub", "sub/",
           "out.fpk", "out.safetensors", "sub/out.fpk", "nodir/out.fpk", "--json", "--device", "cpu", "meta",
           "bogus", "--seed", "0", "-1", "18446744073709551616", "7", "--init", "xavier_normal", "nosuch",
           "--init-for", "w=whole", "x=normal", "=", "--meta", "k=v", "k", "\udcff", "--quiet", "--parents",
           "--progress", "--no-progress", "--help", "", "-", "..", "a=b=c"]


def _snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmd=st.sampled_from(["inspect", "verify", "unpack", "convert"]),
       args=st.lists(st.sampled_from(_TOKENS), max_size=7))
def test_cli_arguments(sandbox, cmd, args):
    import resource

    before = _snapshot(sandbox)
    cwd = os.getcwd()
    os.chdir(sandbox)
    # A machine with 4 GiB to spare: bomb.fpk's 16 GiB tensor must be refused by the memory check, whatever
    # this machine has (a refusal is what is tested here, not a 16 GiB regeneration).
    vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    old = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 30), old[1]))
    try:
        r = CliRunner().invoke(cli, [cmd] + args)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)
        os.chdir(cwd)
    assert r.exit_code in (0, 1, 2), (args, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    assert "Traceback" not in r.output
    if r.exit_code == 1:
        assert r.output.rstrip("\n").splitlines()[-1].startswith(("error: ", "warning: ")), (args, r.output)
    after = _snapshot(sandbox)
    # nothing but a destination named on the command line may change, and no temp file may be left behind
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    named = {os.path.normpath(a) for a in args if a}
    assert changed <= named, (args, changed)
    for k in changed - set(before):
        os.unlink(os.path.join(sandbox, k))  # keep the sandbox as it was for the next example
    assert not any(os.path.basename(k).startswith(".tmp-") for k in after), after


# ---------------------------------------------------------------------------------------------------------------
# convert inputs: random state dicts, right or wrong seeds; the output always reproduces the input exactly
# ---------------------------------------------------------------------------------------------------------------

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
           torch.uint8, torch.bool]


@st.composite
def _state_dicts(draw):
    from freezepack.format.init import generate, make_init

    sd = {}
    for i in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(["w", "layer.weight", "x-proj.weight", "é.bias", "a#b", "t"])) + str(i)
        shape = tuple(draw(st.lists(st.integers(0, 9), max_size=3)))
        dtype = draw(st.sampled_from(_DTYPES))
        g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
        t = (torch.randn(shape, generator=g) * 3).to(dtype)
        if dtype == torch.float32 and len(shape) >= 2 and t.numel():
            init = generate(make_init("xavier_normal", shape), shape, 5, name)
            keep = torch.rand(shape, generator=g) < draw(st.floats(0, 1))
            t = torch.where(keep, init, t)  # a share of entries still at their initial values (seed 5)
        sd[name] = t
    return sd


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sd=_state_dicts(), seed=st.sampled_from([5, 6]), fmt=st.sampled_from(["safetensors", "pt"]))
def test_convert_reproduces_any_checkpoint_or_refuses(tmp_path, sd, seed, fmt):
    import tempfile

    from freezepack.conversion import convert_checkpoint

    d = __import__("pathlib").Path(tempfile.mkdtemp(dir=tmp_path))
    src = d / f"src.{fmt}"
    if fmt == "pt":
        torch.save(sd, src)
    else:
        save_file(sd, str(src))
    try:
        report = convert_checkpoint(src, d / "out.fpk", seed)
    except FreezepackError:
        assert sorted(os.listdir(d)) == [src.name]  # a refusal publishes nothing
        return
    back = freezepack.load(d / "out.fpk")
    assert set(back) == set(sd)
    for k, t in sd.items():
        assert back[k].dtype == t.dtype and bytes(tensor_bytes(back[k])) == bytes(tensor_bytes(t)), k
    assert report["file_bytes"] == os.path.getsize(d / "out.fpk")
    assert sorted(os.listdir(d)) == sorted([src.name, "out.fpk"])
