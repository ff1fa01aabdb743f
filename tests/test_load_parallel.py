"""Parallel loading: the same tensors (bits, dtypes, ties) and the same errors for any thread count, and readers that
many threads can decode from at once."""
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import freezepack
from freezepack import parallel
from freezepack.api import loading
from freezepack.api import materialize as materialize_module
from freezepack.format import init, record
from freezepack.format.model import AliasEntry, FrozenEntry, WholeEntry
from freezepack.format.reader import open_file
from freezepack.format.record import FrozenTensor
from freezepack.testing import random_mask, small_record

THREADS = (1, 2, 4)


def _record():
    """Every mask coder (``ans-ctx`` too), F32/F16/BF16 frozen tensors, a frozen_scale, whole tensors, a tie."""
    rec = small_record()
    g = torch.Generator().manual_seed(5)
    for name, shape, dtype, scale in (("big.weight", (300, 257), torch.float32, 0.75),
                                      ("h.weight", (64, 70), torch.float16, 1.0),
                                      ("b.weight", (50, 33), torch.bfloat16, 0.5)):
        m = random_mask(shape, 0.97, g)
        rec.frozen[name] = FrozenTensor(init.make_init("xavier_normal", shape), m,
                                        torch.randn(int(m.sum()), generator=g).to(dtype), scale)
    spec = init.make_init("kaiming_normal", (120, 90))
    w = init.generate(spec, (120, 90), rec.seed, "ctx.weight")
    m = w.abs() > w.abs().flatten().kthvalue(int(0.95 * w.numel())).values  # the largest |w|: 'ans-ctx' codes best
    rec.frozen["ctx.weight"] = FrozenTensor(spec, m, torch.randn(int(m.sum()), generator=g))
    rec.aliases["tied.weight"] = "big.weight"
    return rec


@pytest.fixture(scope="module", params=[1, 2])
def saved(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("par") / f"v{request.param}.fpk")
    freezepack.save(path, _record(), version=request.param)
    with open_file(path) as r:
        coders = {e.coder for e in r.header.entries if isinstance(e, FrozenEntry)}
    assert {"ans-bernoulli", "ans-gaps", "const"} <= coders
    assert "ans-ctx" in coders or request.param == 1  # v2 covers the mask decoded from the regenerated tensor
    return path


def _same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), k


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("no_native", [False, True])
def test_load_is_bit_identical_for_1_2_and_4_threads(saved, verify, no_native, monkeypatch):
    if no_native:  # the torch generator and constriction's decoder on the worker threads
        monkeypatch.setenv("FREEZEPACK_NO_NATIVE", "1")
    runs = [freezepack.load(saved, verify=verify, threads=n) for n in THREADS]
    truth = _record().state_dict()
    for sd in runs:
        _same(sd, runs[0])
        assert sd["tied.weight"] is sd["big.weight"]  # a tie is one tensor object, as in torch's state_dict
        for k, v in truth.items():
            assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k


def test_load_threads_default_to_torchs_and_refuse_nonsense(saved, monkeypatch):
    seen = []
    real = parallel.run_ordered
    monkeypatch.setattr(loading, "run_ordered", lambda tasks, n, done=None: seen.append(n) or real(tasks, n, done))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        freezepack.load(saved, verify=False)
    finally:
        torch.set_num_threads(before)
    assert seen == [3]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(freezepack.UsageError, match="threads"):
            freezepack.load(saved, threads=bad)


_SHAPES = {k: tuple(v.shape) for k, v in _record().state_dict().items()}
RENAME = {"half": "top.h16"}  # ("half" is a Module method: the module holds it under another name)


class _Net(torch.nn.Module):
    """Every tensor of the file as a float32 Parameter (the file's ``half`` as ``top.h16``), tied as the file."""

    def __init__(self):
        super().__init__()
        for name, shape in _SHAPES.items():
            mod, _, attr = RENAME.get(name, name).partition(".")
            if not hasattr(self, mod):
                setattr(self, mod, torch.nn.Module())
            getattr(self, mod).register_parameter(attr, torch.nn.Parameter(torch.zeros(shape), requires_grad=False))
        self.tied.weight = self.big.weight


