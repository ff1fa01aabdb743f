"""Size benchmark, one run: how many bytes a FreezeNet costs, .fpk v1/v2 against what a user would do otherwise.

Per model and freezing rate q (LeNet-5-Caffe at q = 0.9/0.99/0.999 and a small ResNet with BatchNorm, 56 tensors,
at q = 0.9; SNIP masks on the shipped MNIST, trained for --epochs epochs, default 1):
  dense            the dense float32 model as safetensors
  dense+xz         that file through lzma (preset 9)
  packbits+vals    safetensors with each frozen tensor as an np.packbits mask (U8) + its float32 values (F32)
  packbits+gz      that file through gzip -9
  pruned.pt+gz     torch.save of the dense state_dict with every frozen entry set to 0 (a pruned model), gzip -9
  fpk v1 / fpk v2  freezepack's format versions (v2 with its byte breakdown)
  paper count      (trainable + whole elements) x 4 bytes: the paper's size count, no mask, no header
  order-0          paper count + every mask at its order-0 entropy (what an i.i.d. mask coder could reach)
  v2 bf16, v2 k4   opt-in LOSSY v2 files: trained values as bfloat16 / as 16 shared values per tensor (kmeans:4)
  narrow, narrow k4  the baseline beside it (LeNet-5 only): a dense LeNet-5 of the same depth, widths scaled by one
                   factor to at most the FreezeNet's trainable numbers (freezepack train --method narrow), trained
                   the same epochs; its .fpk v2, lossless / with its Linear+Conv weights as kmeans:4
(zstd is not in Python 3.11's standard library; lzma -9 stands for the strong general-purpose compressor.)
Also: mask bytes v2 / order-0, value bytes v2 / raw float32, and the v2 value decoder's speed on one core.

    .venv/bin/python tools/bench_size.py [--epochs 1] [--json]
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import lzma
import os
import sys
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freezepack import api  # noqa: E402
from freezepack.experiments import train as T  # noqa: E402
from freezepack.experiments.data import load_mnist, split_train_val  # noqa: E402
from freezepack.experiments.models import make_model  # noqa: E402
from freezepack.format import entropy, maskcode  # noqa: E402
from freezepack.format.reader import open_file  # noqa: E402
from freezepack.method.freezenet import dense_state_dict, freeze_record, make_freezenet  # noqa: E402


class SmallResNet(nn.Module):
    """ResNet for 28x28 MNIST: stem + 4 basic blocks (16-16-32-64-64), parameter-free shortcuts, 9 conv+BN,
    one fc: 56 state_dict tensors, ~150 k parameters."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.blocks = nn.ModuleList()
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2), (64, 1)):
            b = nn.Module()
            b.conv1, b.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            b.conv2, b.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            b.stride, b.pad = stride, cout - cin
            self.blocks.append(b)
            cin = cout
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        for b in self.blocks:
            y = torch.relu(b.bn1(b.conv1(x)))
            y = b.bn2(b.conv2(y))
            s = x[:, :, ::b.stride, ::b.stride] if b.stride > 1 else x
            if b.pad:
                s = torch.nn.functional.pad(s, (0, 0, 0, 0, 0, b.pad))
            x = torch.relu(y + s)
        return self.fc(x.mean((2, 3)))


def build(name, q, epochs, data, seed=0):
    tr, va = split_train_val(data[0], seed)
    model = SmallResNet() if name == "resnet" else make_model("lenet5")
    make_freezenet(model, (tr.images[:T.SNIP_BATCH], tr.labels[:T.SNIP_BATCH]), q, seed, biases="zeros")
    if epochs:
        T.train(model, tr, va, epochs=epochs, seed=seed)
    return model


def baselines(model, rec):
    dense = st_save({k: v.contiguous() for k, v in dense_state_dict(model).items()})
    naive = {}
    for k, v in rec.whole.items():
        naive[k] = v.contiguous()
    for k, ft in rec.frozen.items():
        naive[k + ".mask"] = torch.from_numpy(np.packbits(ft.mask.numpy().reshape(-1)))
        naive[k + ".values"] = ft.values.contiguous()
    packed = st_save(naive)
    pruned = {k: v.clone() for k, v in dense_state_dict(model).items()}
    for k, ft in rec.frozen.items():
        pruned[k] = torch.zeros_like(pruned[k]).reshape(-1).index_put_(
            (torch.from_numpy(np.flatnonzero(ft.mask.numpy())),), ft.values).reshape(pruned[k].shape)
    buf = io.BytesIO()
    torch.save(pruned, buf)
    paper = 4 * (sum(int(ft.mask.sum()) for ft in rec.frozen.values()) + sum(v.numel() for v in rec.whole.values()))
    order0 = sum(maskcode.entropy_bytes(ft.mask.numel(), int(ft.mask.sum())) for ft in rec.frozen.values())
    return {"dense": len(dense), "dense+xz": len(lzma.compress(dense, preset=9)), "packbits+vals": len(packed),
            "packbits+gz": len(gzip.compress(packed, 9)), "pruned.pt+gz": len(gzip.compress(buf.getvalue(), 9)),
            "paper count": paper, "order-0": round(paper + order0),
            "_mask_order0": order0,
            "_values_raw": 4 * sum(int(ft.mask.sum()) for ft in rec.frozen.values())}


