"""The paper's printed numbers (Wimmer, Mehnert, Condurache: FreezeNet) and the paper's way of computing them.

Table 2 (LeNet-5-Caffe, MNIST) and Table 3 (VGG16-D, CIFAR) print sizes, factors and trained-parameter counts
rounded to a few digits. Working backwards from every printed value shows exactly how they were computed:

* Network size (Table 2) = ((1 - q) * P + |B|) * 4 bytes / 1024, with P = *all* parameters (431,080), not only the
  weights |W| = 430,500. Only this reading gives the printed 170.7 kB at q = 0.9 (the weights-only count gives
  170.4 kB); at the other rates both readings round to the same printed value.
* Compression factor (Table 2) = printed baseline size / printed (rounded) size: 1,683.9 / 10.7 = 157.4 and
  1,683.9 / 3.9 = 431.8. The paper's own size rule unrounded gives 157.6 and 426.4; the exact trained counts of
  the real model (2,732 and 1,010 numbers) give 157.8 and 426.8, the values ``freezepack table2`` reports.
* Trained parameters (Table 3) = (1 - q) * 15.3 mio (the *rounded* total) + |B|: 169k at q = 0.99, whereas the
  exact count from the architecture, (1 - q) * |W| + |B|, is 168k.

``paper_way_*`` reproduce the printed values with those rules; the real counts come from the saved files.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

KB = 1024  # the paper's kB


@dataclass(frozen=True)
class Table2Row:
    q: float
    q_beta: float | None
    size_kb: float
    factor: float
    acc_snip: float | None
    acc_freezenet: float | None


# Table 2 exactly as printed (accuracies in %, full MNIST, mean of 5 runs).
TABLE2 = (
    Table2Row(0.0, None, 1683.9, 1.0, None, 99.36),
    Table2Row(0.9, 0.899, 170.7, 9.9, 99.24, 99.37),
    Table2Row(0.99, 0.989, 19.1, 88.2, 98.80, 98.94),
    Table2Row(0.995, 0.994, 10.7, 157.4, 98.02, 98.55),
    Table2Row(0.999, 0.998, 3.9, 431.8, 20.57, 95.61),
)

# Table 3, trained parameters as printed (VGG16-D; total "15.3mio").
TABLE3_TRAINED = {0.9: "1.5mio", 0.95: "780k", 0.99: "169k", 0.995: "92k"}


def size_kb(n_params: float) -> float:
    return n_params * 4 / KB


def q_beta(weights_trainable: int, n_weights: int, n_biases: int) -> float:
    """Real freezing rate over all parameters (paper, sect. 3): 1 - (|m|_0 + |B|) / (|W| + |B|)."""
    return 1.0 - (weights_trainable + n_biases) / (n_weights + n_biases)


def paper_way_size_kb(q: float, n_total: int, n_biases: int) -> float:
    """Table 2's network size: ((1 - q) * all parameters + biases) * 4 / 1024 (baseline: all parameters)."""
    if q == 0:
        return size_kb(n_total)
    return size_kb((1 - q) * n_total + n_biases)


def paper_way_factor(baseline_kb_printed: float, size_kb_printed: float) -> float:
    """Table 2's compression factor: ratio of the *printed* (rounded to 0.1 kB) sizes."""
    return baseline_kb_printed / size_kb_printed


def paper_way_table3(q: float, n_biases: int, total_printed_mio: float = 15.3) -> float:
    """Table 3's trained-parameter count: (1 - q) * 15.3 mio (rounded total) + biases/BN parameters."""
    return (1 - q) * total_printed_mio * 1e6 + n_biases


def parse_printed(text: str) -> tuple[float, float]:
    """A printed count like '1.5mio', '780k', '169k' -> (value, half a unit of its last significant digit).

    Trailing zeros of an integer mantissa are taken as not significant ('780k' = 78 x 10k), the usual reading.
    """
    suffix = next((s for s in ("mio", "k") if text.endswith(s)), None)
    if suffix is None:
        raise UsageError(f"not a printed count: {text!r}")
    mantissa, unit = text[: -len(suffix)], {"mio": 1e6, "k": 1e3}[suffix]
    if "." in mantissa:
        step = 10.0 ** -len(mantissa.split(".")[1])
    else:
        stripped = mantissa.rstrip("0")
        step = 10.0 ** (len(mantissa) - len(stripped))
    return float(mantissa) * unit, step * unit / 2


def matches_printed(value: float, text: str) -> bool:
    """Does ``value`` round to the printed count ``text`` (to its printed precision)?"""
    printed, half = parse_printed(text)
    return abs(value - printed) <= half + 1e-9
