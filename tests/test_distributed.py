"""Data-parallel FreezeNets on torch DistributedDataParallel: two real gloo ranks on 127.0.0.1, and a one-rank group
for the cheap checks (what DDP ignores, what it all-reduces). The agreement protocol (ranks prove they run the same
job before training) is also tested with two threads sharing an in-memory store: fast, and the same code path."""
from __future__ import annotations

import datetime
import gzip
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from freezepack import api
from freezepack.errors import DataError, DistributedError
from freezepack.experiments.data import MNIST_FILES, SHIPPED_MNIST, Dataset, load_mnist, read_idx
from freezepack.experiments.launch import init_worker, launch
from freezepack.experiments.models import make_model
from freezepack.experiments.train import TrainConfig, build, run, train
from freezepack.format.init import generate
from freezepack.method.distributed import (
    CommCounter,
    Rendezvous,
    agree,
    average_buffers,
    check_same,
    collective_errors,
    describe_disagreement,
    fingerprint,
    frozen_buffer_names,
    frozen_digest,
    share_masks,
    state_digest,
    together,
    wrap,
)
from freezepack.method.freezenet import dense_state_dict, frozen_parametrizations, trainable_count, trainable_masks

RUN = dict(model="lenet5", method="freezenet-wd", q=0.99, seed=3, epochs=2, batch_size=75)  # 75: uneven 38/37 shards


def _subset(n_train: int = 1200, n_test: int = 300):
    tr, te = load_mnist()
    return Dataset(tr.images[:n_train], tr.labels[:n_train]), Dataset(te.images[:n_test], te.labels[:n_test])


def _lenet(seed: int = 5, q: float = 0.9):
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return build("lenet5", "random", q, seed, (x, torch.arange(8) % 10))


def _worker(arg):
    """One rank: DDP's init sync vs a rank-local change, then a short FreezeNet-WD run (rank 0 saves)."""
    from freezepack.cli.train import train_job

    init_worker(threads=1)
    rank = dist.get_rank()
    out = {}
    for label, make in (("ours", wrap), ("plain", DDP)):  # plain DDP(model) is what we must not do
        model = _lenet()
        conv = frozen_parametrizations(model)["conv1.weight"]
        if rank == 1:  # a rank-local change to a frozen buffer and to a parameter, before DDP sees the model
            with torch.no_grad():
                conv.frozen.view(-1)[0] += 1.0
                model.conv1.bias[0] += 1.0
        make(model)
        out[label] = (float(conv.frozen.view(-1)[0]), float(model.conv1.bias[0]))
        if label == "ours":
            average_buffers(model)  # frozen buffers are not averaged either
            out["after_average"] = float(conv.frozen.view(-1)[0])
            try:  # the digests differ now, and both ranks must say so
                check_same(model)
                out["check_same"] = "passed"
            except DistributedError as e:
                out["check_same"] = str(e)
    bn = torch.nn.BatchNorm1d(3)  # BatchNorm statistics are averaged across ranks
    bn.running_mean.fill_(2.0 * rank)
    average_buffers(bn)
    out["bn_mean"] = bn.running_mean.tolist()
    # the mask travels as indices from rank 0: a different local mask on rank 1 is replaced by rank 0's
    masks = trainable_masks(_lenet(seed=5 + rank))
    shared = share_masks(masks if rank == 0 else None, make_model("lenet5"))
    out["mask_sha"] = [api.digest(m) for m in shared.values()]
    out["train"] = train_job(arg)  # the CLI's job; destroys the process group at its end
    return out


