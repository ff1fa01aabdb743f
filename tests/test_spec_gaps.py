"""What spec/FORMAT.md and spec/RNG.md state since issue 21 §3 and the reader once did not do (one init.params rule
for both versions, v2's future version, exact histograms and ans-ctx counts, one metadata measure): each test
asserts the spec's behaviour on a hand-built file. They were strict xfails until the format layer's one rule set
(freezepack.format.rules) enforced them; a new gap gets ``@gap(...)`` again."""
from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch

import freezepack
from freezepack.api import encode_record
from freezepack.errors import FormatError, FreezepackError, SpecError
from freezepack.format.init import InitSpec, make_init
from freezepack.format.record import FreezeRecord, FrozenTensor
from freezepack.testing import rewrite
from freezepack.testing.v2 import leb128 as _var


def gap(raises):
    """A strict xfail that counts only the failure the gap causes today (``raises``), not an unrelated error."""
    return pytest.mark.xfail(strict=True, raises=raises,
                             reason="spec states the rule; the reader does not enforce it yet (issue 21)")


NOT_RAISED = pytest.fail.Exception  # pytest.raises(...) that saw nothing: "DID NOT RAISE"


def _v2(rest: bytes) -> bytes:
    """A v2 file around ``rest`` (header + payloads), digested and wrapped as FORMAT.md §12.1 says."""
    body = hashlib.sha256(rest).digest() + rest
    text = json.dumps({"__metadata__": {"freezepack": "2"}, "freezepack": {
        "data_offsets": [0, len(body)], "dtype": "U8", "shape": [len(body)]}}, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _record(init: InitSpec) -> FreezeRecord:
    rec = FreezeRecord(seed=3)
    m = torch.zeros(4, 6, dtype=torch.bool)
    m[1, 2] = m[3, 5] = True
    rec.frozen["w"] = FrozenTensor(init, m, torch.tensor([0.5, -0.25]))
    return rec


def _write(tmp_path, rec, version, metadata=None):
    p = tmp_path / f"f{version}.fpk"
    p.write_bytes(b"".join(encode_record(rec, metadata=metadata, version=version)))
    return p


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("params, dist", [
    ({"a": 0.0, "mode": "fan_avg", "nonlinearity": "leaky_relu"}, "uniform"),    # a mode torch does not have
    ({"a": 0.0, "mode": "fan_in", "nonlinearity": "gelu"}, "uniform"),           # no calculate_gain for it
    ({"a": 0.0, "mode": "fan_in", "nonlinearity": "relu"}, "normal"),            # kaiming_uniform is uniform
])
def test_init_params_one_rule_for_both_versions(tmp_path, version, params, dist):
    """RNG.md §6.1 / FORMAT.md §5.2, §12.5: mode, nonlinearity and dist-by-name are checked in v1 and v2."""
    good = make_init("kaiming_uniform", (4, 6))
    with pytest.raises(SpecError):  # v1's writer reads its header back, so it refuses to write it already
        freezepack.load(_write(tmp_path, _record(InitSpec("kaiming_uniform", dist, good.a, good.b, params)), version))


@pytest.mark.parametrize("version", [1, 2])
def test_init_params_keys_and_types_one_rule(tmp_path, version):
    """FORMAT.md §12.5: v2's params text obeys v1's rule (v1 refuses this file already)."""
    good = make_init("xavier_normal", (4, 6))
    rec = _record(InitSpec("xavier_normal", "normal", good.a, good.b, {"gain": 2.0, "scale": 1.0}))
    with pytest.raises(SpecError):  # (v1: by its writer's own read-back)
        freezepack.load(_write(tmp_path, rec, version))


def test_v2_init_params_text_must_be_canonical(tmp_path):
    good = make_init("xavier_normal", (4, 6), gain=2.0)
    data = _write(tmp_path, _record(good), 2).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    rest = data[8 + n + 32:]
    text = b'{"gain":2.0}'
    assert rest.count(bytes([len(text)]) + text) == 1
    p = tmp_path / "spaced.fpk"
    p.write_bytes(_v2(rest.replace(bytes([len(text)]) + text, bytes([len(text) + 1]) + b'{"gain": 2.0}')))
    with pytest.raises(FormatError, match="canonical"):
        freezepack.load(p)


@pytest.mark.parametrize("version", [1, 2])
def test_future_version_says_upgrade(tmp_path, version):
    """FORMAT.md §9, §12.1: v1's "version":3 or v2's {"freezepack":"3"} is a newer file, not a damaged one."""
    data = _write(tmp_path, _record(make_init("xavier_normal", (4, 6))), version).read_bytes()
    p = tmp_path / "v3.fpk"
    if version == 1:
        p.write_bytes(rewrite(data, lambda h: h.update(version=3)))
    else:
        p.write_bytes(data.replace(b'{"freezepack":"2"}', b'{"freezepack":"3"}', 1))
    with pytest.raises(FormatError, match="newer than this reader.*upgrade"):
        freezepack.load(p)


def test_decoded_symbols_must_match_the_stored_histogram(tmp_path):
    """FORMAT.md §12.8: a 'planes' block that claims counts [2, 2] but whose (valid, fully consumed) stream
    decodes to [0, 0, 0, 1] is refused. The stream is the single word 2^26: under two symbols of probability
    2^23 it decodes 0, 0, 0, 1 and ends in state 0 (§6.3)."""
    entry = (_var(0) + _var(1) + b"x" + bytes([0, 11]) + _var(1) + _var(4)   # whole U8 tensor 'x' of shape [4]
             + bytes([1, 0b1, 1, 0, 1]) + _var(2) + _var(2) + _var(4))       # planes: plane 0 coded, syms 0 and 1
    head = bytes([0]) + _var(1) + _var(0) + _var(0) + _var(1) + entry        # generator, seed, producer, metadata
    p = tmp_path / "hist.fpk"
    p.write_bytes(_v2(head + struct.pack("<I", 1 << 26)))
    with pytest.raises(FormatError, match="histogram"):
        freezepack.load(p)


def test_the_histogram_fixture_is_otherwise_valid(tmp_path):
    """The same file with the true counts [3, 1] and its stream loads: the gap above is the histogram alone."""
    entry = (_var(0) + _var(1) + b"x" + bytes([0, 11]) + _var(1) + _var(4)
             + bytes([1, 0b1, 1, 0, 1]) + _var(3) + _var(1) + _var(4))
    head = bytes([0]) + _var(1) + _var(0) + _var(0) + _var(1) + entry
    # counts [3, 1]: probabilities 12582912 and 4194304 (§12.7.1); the word below decodes 0, 0, 0, 1 to state 0
    state = 0
    for s in reversed([0, 0, 0, 1]):
        cdf, prob = (0, 12582912) if s == 0 else (12582912, 4194304)
        state = ((state // prob) << 24) | (cdf + state % prob)
    p = tmp_path / "ok.fpk"
    p.write_bytes(_v2(head + struct.pack("<I", state)))
    assert freezepack.load(p)["x"].tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("version", [1, 2])
def test_metadata_limit_is_utf8_bytes_in_both_versions(tmp_path, version):
    """FORMAT.md §5, §7.3: one measure for both versions, the UTF-8 bytes of keys and values. 400 000 'é' are
    800 000 UTF-8 bytes (under 1 MiB) but 2.4 MB of canonical JSON escapes (what v1 once measured)."""
    meta = {"note": "\u00e9" * 400_000}
    p = _write(tmp_path, _record(make_init("xavier_normal", (4, 6))), version, meta)
    assert freezepack.load(p)["w"].shape == (4, 6)


def test_v1_refuses_unknown_params_keys_today(tmp_path):
    """The part of the one rule both readers already share: v1 refuses an unknown params key."""
    data = _write(tmp_path, _record(make_init("xavier_normal", (4, 6))), 1).read_bytes()
    p = tmp_path / "x.fpk"
    p.write_bytes(rewrite(data, lambda h: h["tensors"][0]["init"]["params"].update(scale=1.0)))
    with pytest.raises(FreezepackError, match="init params"):
        freezepack.load(p)


def _ans_words(steps) -> list[int]:
    """Words of a §6.3 stream that decodes ``steps`` = [(symbol, cdf, prob), ...] in order and ends in state 0:
    each decode step inverted, last symbol first; fits when the whole message is under 64 bits (no refills)."""
    state = 0
    for _, c, p in reversed(steps):
        state = ((state // p) << 24) | (c + state % p)
    assert 0 < state < 1 << 64
    return [state] if state < 1 << 32 else [state & 0xFFFFFFFF, state >> 32]


def _binary(size, ones, bit):
    cdf1 = min(max(((size - ones) * (1 << 24) + size // 2) // size, 1), (1 << 24) - 1)  # §12.7.1
    return (bit, 0, cdf1) if bit == 0 else (bit, cdf1, (1 << 24) - cdf1)


def _ctx_file(shape, mask, params: bytes, steps) -> bytes:
    """A v2 file of one frozen F32 xavier_normal tensor 'w' with an 'ans-ctx' mask (``params`` = the bytes after
    the coder code), raw values 1.0, 2.0, ... and the true dense digest."""
    import numpy as np

    from freezepack.format.init import generate_np

    init = make_init("xavier_normal", shape)
    k = int(np.sum(mask))
    dense = generate_np(init, shape, 5, "w").reshape(-1)
    dense[np.flatnonzero(mask)] = np.arange(1, k + 1, dtype=np.float32)
    words = b"".join(struct.pack("<I", w) for w in _ans_words(steps))
    entry = (_var(0) + _var(1) + b"w" + bytes([1, 3]) + _var(len(shape)) + b"".join(map(_var, shape)) + bytes([0])
             + struct.pack("<ff", init.a, init.b) + _var(k) + bytes([4]) + params + _var(len(words)) + bytes([0])
             + hashlib.sha256(dense.astype("<f4").tobytes()).digest()[:16])
    head = bytes([0]) + _var(5) + _var(0) + _var(0) + _var(1) + entry
    return _v2(head + words + np.arange(1, k + 1, dtype="<f4").tobytes())


def _bins(shape, nb):
    import numpy as np

    from freezepack.format.init import generate_np

    keys = generate_np(make_init("xavier_normal", shape), shape, 5, "w").reshape(-1).view(np.uint32) & 0x7FFFFFFF
    n = keys.size
    rank = np.empty(n, np.int64)
    rank[np.lexsort((np.arange(n), keys))] = np.arange(n)
    return rank * nb // n


def _bin_file(tmp_path, counts):
    """Both ones of the mask in bin 1 of 2, coded with per-bin ``counts`` (their sum is k = 2 either way)."""
    import numpy as np

    bins = _bins((2, 4), 2)
    members = [np.flatnonzero(bins == b) for b in (0, 1)]
    mask = np.zeros(8, bool)
    mask[members[1][:2]] = True
    steps = [_binary(len(members[b]), counts[b], int(mask[i])) for b in (0, 1) if 0 < counts[b] < len(members[b])
             for i in members[b]]
    p = tmp_path / "ctx.fpk"
    p.write_bytes(_ctx_file((2, 4), mask, bytes([2, 0]) + _var(counts[0]) + _var(counts[1]), steps))
    return p, mask


def _flag_file(tmp_path, col_ones):
    """Column flags [1, 1, 1, 0] (3 set) coded with binary(4, ``col_ones``), one trainable entry per flagged
    column."""
    import numpy as np

    colflag = [1, 1, 1, 0]
    mask = np.zeros(8, bool)
    mask[[0, 5, 2]] = True  # row-major 2 x 4: columns 0, 1, 2
    active = [i for i in range(8) if colflag[i % 4]]
    steps = [_binary(4, col_ones, b) for b in colflag] + [_binary(len(active), 3, int(mask[i])) for i in active]
    p = tmp_path / "flags.fpk"
    p.write_bytes(_ctx_file((2, 4), mask, bytes([1, 1]) + _var(col_ones) + _var(3), steps))
    return p, mask


def test_the_ctx_fixtures_are_valid_with_true_counts(tmp_path):
    for p, mask in (_bin_file(tmp_path, (0, 2)), _flag_file(tmp_path, 3)):
        assert (freezepack.load(p)["w"].reshape(-1).numpy() >= 1).tolist() == mask.tolist()


def test_ctx_bin_counts_must_be_what_each_bin_decodes(tmp_path):
    """FORMAT.md §12.7.2: bin b decodes exactly count_b ones. Counts [1, 1] sum to k = 2 but the stream decodes
    0 ones in bin 0 and 2 in bin 1 (today's reader checks only the sum)."""
    p, _ = _bin_file(tmp_path, (1, 1))
    with pytest.raises(FormatError):
        freezepack.load(p)


def test_ctx_flag_counts_must_be_what_the_flags_decode(tmp_path):
    """FORMAT.md §12.7.2: exactly col_ones column flags are set. col_ones = 2, but 3 flags decode (not checked)."""
    p, _ = _flag_file(tmp_path, 2)
    with pytest.raises(FormatError):
        freezepack.load(p)
