"""The baseline a skeptical user asks for: a dense model, narrowed, with at most a FreezeNet's trainable numbers.

A FreezeNet at freezing rate q trains ``N`` numbers: its trainable weight entries (||m||_0) plus every bias and
norm parameter (BatchNorm/LayerNorm weight and bias; running statistics are buffers and count in neither model).
The *narrow* baseline keeps the architecture's depth and scales every layer width by one factor ``f``
(width_i = max(1, round(f * base_i)), halves rounded up), choosing the widest such model with at most ``N``
trainable numbers — all of them trainable, since it is dense. It is then trained with the same recipe and seed.

Which constructor arguments are widths:

* the paper's models: :data:`.models.WIDTHS` (``lenet5``: conv1, conv2, fc3; ``lenet300``: fc1, fc2; ``vgg16``:
  the 13 conv widths and fc);
* a user's ``package.module:Class``: the integer keyword arguments named with ``NAME`` or ``NAME=BASE``
  (``--width-arg`` on the CLI); ``BASE`` is the full width, default the argument's default value. Without any,
  a constructor argument called ``width`` with an integer default is used.

:func:`count_macs` counts the multiply-adds of one inference (Linear, Bilinear and Conv/ConvTranspose layers, by
forward hooks; a FreezeNet computes with its full dense weights, so it costs what its architecture costs).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..method.freezenet import trainable_count
from .models import MODELS, WIDTHS, make_model, user_factory


@dataclass(frozen=True)
class NarrowPlan:
    """The narrowed model: its constructor widths, the factor, and the counts that prove it is the widest."""

    model: str
    widths: dict                   # constructor keyword arguments of the narrow model
    factor: float                  # widths = max(1, round(factor * base widths))
    trainable: int                 # its trainable numbers (all of its parameters: it is dense)
    max_trainable: int             # the budget: at most this many
    next_trainable: int | None     # one width step wider (None: the full-width model already fits)
    base: dict = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, tuple) else v}"
                         for k, v in self.widths.items())


def base_widths(model: str, width_args=()) -> dict:
    """``{argument: full width}`` (an int, or a tuple of ints for VGG16's conv widths) of ``model``."""
    if ":" not in model:
        if model not in MODELS:
            make_model(model)  # the unknown-model error
        if width_args:
            raise UsageError(f"--width-arg is for your own module:Class; {model!r} scales "
                             f"{', '.join(WIDTHS[model])}")
        return dict(WIDTHS[model])
    factory = user_factory(model)
    name = getattr(factory, "__name__", model)
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not width_args:
        w = params.get("width")
        if w is None or not _is_width(w.default):
            raise UsageError(f"model {model!r}: {name} has no width argument. Name the constructor argument(s) "
                             f"that set its layer widths: --width-arg NAME (an int with a default) or "
                             f"--width-arg NAME=FULL_WIDTH; or give {name} an int keyword argument `width`")
        width_args = ("width",)
    out = {}
    for spec in width_args:
        arg, eq, value = str(spec).partition("=")
        arg = arg.strip()
        if not arg.isidentifier():
            raise UsageError(f"--width-arg {spec!r}: expected NAME or NAME=FULL_WIDTH")
        if arg not in params and not var_kw:
            raise UsageError(f"model {model!r}: {name} has no argument {arg!r} "
                             f"(its arguments: {', '.join(params) or 'none'})")
        base: Any
        if eq:
            try:
                base = int(value)
            except ValueError:
                raise UsageError(f"--width-arg {spec!r}: FULL_WIDTH must be an integer") from None
        else:
            base = params[arg].default if arg in params else None
            if not _is_width(base):
                raise UsageError(f"model {model!r}: {name}'s argument {arg!r} has no integer default; "
                                 f"give its full width: --width-arg {arg}=N")
        if base < 1:
            raise UsageError(f"--width-arg {spec!r}: the full width must be at least 1")
        out[arg] = base
    return out


def _is_width(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _ints(base: dict) -> list[int]:
    return [x for v in base.values() for x in (v if isinstance(v, tuple) else (v,))]


def scale(base: dict, factor: Fraction) -> dict:
    """Every width times ``factor``, rounded half up, at least 1 (exact rational arithmetic: no ties by float)."""
    def one(b: int) -> int:
        return max(1, math.floor(b * factor + Fraction(1, 2)))

    return {k: tuple(one(b) for b in v) if isinstance(v, tuple) else one(v) for k, v in base.items()}


def width_steps(base: dict, up_to: Fraction = Fraction(1)) -> list[Fraction]:
    """The factors in [0, ``up_to``] at which some width grows by one, ascending (0: every width 1). Between two
    consecutive steps the model does not change, so these are all the distinct narrow models."""
    steps = {Fraction(0)}
    for b in set(_ints(base)):
        top = math.floor(b * up_to + Fraction(1, 2))
        steps.update(Fraction(2 * w - 1, 2 * b) for w in range(2, top + 1))
    return sorted(s for s in steps if s <= up_to)


def _build(model: str, widths: dict, meta: bool = True) -> nn.Module:
    """The model at ``widths``; on the meta device (no memory, no init) when it builds there."""
    if meta:
        try:
            with torch.device("meta"):
                return make_model(model, **widths)
        except Exception:  # e.g. a user's model that cannot be built on meta: build it for real (and report that)
            pass
    return make_model(model, **widths)


def count_trainable(model: str, widths: dict) -> int:
    return trainable_count(_build(model, widths))


def plan(model: str, max_trainable: int, width_args=()) -> NarrowPlan:
    """The widest narrowing of ``model`` (one factor on every width, factor <= 1) with at most ``max_trainable``
    trainable numbers. Assumes the count grows with each width (true for stacks of Linear/Conv/norm layers)."""
    if max_trainable < 1:
        raise UsageError(f"the trainable-number budget must be positive, got {max_trainable}")
    base = base_widths(model, width_args)
    steps = width_steps(base)
    counts: dict[int, int] = {}

    def count(i: int) -> int:
        if i not in counts:
            counts[i] = count_trainable(model, scale(base, steps[i]))
        return counts[i]

    if count(0) > max_trainable:
        raise UsageError(f"model {model!r}: even with every width 1 it trains {count(0):,} numbers, more than "
                         f"the budget of {max_trainable:,}")
    lo, hi = 0, len(steps) - 1  # invariant: count(lo) <= budget; answer in [lo, hi]
    if count(hi) <= max_trainable:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= max_trainable:
            lo = mid
        else:
            hi = mid - 1
    nxt = count(lo + 1) if lo + 1 < len(steps) else None
    return NarrowPlan(model, scale(base, steps[lo]), float(steps[lo]), count(lo), max_trainable, nxt, base)


def freezenet_trainable(model: str, q: float, seed: int, batch, init: str = "xavier_normal",
                        init_params: dict | None = None) -> int:
    """Trainable numbers of the FreezeNet ``freezepack train --q q --seed seed`` builds (SNIP mask on ``batch``):
    ||m||_0 + biases + norm parameters."""
    from .train import build

    return trainable_count(build(model, "freezenet", q, seed, batch, init=init, init_params=init_params))


_HOOKED = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
           nn.ConvTranspose3d)


def _macs(m: nn.Module, inputs, out: torch.Tensor) -> int:
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    if isinstance(m, nn.Bilinear):
        return out.numel() * m.in1_features * m.in2_features
    assert isinstance(m, nn.modules.conv._ConvNd)
    k = math.prod(m.kernel_size)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):  # every input element meets out_channels/groups kernels
        return inputs[0].numel() * (m.out_channels // m.groups) * k
    return out.numel() * (m.in_channels // m.groups) * k


@torch.no_grad()
def count_macs(model: nn.Module, input_shape=(1, 28, 28)) -> int:
    """Multiply-adds of one inference on one input of ``input_shape`` (no batch dimension): Linear, Bilinear,
    Conv and ConvTranspose layers, counted by forward hooks (bias additions, activations, pooling and
    normalisation are not counted; nor are matmuls written inline in ``forward``)."""
    total = [0]
    hooks = [m.register_forward_hook(lambda mod, i, o: total.__setitem__(0, total[0] + _macs(mod, i, o)))
             for m in model.modules() if isinstance(m, _HOOKED)]
    was = model.training
    try:
        model.eval()
        p = next(iter(model.parameters()), None)
        model(torch.zeros((1, *input_shape), device=p.device if p is not None else None,
                          dtype=p.dtype if p is not None and p.is_floating_point() else None))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return total[0]


def plan_for(config, data=None, *, width_args=(), max_trainable: int | None = None,
             datasets=None) -> tuple[NarrowPlan, dict]:
    """The narrow model ``freezepack train --method narrow`` trains for ``config`` (a :class:`.train.TrainConfig`
    of the FreezeNet it stands beside), and the facts to report. Budget: ``max_trainable`` or the trainable
    numbers of the FreezeNet at ``config.q`` with ``config.seed`` (SNIP mask on the same batch run() scores on)."""
    if max_trainable is None:
        from .data import load_mnist, split_train_val
        from .train import SNIP_BATCH

        tr, _ = split_train_val((datasets or load_mnist(data))[0], config.seed)
        max_trainable = freezenet_trainable(config.model, config.q, config.seed,
                                            (tr.images[:SNIP_BATCH], tr.labels[:SNIP_BATCH]), config.init,
                                            config.init_params)
        budget_from = f" (the FreezeNet's at q={config.q:g})"
    else:
        budget_from = " (--max-trainable)"
    p = plan(config.model, max_trainable, width_args)
    facts = {"widths": {k: list(v) if isinstance(v, tuple) else v for k, v in p.widths.items()},
             "widths_text": p.describe(), "width_factor": p.factor, "max_trainable": p.max_trainable,
             "budget_from": budget_from, "next_trainable": p.next_trainable}
    return p, facts