def narrow_sizes(budget, epochs, data, seed=0):
    """Bytes of the narrow dense LeNet-5 with at most ``budget`` trainable numbers: lossless and kmeans:4."""
    import tempfile

    from freezepack.experiments.narrow import plan
    from freezepack.method.freezenet import init_weights

    p = plan("lenet5", budget)
    model = init_weights(make_model("lenet5", **p.widths), seed)
    if epochs:
        tr, va = split_train_val(data[0], seed)
        T.train(model, tr, va, epochs=epochs, seed=seed)
    out = {"narrow widths": p.describe(), "narrow trainable": p.trainable}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "n.fpk")
        for col, coding in (("narrow", None), ("narrow k4", "kmeans:4")):
            api.save(path, model, values=coding)
            out[col] = os.path.getsize(path)
    return out


def measure(name, q, epochs, data):
    t0 = time.perf_counter()
    model = build(name, q, epochs, data)
    rec = freeze_record(model)
    order = list(dense_state_dict(model))
    row = {"model": name, "q": q, "tensors": len(order),
           "params": sum(v.numel() for v in dense_state_dict(model).values() if v.is_floating_point())}
    row.update(baselines(model, rec))
    v1 = b"".join(api.encode_record(rec, order, version=1))
    v2 = b"".join(api.encode_record(rec, order, version=2))
    row["fpk v1"], row["fpk v2"] = len(v1), len(v2)
    for col, coding in (("v2 bf16", "bf16"), ("v2 k4", "kmeans:4")):
        row[col] = sum(map(len, api.encode_record(rec, order, version=2, values=coding)))
    n = int.from_bytes(v1[:8], "little")
    row["v1 header"] = 8 + n
    tmp = os.path.join(tempfile.mkdtemp(), "v2.fpk")
    with open(tmp, "wb") as f:
        f.write(v2)
    with open_file(tmp) as r:  # the reader's version-neutral byte breakdown
        row.update({"v2 " + k: v for k, v in r.breakdown().items() if k != "file"})
    row["v2 mask / order-0"] = (row["v2 mask_model"] + row["v2 mask_payload"]) / max(row["_mask_order0"], 1e-9)
    row["v2 values / raw f32"] = row["v2 values_payload"] / max(row["_values_raw"], 1)
    row["v2 structure / file"] = row["v2 structure"] / len(v2)
    best_naive = min(row["packbits+vals"], row["packbits+gz"], row["dense+xz"], row["pruned.pt+gz"])
    row["v2 / best naive"] = len(v2) / best_naive
    if name == "lenet5":
        from freezepack.method.freezenet import trainable_count

        row.update(narrow_sizes(trainable_count(model), epochs, data))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def decode_speed(n=4_000_000, repeat=3):
    """MB/s of float32 output of the 'planes' value decoder on one core, for trained-like values."""
    torch.set_num_threads(1)
    raw = (np.random.default_rng(0).standard_normal(n) * 0.05).astype(np.float32).tobytes()
    tables, payload = entropy.encode_planes(raw, 4)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = entropy.decode_planes(n, 4, tables, payload)
        best = min(best, time.perf_counter() - t)
    assert bytes(out) == raw
    return {"values": n, "ratio": len(payload) / len(raw), "MB/s": len(raw) / best / 1e6}


COLS = ["dense", "dense+xz", "packbits+vals", "packbits+gz", "pruned.pt+gz", "fpk v1", "fpk v2", "paper count",
        "order-0", "v2 bf16", "v2 k4", "narrow", "narrow k4"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1, help="training epochs (0: untrained values)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = load_mnist()
    rows = [measure("lenet5", q, args.epochs, data) for q in (0.9, 0.99, 0.999)]
    rows.append(measure("resnet", 0.9, args.epochs, data))
    speed = decode_speed()
    if args.json:
        print(json.dumps({"rows": rows, "decode": speed, "epochs": args.epochs}, indent=1))
        return 0
    print(f"bytes per file (values trained {args.epochs} epoch(s) on the shipped MNIST subset; SNIP masks)")
    print(f"{'model':>8} {'q':>6} " + " ".join(f"{c:>13}" for c in COLS))
    for r in rows:
        print(f"{r['model']:>8} {r['q']:>6} " + " ".join(f"{r[c]:>13,}" if c in r else f"{'-':>13}" for c in COLS))
    print("narrow = dense LeNet-5 at the FreezeNet's trainable numbers: "
          + "; ".join(f"q={r['q']}: {r['narrow widths']}, {r['narrow trainable']:,} numbers" for r in rows
                      if "narrow" in r))
    print("\nv2 breakdown (bytes) and ratios")
    keys = ["v2 structure", "v2 mask_model", "v2 mask_payload", "v2 value_model", "v2 values_payload",
            "v2 whole_payload", "v1 header"]
    print(f"{'model':>8} {'q':>6} " + " ".join(f"{k[3:] if k.startswith('v2') else k:>14}" for k in keys)
          + f" {'mask/ord0':>9} {'val/raw':>8} {'hdr/file':>8} {'v2/naive':>8}")
    for r in rows:
        print(f"{r['model']:>8} {r['q']:>6} " + " ".join(f"{r[k]:>14,}" for k in keys)
              + f" {r['v2 mask / order-0']:>9.3f} {r['v2 values / raw f32']:>8.3f} {r['v2 structure / file']:>8.3f}"
              f" {r['v2 / best naive']:>8.3f}")
    print(f"\n'planes' value decoder, one core: {speed['MB/s']:.0f} MB/s of float32 output "
          f"({speed['values']:,} values, {speed['ratio']:.3f}x raw)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