@pytest.mark.parametrize("meta", [False, True])
def test_load_into_is_bit_identical_for_1_2_and_4_threads(saved, meta):
    truth = _record().state_dict()
    results = []
    for n in THREADS:
        if meta:
            with torch.device("meta"):
                net = _Net()
        else:
            net = _Net()
        freezepack.load_into(net, saved, threads=n, prefix_map=RENAME)
        assert net.tied.weight is net.big.weight
        results.append({k: v.detach() for k, v in net.state_dict().items()})
    for sd in results:
        _same(sd, results[0])
        for k, v in truth.items():  # (the module's dtypes are float32: values arrive rounded as by copy_)
            assert torch.equal(sd[RENAME.get(k, k)], v.to(torch.float32)), k


def test_load_into_writes_tensors_that_share_memory_in_file_order(saved):
    """Two file tensors into overlapping module memory: the later one in the file wins, as a sequential load leaves
    it, for any thread count (the bigger, earlier one is started first and finishes last)."""
    dense = freezepack.load(saved)
    with open_file(saved) as r:
        order = [e.name for e in r.header.entries]
    assert order.index("big.weight") < order.index("ctx.weight")
    want = dense["big.weight"].clone().reshape(-1)
    want[:120 * 90] = dense["ctx.weight"].reshape(-1)
    for n in THREADS:
        net = _Net()
        shared = torch.zeros(300 * 257)
        net.big.weight = torch.nn.Parameter(shared.view(300, 257), requires_grad=False)
        net.ctx.weight = torch.nn.Parameter(shared[:120 * 90].view(120, 90), requires_grad=False)
        freezepack.load_into(net, saved, threads=n, verify=False, prefix_map=RENAME)
        assert torch.equal(shared, want), n


def _corrupt(monkeypatch, names):
    """The generator's first word of each stream in ``names`` comes out one bit wrong (as on a machine where it
    were not bit-exact): caught only by the digest of the reconstructed tensor."""
    real = init.generate

    def generate(spec, shape, seed, name, **kw):
        t = real(spec, shape, seed, name, **kw)
        if name in names and kw.get("start", 0) == 0:
            t.view(-1).view(torch.int32)[0] ^= 1
        return t

    for module in (materialize_module, record):
        monkeypatch.setattr(module, "generate", generate)


@pytest.mark.parametrize("threads", THREADS)
def test_digest_mismatch_names_the_first_bad_tensor_for_any_thread_count(saved, monkeypatch, threads):
    with open_file(saved) as r:
        frozen = [e.name for e in r.header.entries if isinstance(e, FrozenEntry)]
    first, last = frozen[1], frozen[-1]  # the last one (and the biggest, made first) fails too
    _corrupt(monkeypatch, {first, last, "big.weight"})
    with pytest.raises(freezepack.IntegrityError, match="does not match its digest") as err:
        freezepack.load(saved, threads=threads)
    assert err.value.tensor == min((first, last, "big.weight"), key=frozen.index)
    with pytest.raises(freezepack.IntegrityError, match="does not match its digest") as err:
        freezepack.load_into(_Net(), saved, threads=threads, prefix_map=RENAME)
    assert err.value.tensor == min((first, last, "big.weight"), key=frozen.index)
    freezepack.load(saved, verify=False, threads=threads)  # unverified: nothing is checked


def test_run_ordered_raises_the_first_failure_in_order_after_every_task_stopped():
    late_failed = threading.Event()
    running = []

    def first():
        running.append(1)
        assert late_failed.wait(60)  # fails only after the later task has failed
        running.remove(1)
        raise ValueError("first")

    def later():
        try:
            raise KeyError("later")
        finally:
            late_failed.set()

    with pytest.raises(ValueError, match="first"):
        parallel.run_ordered([(0, first), (10, later), (0, lambda: 3)], 2)
    assert running == []
    assert parallel.run_ordered([(1, lambda: "a"), (5, lambda: "b"), (3, lambda: "c")], 4) == ["a", "b", "c"]


def _parts(r, e):
    if isinstance(e, WholeEntry):
        return bytes(r.whole_bytes(e))
    if isinstance(e, AliasEntry):
        return None
    words = r.mask_words(e)
    values = r.values_bytes(e)
    keys = None
    if e.coder == "ans-ctx":
        from freezepack.format import entropy

        keys = entropy.context_keys(init.generate(e.init, e.shape, r.header.seed, e.stream_key).numpy())
    idx = r.mask_indices(e, words, keys) if values is not None else None
    return words.tobytes(), None if values is None else bytes(values), None if idx is None else idx.tobytes()