@pytest.mark.slow
def test_two_gloo_ranks_train_identically_regenerate_frozen_and_match_one_process(tmp_path):
    data = _subset()
    path = tmp_path / "ddp.fpk"
    opts = dict(model_name=RUN["model"], method=RUN["method"], q=RUN["q"], seed=RUN["seed"], data=None,
                out=str(path), epochs=RUN["epochs"], init="xavier_normal", reinit=None, lr=0.1, weight_decay=5e-4,
                cosine=True, device=None, progress=False, distributed=True, datasets=data,
                batch_size=RUN["batch_size"])
    res = launch(2, _worker, opts)
    r0, r1 = res[0], res[1]

    # DDP's construction broadcast: our wrap leaves rank 1's frozen buffer alone (never sent) but syncs the bias;
    # plain DDP(model) overwrites the frozen buffer too, i.e. it ships the frozen tensors.
    assert r1["ours"][0] == r0["ours"][0] + 1.0 and r1["ours"][1] == r0["ours"][1]
    assert r1["plain"] == r0["plain"]
    assert r1["after_average"] == r0["after_average"] + 1.0
    assert all(r["check_same"].startswith("rank 1 holds a model that differs from rank 0's after training")
               for r in (r0, r1))
    assert r0["bn_mean"] == r1["bn_mean"] == [1.0, 1.0, 1.0]
    assert r0["mask_sha"] == r1["mask_sha"]

    t0, t1 = r0["train"], r1["train"]
    assert "error" not in t0 and "error" not in t1, (t0, t1)
    assert t0["ranks"] == 2 and t0["rank0"] and not t1["rank0"]
    # every rank: bit-identical frozen weights, masks, FreezeNet-WD scales and trained values (digests, not tensors)
    assert t0["frozen_sha256"] == t1["frozen_sha256"] and t0["state_sha256"] == t1["state_sha256"]
    assert "out" in t0 and "out" not in t1 and sorted(os.listdir(tmp_path)) == ["ddp.fpk"]  # one writer

    # One process taking each step from the same two shards is the 2-rank run bit for bit: whole model and file.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TrainConfig(model=RUN["model"], method=RUN["method"], q=RUN["q"], seed=RUN["seed"],
                             epochs=RUN["epochs"], batch_size=RUN["batch_size"])
        twin = run(config, datasets=data, shards=2)
        plain = run(config, datasets=data)
    finally:
        torch.set_num_threads(old)
    assert state_digest(twin.model) == t0["state_sha256"]
    twin_path = tmp_path / "twin.fpk"
    api.save(twin_path, twin.model, metadata={"model": RUN["model"], "method": RUN["method"], "q": repr(RUN["q"]),
                                              "test_acc": f"{twin.test_acc:.4f}", "epochs": str(twin.epochs),
                                              "init": "xavier_normal"})
    assert twin_path.read_bytes() == path.read_bytes()

    # What freezepack.load regenerates is what the ranks trained with: the frozen entries are the generator's.
    loaded = api.load(path)
    dense = dense_state_dict(twin.model)
    assert loaded.keys() == dense.keys() and all(torch.equal(loaded[k], dense[k]) for k in dense)
    for name, p in frozen_parametrizations(twin.model).items():
        assert float(p.frozen_scale) != 1.0  # FreezeNet-WD moved the scale, identically on both ranks
        gen = generate(p.init, p.mask.shape, RUN["seed"], name) * p.frozen_scale
        assert torch.equal(loaded[name][~p.mask], gen[~p.mask])

    # An ordinary one-process run (one batch, not two shards) differs only by floating-point summation order.
    # What is exact stays exact: same masks, frozen weights and FreezeNet-WD inputs. How far the trained values
    # drift after several epochs depends on the CPU's kernels (AVX-512 vs AVX2 summation trees), so no bound on
    # it is asserted here; the per-step agreement is the bit-exact twin above.
    assert frozen_digest(plain.model) == t0["frozen_sha256"]
    pd = dense_state_dict(plain.model)
    assert pd.keys() == dense.keys() and all(bool(torch.isfinite(pd[k]).all()) for k in pd)


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank (in this process), for the checks that need no second rank."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_buckets_hold_only_trainable_values_and_frozen_buffers_are_ignored(one_rank_group):
    model = _lenet(q=0.99)
    ddp = wrap(model)
    ignored = set(frozen_buffer_names(model))
    assert {n.rsplit(".", 1)[1] for n in ignored} >= {"frozen", "mask", "index", "frozen_scale", "decay_state"}
    assert ignored == {n for n, _ in model.named_buffers()}  # LeNet-5 has no other buffer
    assert ignored <= ddp.parameters_to_ignore and not ddp.modules_buffers
    counter = CommCounter.register(ddp)
    x = torch.randn(4, 1, 28, 28)
    for _ in range(2):
        ddp(x).sum().backward()
    # counted by the comm hook: exactly the trainable values + biases, float32, each step
    assert counter.bytes == 2 * 4 * trainable_count(model)
    assert trainable_count(model) < 0.02 * sum(p.frozen.numel() for p in frozen_parametrizations(model).values())
    assert check_same(model) == state_digest(model)


