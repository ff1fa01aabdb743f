"""The runs behind the paper's Table 2 (LeNet-5-Caffe), Table 3 counts (VGG16-D) and Figure 2 sweep.

Every "ours" number comes from a model that was really trained, saved as .fpk, read back and verified:
trained-parameter counts from the file's header, sizes from the file on disk, "bit-exact" from a real
``freezepack.verify``. :mod:`.report` compares them with the paper's printed values and renders/plots them.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import api
from . import paper
from .train import TrainConfig, run

TABLE2_QS = (0.0, 0.9, 0.99, 0.995, 0.999)
FIGURE_QS = (0.9, 0.95, 0.99, 0.993, 0.995, 0.997, 0.999)
TABLE3_QS = (0.9, 0.95, 0.99, 0.995)
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics: not parameters


@dataclass
class FileFacts:
    """What a saved .fpk says about itself, read back from disk."""

    path: str
    file_bytes: int
    mask_bytes: int
    values_bytes: int
    weights: int            # |W|: elements of partly frozen tensors
    weights_trainable: int  # ||m||_0
    biases: int             # |B|: parameters stored whole (biases, BatchNorm weight/bias)
    verified: bool
    buffers: int = 0        # stored whole but not parameters (BatchNorm running statistics): never trained

    @property
    def trained(self) -> int:
        return self.weights_trainable + self.biases

    @property
    def q_beta(self) -> float:
        return paper.q_beta(self.weights_trainable, self.weights, self.biases)


def file_facts(path, *, check: bool = True) -> FileFacts:
    info = api.inspect(path)
    w = wt = b = buf = mb = vb = 0
    for t in info["tensors"]:
        if t["kind"] == "frozen":
            w += t["numel"]
            wt += t["trainable"]
            mb += t["mask_bytes"]
            vb += t["values_bytes"]
        elif t["name"].rsplit(".", 1)[-1] in BUFFER_NAMES:
            buf += t["numel"]
        else:
            b += t["numel"]
    ok = api.verify(path)["ok"] if check else False
    return FileFacts(os.fspath(path), Path(path).stat().st_size, mb, vb, w, wt, b, ok, buf)


def _dense_safetensors_bytes(model_name: str, out_dir: Path, state_dict) -> int:
    from safetensors.torch import save_file

    p = out_dir / f"{model_name}_dense.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(p))
    return p.stat().st_size


@dataclass
class Table2Result:
    rows: list = field(default_factory=list)      # one dict per q
    accuracy: dict = field(default_factory=dict)  # method -> q -> list of accuracies (%)
    figure_accuracy: dict = field(default_factory=dict)
    table3: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    # q -> {"freezenet_seconds": [per seed], "narrow": [per seed: widths, trainable, acc, file_bytes, macs, seconds]}
    baseline: dict = field(default_factory=dict)
    seconds: float = 0.0


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def run_table2(out_dir="runs/table2", *, seeds=(0, 1, 2), epochs: int = 15, data=None, quick: bool = False,
               figure: bool = False, table3: bool = True, progress: bool = True,
               baseline: bool = True) -> Table2Result:
    """Train, save, reload and verify the Table 2 models; optionally the Figure 2 sweep and the Table 3 counts.

    ``baseline``: beside each FreezeNet, the narrow dense LeNet-5 with at most its trainable numbers, same recipe
    and seeds (:mod:`.narrow`), saved and measured the same way."""
    from .data import load_mnist

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets = load_mnist(data)
    res = Table2Result(settings={"seeds": list(seeds), "epochs": epochs, "quick": quick,
                                 "train_images": len(datasets[0]), "test_images": len(datasets[1]),
                                 "torch": torch.__version__, "threads": torch.get_num_threads()})
    cache: dict = {}
    seconds: dict = {}

    def acc(method: str, q: float, seed: int, save_to: Path | None = None) -> float:
        key = (method, q, seed)
        if key not in cache:
            r = run(TrainConfig("lenet5", method, q, seed, epochs=epochs), datasets=datasets, progress=False)
            _say(progress, f"  {method:9s} q={q:<6} seed={seed}: test {100 * r.test_acc:.2f} %  ({r.seconds:.0f} s)")
            cache[key], seconds[key] = 100 * r.test_acc, round(r.seconds, 2)
            if save_to is not None:
                api.save(save_to, r.model, metadata={"method": method, "q": repr(q), "seed": str(seed),
                                                     "test_acc": f"{r.test_acc:.4f}", "epochs": str(epochs)})
            if method == "dense" and "dense_bytes" not in res.settings:
                from ..method.freezenet import dense_state_dict

                res.settings["dense_bytes"] = _dense_safetensors_bytes("lenet5", out, dense_state_dict(r.model))
        return cache[key]

    _say(progress, f"Table 2: LeNet-5-Caffe on {len(datasets[0])} training / {len(datasets[1])} test digits, "
                   f"{epochs} epochs, seeds {list(seeds)}")
    for q in TABLE2_QS:
        methods = ("dense",) if q == 0 else ("freezenet", "snip")
        for m in methods:
            res.accuracy.setdefault(m, {})[q] = [
                acc(m, q, s, out / f"lenet5_{m}_q{q}.fpk" if s == seeds[0] else None) for s in seeds]
        main = "dense" if q == 0 else "freezenet"
        res.rows.append({"q": q, **asdict(file_facts(out / f"lenet5_{main}_q{q}.fpk"))})
        if baseline and q > 0:
            res.baseline[q] = {"freezenet_seconds": [seconds[("freezenet", q, s)] for s in seeds],
                               "freezenet_macs": _macs("lenet5"),
                               "narrow": [narrow_run(q, s, epochs, datasets, out, progress) for s in seeds]}

    if figure:
        _say(progress, "Figure 2: FreezeNet vs SNIP over q")
        for m in ("freezenet", "snip"):
            res.figure_accuracy[m] = {q: [acc(m, q, s, out / f"lenet5_{m}_q{q}.fpk" if s == seeds[0] else None)
                                          for s in seeds] for q in FIGURE_QS}

    if table3:
        _say(progress, "Table 3: VGG16-D trained-parameter counts (SNIP mask on random data: no CIFAR here)")
        res.table3 = table3_counts(out, qs=(0.99,) if quick else TABLE3_QS)
    res.seconds = time.perf_counter() - t0
    (out / "table2.json").write_text(json.dumps(asdict(res), indent=1, default=str))
    return res


def _macs(model_name: str) -> int:
    from .models import INPUT_SHAPES, make_model
    from .narrow import count_macs

    return count_macs(make_model(model_name), INPUT_SHAPES[model_name])


def narrow_run(q: float, seed: int, epochs: int, datasets, out: Path, progress: bool) -> dict:
    """The narrow dense LeNet-5 beside the FreezeNet at ``q`` (``freezepack train --method narrow``), saved."""
    from .models import INPUT_SHAPES
    from .narrow import count_macs, plan_for

    cfg = TrainConfig("lenet5", "freezenet", q, seed, epochs=epochs)
    p, _ = plan_for(cfg, datasets=datasets)
    r = run(TrainConfig("lenet5", "dense", q, seed, epochs=epochs, widths=p.widths), datasets=datasets)
    path = out / f"lenet5_narrow_q{q}_seed{seed}.fpk"
    api.save(path, r.model, metadata={"method": "narrow", "q": repr(q), "seed": str(seed), "widths": p.describe(),
                                      "test_acc": f"{r.test_acc:.4f}", "epochs": str(epochs)})
    _say(progress, f"  narrow    q={q:<6} seed={seed}: test {100 * r.test_acc:.2f} %  ({r.seconds:.0f} s)")
    return {"widths": p.describe(), "trainable": r.trainable, "budget": p.max_trainable, "acc": 100 * r.test_acc,
            "file_bytes": path.stat().st_size, "macs": count_macs(r.model, INPUT_SHAPES["lenet5"]),
            "seconds": round(r.seconds, 2)}


def load_result(path) -> Table2Result:
    """A previous run's ``table2.json`` (JSON turned the float q keys into strings; turn them back)."""
    d = json.loads(Path(path).read_text())

    def by_q(m: dict) -> dict:
        return {meth: {float(q): v for q, v in per_q.items()} for meth, per_q in m.items()}

    return Table2Result(rows=d["rows"], accuracy=by_q(d["accuracy"]), figure_accuracy=by_q(d["figure_accuracy"]),
                        table3=d["table3"], settings=d["settings"], seconds=d["seconds"],
                        baseline={float(q): v for q, v in d.get("baseline", {}).items()})


def table3_counts(out_dir: Path, qs=TABLE3_QS, seed: int = 0) -> list[dict]:
    """VGG16-D FreezeNets with SNIP masks scored on one random batch (CIFAR is not available offline)."""
    from ..method.freezenet import make_freezenet
    from .models import make_model

    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    rows = []
    for q in qs:
        model = make_freezenet(make_model("vgg16"), (x, y), q, seed, "snip", biases="zeros")
        path = Path(out_dir) / f"vgg16_freezenet_q{q}.fpk"
        api.save(path, model, metadata={"method": "freezenet", "q": repr(q), "data": "random"})
        f = file_facts(path, check=False)
        rows.append({"q": q, "trained": f.trained, "weights": f.weights, "biases": f.biases,
                     "file_bytes": f.file_bytes, "dense_bytes": 4 * (f.weights + f.biases + f.buffers),
                     "paper": paper.TABLE3_TRAINED[q]})
    return rows