def test_one_open_reader_decodes_from_many_threads_as_it_does_alone(saved):
    with open_file(saved) as r:
        entries = list(r.header.entries)
        want = [_parts(r, e) for e in entries]
        jobs = entries * 150  # every part many times over, threads interleaving reads of one file
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda e: _parts(r, e), jobs))
    for e, g in zip(jobs, got):
        assert g == want[entries.index(e)], e.name
    assert np.all([w is not None for w, e in zip(want, entries) if not isinstance(e, AliasEntry)])


@pytest.mark.parametrize("chunk", [7, 64, 1 << 18])
def test_reconstruct_hashed_is_reconstruct_and_its_digest(monkeypatch, chunk):
    """The one-pass, chunk-by-chunk reconstruction equals reconstruct() bit for bit (F32/F16/BF16, scaled, nothing
    or everything trainable, a constant initializer) and its digest is that tensor's digest."""
    from freezepack.format.dense import digest

    monkeypatch.setattr(record, "CACHE_CHUNK", chunk)
    g = torch.Generator().manual_seed(2)
    shape = (37, 29)
    n = 37 * 29
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for spec in (init.make_init("xavier_uniform", shape), init.make_init("constant", shape, val=0.25)):
            for k, scale in ((0, 1.0), (40, 0.75), (n, 1.0)):
                index = torch.sort(torch.randperm(n, generator=g)[:k]).values
                values = torch.randn(k, generator=g).to(dtype)
                want = record.reconstruct(spec, shape, 9, "w", dtype, scale, index if k else None,
                                          values if k else None)
                got, sha = record.reconstruct_hashed(spec, shape, 9, "w", dtype, scale, index if k else None,
                                                     values if k else None)
                assert got.dtype == dtype and got.shape == want.shape
                assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), (dtype, k)
                assert sha == digest(want)
                out = torch.empty(shape, dtype=dtype)
                assert record.reconstruct_hashed(spec, shape, 9, "w", dtype, scale, index if k else None,
                                                 values if k else None, out=out)[0] is out
                assert torch.equal(out, got)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_prefault_maps_a_new_tensor_and_keeps_written_bytes():
    from freezepack.format.memory import prefault

    def resident_pages(t):  # mincore over the tensor's own pages (not the process RSS, which other threads move)
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        page = 4096
        start = (t.data_ptr() + page - 1) // page * page  # the whole pages inside the tensor, as prefault maps
        n = ((t.data_ptr() + t.numel() * t.element_size()) // page * page - start) // page
        vec = (ctypes.c_ubyte * n)()
        if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * page), vec) != 0:
            pytest.skip(f"mincore failed: errno {ctypes.get_errno()}")
        return sum(v & 1 for v in vec), n

    t = torch.empty(16 << 20)  # 64 MiB: its own fresh mapping, nothing resident yet
    if not prefault(t):
        pytest.skip("no MADV_POPULATE_WRITE here (not Linux >= 5.14)")
    got, pages = resident_pages(t)
    assert got == pages  # every page mapped now, not on first write
    t.fill_(1.5)
    assert prefault(t) and torch.equal(t, torch.full((16 << 20,), 1.5))  # written pages keep their bytes
    assert not prefault(torch.empty(1000))  # too small to be worth a system call


def test_generator_threads_share_out_the_spare_threads():
    assert parallel.generator_threads(2, 150) == 1 and parallel.generator_threads(4, 1) == 4
    assert parallel.generator_threads(4, 2) == 2 and parallel.generator_threads(1, 1) == 1
    assert parallel.generator_threads(3, 0) == 3