def test_share_masks_on_the_source_rank_returns_its_masks(one_rank_group):
    model = _lenet()
    masks = trainable_masks(model)
    assert share_masks(masks, make_model("lenet5")) is masks
    with pytest.raises(DistributedError, match="must pass its masks"):
        share_masks(None, make_model("lenet5"))


def test_distributed_without_a_process_group_is_a_clear_error():
    data = _subset(200, 10)
    model = _lenet()
    with pytest.raises(DistributedError, match="init_process_group"):
        train(model, data[0], data[1], epochs=1, distributed=True)
    with pytest.raises(DistributedError, match="not a torchrun worker"):
        init_worker()


def _fails(_):
    raise ValueError("boom on purpose")


def test_nproc_under_torchrun_is_refused(monkeypatch):
    from click.testing import CliRunner

    from freezepack.cli import cli

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(cli, ["train", "--nproc", "2"])
    assert res.exit_code == 1 and "under torchrun leave it out" in res.output


@pytest.mark.slow
def test_failing_workers_end_as_one_line_errors(tmp_path):
    from click.testing import CliRunner

    from freezepack.cli import cli

    missing = tmp_path / "no-such-dir"
    res = CliRunner().invoke(cli, ["train", "--nproc", "2", "--data", str(missing), "--quiet"])
    assert res.exit_code == 1, res.output
    # both ranks fail alike, so the one line says so once (every rank raised this same line)
    assert res.output == (f"error: ranks 0, 1 failed loading the data and the model: {missing}: "
                          f"data directory not found\n")
    with pytest.raises(DistributedError, match="worker rank [01] failed.*boom on purpose"):
        launch(2, _fails, None)


# --- The ranks agree before they train -------------------------------------------------------------------------

def _tiny_sets(n_train: int = 6, shift: int = 0) -> dict:
    x = torch.arange(n_train * 4, dtype=torch.float32).view(n_train, 4)
    y = (torch.arange(n_train) + shift) % 10
    return {"train set": {"images": x, "labels": y}, "test set": {"images": x[:2], "labels": y[:2]}}


def test_describe_disagreement_names_fields_data_sets_size_or_contents_and_ranks():
    ref = fingerprint({"epochs": 2, "lr": 0.1, "method": "freezenet"}, _tiny_sets())
    assert describe_disagreement(ref, {1: ref, 2: ref}) is None
    others = {1: fingerprint({"epochs": 3, "lr": 0.1, "method": "freezenet"}, _tiny_sets(shift=1)),
              2: fingerprint({"epochs": 3, "lr": 0.1000001, "method": "freezenet"}, _tiny_sets()),
              3: fingerprint({"epochs": 2, "lr": 0.1, "method": "random"}, _tiny_sets(n_train=5))}
    assert describe_disagreement(ref, others) == (
        "ranks 1, 2, 3 disagree with rank 0 before training, nothing was trained: "
        "epochs: rank 0 has 2, ranks 1, 2 have 3; lr: rank 0 has 0.1, rank 2 has 0.1000001; "
        "method: rank 0 has freezenet, rank 3 has random; "
        "train set size: rank 0 has 6 examples, rank 3 has 5; "
        "train set: same size (6 examples), different labels on rank 1; "
        "test set: same size (2 examples), different labels on rank 1")
    # a field one rank lacks (another release), and the versions every fingerprint carries
    newer = fingerprint({"epochs": 2, "lr": 0.1, "method": "freezenet", "patience": 3}, _tiny_sets())
    assert describe_disagreement(ref, {1: newer}).endswith("patience: rank 0 has nothing, rank 1 has 3")
    assert {"freezepack version", "torch version"} <= set(ref["config"])


