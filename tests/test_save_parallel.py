"""Parallel saving: the same bytes for any thread count, and the first error in file order."""
import pytest
import torch

import freezepack
from freezepack.format import init
from freezepack.format.record import FrozenTensor
from freezepack.method.freezenet import make_freezenet
from freezepack.testing import random_mask, small_record

THREADS = (1, 2, 4)


def _record():
    rec = small_record()
    g = torch.Generator().manual_seed(2)
    for name, shape, dtype in (("big.weight", (200, 150), torch.float32), ("h.weight", (40, 30), torch.bfloat16)):
        m = random_mask(shape, 0.95, g)
        rec.frozen[name] = FrozenTensor(init.make_init("xavier_normal", shape), m,
                                        torch.randn(int(m.sum()), generator=g).to(dtype))
    rec.whole["steps"] = torch.tensor([3, 1, 4])
    rec.aliases["tied.weight"] = "big.weight"
    return rec


@pytest.mark.parametrize("version", [1, 2])
def test_save_gives_the_same_bytes_for_any_thread_count(tmp_path, version):
    rec = _record()
    blobs = []
    for threads in THREADS:
        freezepack.save(tmp_path / f"r{threads}.fpk", rec, {"k": "v"}, version=version, threads=threads)
        blobs.append((tmp_path / f"r{threads}.fpk").read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]


def test_module_save_with_lossy_values_and_ties_is_the_same_for_any_thread_count(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 50))
    model[2].weight = torch.nn.Parameter(torch.randn(50, 32))
    make_freezenet(model, None, q=0.9, seed=3, method="random")
    blobs = []
    for threads in THREADS:
        freezepack.save(tmp_path / f"m{threads}.fpk", model, values="kmeans:4", threads=threads)
        blobs.append((tmp_path / f"m{threads}.fpk").read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]


@pytest.mark.parametrize("threads", THREADS)
def test_the_first_bad_tensor_in_order_is_the_error_for_any_thread_count(tmp_path, threads):
    rec = _record()
    rec.frozen["h.weight"] = FrozenTensor(rec.frozen["h.weight"].init, rec.frozen["h.weight"].mask,
                                          torch.zeros(3, dtype=torch.bfloat16))  # wrong count of values
    rec.whole["steps"] = [1, 2]  # not a tensor: later in the order
    with pytest.raises(freezepack.UsageError) as err:
        freezepack.save(tmp_path / "bad.fpk", rec, threads=threads)
    assert err.value.tensor == "h.weight" and not (tmp_path / "bad.fpk").exists()