@pytest.mark.parametrize("verify", [True, False])
def test_a_one_tensor_file_loads_the_same_for_any_thread_count(tmp_path, verify):
    """Fewer tensors than threads: the spare threads go to the generator inside the task; same bits."""
    g = torch.Generator().manual_seed(8)
    rec = record.FreezeRecord(seed=21)
    m = random_mask((700, 300), 0.99, g)
    rec.frozen["only.weight"] = FrozenTensor(init.make_init("xavier_normal", (700, 300)), m,
                                             torch.randn(int(m.sum()), generator=g))
    p = tmp_path / "one.fpk"
    freezepack.save(p, rec)
    want = rec.state_dict()["only.weight"]
    for threads in THREADS:
        got = freezepack.load(p, verify=verify, threads=threads)["only.weight"]
        assert torch.equal(got, want), threads
        model = torch.nn.Module()
        model.only = torch.nn.Linear(300, 700, bias=False)
        freezepack.load_into(model, p, prefix_map={"only.": "only."}, verify=verify, threads=threads)
        assert torch.equal(model.only.weight, want), threads


def test_verify_report_is_the_same_for_any_thread_count(saved, monkeypatch):
    """verify checks tensors in parallel: the same report (order, verdicts, reasons) for 1, 2 and 4 threads, the
    bad tensors named wherever they are, and progress in file order up to the total."""
    with open_file(saved) as r:
        total = len(r.header.entries)
    assert freezepack.verify(saved, threads=2)["ok"]
    corrupt = {"conv.weight", "fc2.weight", "ctx.weight"}  # float32, scale 1: a flipped bit survives to the bytes
    _corrupt(monkeypatch, corrupt)
    reports = []
    for threads in THREADS:
        seen: list[tuple[int, int]] = []
        rep = freezepack.verify(saved, threads=threads, progress=lambda d, t, seen=seen: seen.append((d, t)))
        assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (total, total)
        reports.append(rep)
    assert reports[0] == reports[1] == reports[2]
    bad = {t["name"] for t in reports[0]["tensors"] if not t["ok"]}
    assert bad == corrupt
    assert not reports[0]["ok"] and reports[0]["failed"] == len(bad)


class _LM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(300, 48)
        self.fc = torch.nn.Linear(48, 96)
        self.proj = torch.nn.Linear(96, 48)
        self.head = torch.nn.Linear(48, 300, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x):
        return self.head(self.proj(torch.relu(self.fc(self.emb(x)))))


def _freezenet_file(tmp_path):
    from freezepack.method.freezenet import make_freezenet

    torch.manual_seed(1)
    model = make_freezenet(_LM(), None, q=0.9, seed=4, method="random")
    wd = model.fc.parametrizations.weight[0]
    wd.set_frozen_scale(0.75)  # FreezeNet-WD state travels too (as FreezeNet-WD leaves it after training)
    wd.decay_state.copy_(torch.tensor([0.75, 0.0], dtype=torch.float64))
    path = tmp_path / "lm.fpk"
    freezepack.save(path, model)
    return model, path


def _states(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_load_freezenet_is_the_same_model_for_any_thread_count(tmp_path):
    model, path = _freezenet_file(tmp_path)
    want = _states(model)
    x = torch.randint(0, 300, (4, 7))
    for threads in THREADS:
        back = freezepack.load_freezenet(_LM(), path, threads=threads)
        got = _states(back)
        assert got.keys() == want.keys(), threads
        assert all(torch.equal(got[k], want[k]) for k in want), threads
        # tied again: one trained-values Parameter behind both names
        assert back.head.parametrizations.weight.original is back.emb.parametrizations.weight.original
        assert torch.equal(back(x), model(x))
        again = tmp_path / f"again{threads}.fpk"
        freezepack.save(again, back)
        assert again.read_bytes() == path.read_bytes()  # saving the result unchanged gives the same file


@pytest.mark.parametrize("threads", THREADS)
def test_load_freezenet_names_the_first_bad_tensor_for_any_thread_count(tmp_path, monkeypatch, threads):
    _, path = _freezenet_file(tmp_path)
    with open_file(path) as r:
        frozen = [e.name for e in r.header.entries if isinstance(e, FrozenEntry)]
    _corrupt(monkeypatch, {frozen[-1], frozen[1]})
    monkeypatch.setattr(loading, "generate", materialize_module.generate)
    with pytest.raises(freezepack.IntegrityError, match="does not match its digest") as err:
        freezepack.load_freezenet(_LM(), path, threads=threads)
    assert err.value.tensor == frozen[1]
    freezepack.load_freezenet(_LM(), path, threads=threads, verify=False)  # unverified: nothing is checked