def test_files_and_bytes_are_fingerprinted_by_content_not_by_path(tmp_path):
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    a.write_bytes(b"abc")
    b.write_bytes(b"abd")
    c.write_bytes(b"abc")
    ref = fingerprint({}, {"weights": a})
    assert describe_disagreement(ref, {1: fingerprint({}, {"weights": c}),
                                       2: fingerprint({}, {"weights": b"abc"})}) is None  # other path, same bytes
    assert describe_disagreement(ref, {1: fingerprint({}, {"weights": b}), 2: fingerprint({}, {"weights": b"abcd"})}) \
        == ("ranks 1, 2 disagree with rank 0 before training, nothing was trained: weights size: rank 0 has 3 bytes, "
            "rank 2 has 4; weights: same size (3 bytes), different contents on rank 1")


def _in_threads(world: int, fn, store=None) -> dict:
    """``fn(rendezvous)`` on ranks 0..world-1 (one thread each, one shared store); {rank: result or exception}."""
    store = store if store is not None else dist.HashStore()
    out = {}

    def one(rank):
        try:
            out[rank] = fn(Rendezvous(store, rank, world, timeout=60))
        except Exception as e:  # noqa: BLE001 - compared by the test
            out[rank] = e

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_rendezvous_agrees_or_raises_the_same_line_on_every_rank():
    store = dist.HashStore()  # several rounds in one store, as in one process group
    same = _in_threads(3, lambda rv: rv.agree(fingerprint({"seed": 7}, _tiny_sets())), store)
    assert len(set(same.values())) == 1 and all(isinstance(v, str) and len(v) == 64 for v in same.values())
    differ = _in_threads(3, lambda rv: rv.agree(fingerprint({"seed": 7 + (rv.rank == 2)}, _tiny_sets())), store)
    assert all(isinstance(e, DistributedError) for e in differ.values())
    assert {str(e) for e in differ.values()} == {
        "rank 2 disagrees with rank 0 before training, nothing was trained: seed: rank 0 has 7, rank 2 has 8"}


def test_together_turns_a_failure_on_one_rank_into_the_same_error_on_every_rank():
    def step(rv):
        def load():
            if rv.rank == 1:
                raise DataError("data directory not found", path="/data")
            return rv.rank
        return rv.together("loading the data", load)

    res = _in_threads(2, step)
    assert {str(e) for e in res.values()} == {"rank 1 failed loading the data: /data: data directory not found"}
    assert _in_threads(2, lambda rv: rv.together("x", lambda: rv.rank * 10)) == {0: 0, 1: 10}

    def bug(rv):  # a bug on one rank: its traceback there, a one-line report on the others (no wait for it)
        return rv.together("building", lambda: {}["missing"] if rv.rank == 0 else 1)

    res = _in_threads(2, bug)
    assert isinstance(res[0], KeyError)
    assert isinstance(res[1], DistributedError) and str(res[1]) == "rank 0 failed building: KeyError: 'missing'"


