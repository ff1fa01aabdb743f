"""Training on the real shipped MNIST subset: accuracy floors, the paper's central claim, early stopping, the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from freezepack import UsageError, api
from freezepack.cli import cli
from freezepack.experiments.data import Dataset, load_mnist, split_train_val
from freezepack.experiments.models import make_model
from freezepack.experiments.train import TrainConfig, build, evaluate, mean_std, run, train
from freezepack.format.init import generate
from freezepack.method.freezenet import dense_state_dict, freeze_record, trainable_masks

torch.set_num_threads(2)


def small(ds: Dataset, n: int) -> Dataset:
    return Dataset(ds.images[:n], ds.labels[:n])


@pytest.mark.slow
def test_freezenet_q099_lenet5_reaches_93_percent(mnist):
    r = run(TrainConfig("lenet5", "freezenet", 0.99, seed=0, epochs=3), datasets=mnist)
    assert r.test_acc >= 0.93, r.test_acc
    assert round(r.q_beta, 3) == 0.989 and r.parameters == 431_080
    assert 4305 + 580 <= r.trainable <= 4305 + 580 + 4
    # the trained model is a FreezeNet whose record regenerates it bit for bit
    rec = freeze_record(r.model)
    dense = dense_state_dict(r.model)
    assert all(torch.equal(rec.state_dict()[k], dense[k].cpu()) for k in dense)
    for name, mask in trainable_masks(r.model).items():
        ft = rec.frozen[name]
        assert torch.equal(dense[name][~mask], generate(ft.init, ft.shape, 0, name)[~mask])


@pytest.mark.slow
def test_freezenet_stays_accurate_where_snip_collapses(mnist):
    """The paper's central claim at q = 0.999 (430 trainable weights of 430,500)."""
    fn = run(TrainConfig("lenet5", "freezenet", 0.999, epochs=2), datasets=mnist)  # 83 % here, 89 % after 15 epochs
    sn = run(TrainConfig("lenet5", "snip", 0.999, epochs=2), datasets=mnist)       # 11 %: the gradient dries up
    assert fn.test_acc >= 0.70, fn.test_acc
    assert fn.test_acc >= sn.test_acc + 0.30, (fn.test_acc, sn.test_acc)


def test_early_stopping_keeps_the_best_epoch_and_patience_stops(mnist):
    tr, va = split_train_val(small(mnist[0], 1500), seed=1)
    model = build("lenet300", "freezenet", 0.9, 1, (tr.images[:100], tr.labels[:100]))
    hist = train(model, tr, va, epochs=4, lr=2.0, seed=1, patience=1)  # too high a rate: validation worsens
    best = max(h["val_acc"] for h in hist)
    assert evaluate(model, va) == best
    assert len(hist) <= 4 and hist[-1]["epoch"] - max(hist, key=lambda h: h["val_acc"])["epoch"] <= 1


def test_freezenet_wd_training_keeps_frozen_part_on_the_generator(mnist):
    tr, va = split_train_val(small(mnist[0], 600), seed=2)
    model = build("lenet300", "freezenet-wd", 0.9, 2, (tr.images[:100], tr.labels[:100]))
    train(model, tr, va, epochs=1, seed=2, frozen_decay=True, weight_decay=0.01)
    rec = freeze_record(model)
    dense = dense_state_dict(model)
    for name, ft in rec.frozen.items():
        assert ft.frozen_scale < 1.0
        assert torch.equal(dense[name][~ft.mask], (generate(ft.init, ft.shape, 2, name) * ft.frozen_scale)[~ft.mask])


def test_all_methods_build_and_dense_is_plain(mnist):
    x, y = mnist[0].images[:100], mnist[0].labels[:100]
    for method in ("dense", "freezenet", "freezenet-wd", "random", "snip", "grasp"):
        model = build("lenet300", method, 0.95, 3, (x, y))
        assert bool(trainable_masks(model)) == (method != "dense")
        assert evaluate(model, small(mnist[1], 200)) >= 0.0
    with pytest.raises(UsageError, match="unknown method"):
        build("lenet300", "magnitude", 0.9, 0, (x, y))
    with pytest.raises(UsageError, match="takes \\(3, 32, 32\\) images"):
        run(TrainConfig("vgg16"), datasets=mnist)


def test_mean_std():
    assert mean_std([0.9, 0.92, 0.94]) == pytest.approx((0.92, 0.02))
    assert mean_std([0.5]) == (0.5, 0.0)


def test_cli_train_saves_a_file_that_reloads_bit_exactly(tmp_path):
    out = tmp_path / "m.fpk"
    res = CliRunner().invoke(cli, ["train", "--model", "lenet300", "--q", "0.95", "--seed", "5", "--epochs", "1",
                                   "--out", str(out), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["test_acc"] > 0.85 and info["method"] == "freezenet" and round(info["q"], 3) == 0.95
    assert info["compression_factor"] > 5
    loaded = api.load(out)
    plain = make_model("lenet300")
    plain.load_state_dict(loaded)
    assert evaluate(plain, load_mnist()[1]) == pytest.approx(info["test_acc"])
    assert api.verify(out)["ok"]


def test_cli_train_bad_data_dir_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "empty"), "--epochs", "1", "--quiet"])
    assert res.exit_code == 1
    assert "error:" in res.output and "missing MNIST file" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    from freezepack.cli.demo import main

    out = tmp_path / "demo.fpk"
    res = CliRunner().invoke(main, ["--epochs", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "bit-exact yes, digests ok" in res.output and out.is_file()
    factor = float(res.output.split("compression factor ")[1].split("x")[0])
    assert factor > 40  # 4,885 trained numbers + coded masks vs 431,080 dense floats