def test_a_rank_that_never_arrives_is_named_and_a_late_one_is_told():
    store = dist.HashStore()
    with pytest.raises(DistributedError, match=r"^rank 1 did not reach the agreement check before training "
                                               r"within 0.2 s"):
        Rendezvous(store, 0, 2, timeout=0.2).agree(fingerprint({"seed": 1}))
    with pytest.raises(DistributedError, match="rank 0 stopped waiting at the agreement check before training "
                                               r"before this rank \(rank 1\) arrived"):
        Rendezvous(store, 1, 2, timeout=0.2).agree(fingerprint({"seed": 1}))


def test_agree_and_together_in_a_real_process_group(one_rank_group):
    digest = agree({"epochs": 1}, _tiny_sets())
    assert digest == agree({"epochs": 1}, _tiny_sets())  # a second round in the same store
    assert fingerprint({"epochs": 1})["config"]["backend"] == "gloo"
    assert together("adding", lambda: 1 + 1) == 2

    def refused():
        raise DataError("labels out of range", path="/data")

    with pytest.raises(DistributedError, match="^rank 0 failed loading: /data: labels out of range$"):
        together("loading", refused)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its own type and traceback on the rank it happened
        together("dividing", lambda: 1 // 0)
    with pytest.raises(DistributedError, match="^rank 0 failed fingerprinting its configuration and data: cannot "
                                               "fingerprint data of type int"):
        agree({}, {"x": 3})


def test_collective_errors_turn_only_communication_failures_into_one_line():
    with pytest.raises(DistributedError, match=r"^rank \?: training: a collective did not complete \(Timed out "
                                               r"waiting 3000ms for send operation to complete\)"):
        with collective_errors("training"):
            raise RuntimeError("[/gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 3000ms for send "
                               "operation to complete")
    with pytest.raises(DistributedError, match=r"^rank \?: training: a collective did not complete \(Connection "
                                               r"closed by peer \[127.0.0.1\]:23700\): another rank stopped"):
        with collective_errors("training"):  # a peer that crashed: the fact, without gloo's advice after it
            raise RuntimeError("[/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:23700. This "
                               "is typically caused by a remote worker crashing. GLHF!")
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):  # a model bug stays one
        with collective_errors("training"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")


def _disagreeing_worker(opts):
    """Rank 1 differs from rank 0 in one thing per case (API path: run()), then as the CLI's job with --out."""
    from freezepack.cli.train import train_job

    init_worker(threads=1, timeout=60)  # short: a regression fails the test instead of hanging it
    rank = dist.get_rank()
    tr, te = _subset(400, 50)
    base = dict(model="lenet5", method="freezenet", q=0.99, seed=3, epochs=1, batch_size=100)
    cases = {"labels": (base, Dataset(tr.images, (tr.labels + 1) % 10)),
             "epochs": (dict(base, epochs=2), tr),
             "train size": (base, Dataset(tr.images[:300], tr.labels[:300])),
             "seed": (dict(base, seed=4), tr),
             "lr": (dict(base, lr=0.05), tr),
             "method": (dict(base, method="random"), tr)}
    out = {}
    for name, (config, train_set) in cases.items():
        if rank == 0:
            config, train_set = base, tr
        try:
            run(TrainConfig(**config), datasets=(train_set, te), distributed=True, timeout=60)
            out[name] = "trained"
        except DistributedError as e:
            out[name] = str(e)
    out["job"] = train_job(dict(opts, epochs=1 + rank, datasets=(tr, te)))  # destroys the process group
    return out


@pytest.mark.slow
def test_ranks_that_disagree_refuse_before_training_with_one_line_on_every_rank(tmp_path):
    path = tmp_path / "never.fpk"
    opts = dict(model_name="lenet5", method="freezenet", q=0.99, seed=3, data=None, out=str(path), init="xavier_normal",
                reinit=None, lr=0.1, weight_decay=5e-4, cosine=True, device=None, progress=False, distributed=True,
                timeout=60)
    res = launch(2, _disagreeing_worker, opts)
    head = "rank 1 disagrees with rank 0 before training, nothing was trained: "
    expected = {"labels": head + "train set: same size (400 examples), different labels on rank 1",
                "epochs": head + "epochs: rank 0 has 1, rank 1 has 2",
                "train size": head + "train set size: rank 0 has 400 examples, rank 1 has 300",
                "seed": head + "seed: rank 0 has 3, rank 1 has 4",
                "lr": head + "lr: rank 0 has 0.1, rank 1 has 0.05",
                "method": head + "method: rank 0 has freezenet, rank 1 has random"}
    for rank in (0, 1):
        assert {k: v for k, v in res[rank].items() if k != "job"} == expected
        assert res[rank]["job"] == {"error": head + "epochs: rank 0 has 1, rank 1 has 2", "rank0": rank == 0}
    assert not path.exists() and os.listdir(tmp_path) == []  # nothing written, not even a temp file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_workers_started_with_different_epochs_and_data_exit_1_with_one_line_each(tmp_path):
    """Two `freezepack train` processes started by hand the way torchrun starts them, rank 1 with --epochs 2 and
    a copy of MNIST whose training labels are shifted: both exit 1, each with one line on stderr, no file."""
    shifted = tmp_path / "mnist-shifted"
    shutil.copytree(SHIPPED_MNIST, shifted)
    labels = read_idx(shifted / MNIST_FILES["train_labels"])
    header = b"\x00\x00\x08\x01" + len(labels).to_bytes(4, "big")
    (shifted / MNIST_FILES["train_labels"]).write_bytes(gzip.compress(header + ((labels + 1) % 10).tobytes()))
    out = tmp_path / "model.fpk"
    port = str(_free_port())
    procs = []
    for rank, extra in ((0, ["--epochs", "1"]), (1, ["--epochs", "2", "--data", str(shifted)])):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONPATH=str(Path(__file__).parents[1]))
        procs.append(subprocess.Popen([sys.executable, "-m", "freezepack", "train", "--quiet", "--out", str(out),
                                       "--collective-timeout", "60", *extra], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    line = ("error: rank 1 disagrees with rank 0 before training, nothing was trained: epochs: rank 0 has 1, "
            f"rank 1 has 2; train set: same size ({len(labels):,} examples), different labels on rank 1\n")
    assert results == [("", line, 1), ("", line, 1)]  # exit 1, not SIGABRT; no traceback; no output
    assert not out.exists()


def _timeout_worker(_):
    """Rank 0 enters a collective that rank 1 never joins: with a 2-s group it must end as one DistributedError."""
    init_worker(threads=1, timeout=60)
    short = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))  # public API, both ranks
    store = dist.distributed_c10d._get_default_store()
    try:
        if dist.get_rank() == 0:
            try:
                with collective_errors("training"):
                    dist.all_reduce(torch.ones(3), group=short)
                return "completed"
            except DistributedError as e:
                return str(e)
            finally:
                store.set("test/rank0-done", b"1")
        store.wait(["test/rank0-done"], datetime.timedelta(seconds=120))  # an event, not a sleep
        return "waited"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_collective_one_rank_never_reaches_ends_with_a_distributed_error_not_a_hang():
    res = launch(2, _timeout_worker, None)
    assert res[1] == "waited"
    assert res[0].startswith("rank 0: training: a collective did not complete (Timed out waiting 2000ms")
    assert res[0].endswith("the wait is bounded by --collective-timeout / init_worker(timeout=)")


def test_a_rank_whose_peers_never_join_gets_a_one_line_error_after_its_timeout(monkeypatch):
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(DistributedError, match=r"^rank 0 could not join the process group at "
                                                   r"127\.0\.0\.1:\d+ within 1 s: "):
            init_worker(threads=1, timeout=1)
    finally:
        torch.set_num_threads(threads)
    assert not dist.is_initialized()
    with pytest.raises(DistributedError, match="positive number of seconds"):
        init_worker(timeout=0)
