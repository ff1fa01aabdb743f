"""Named initializers on the spec'd generator: the only place where weight distributions live.

``make_init(name, shape, **params)`` does the fan-in/fan-out math once (as ``torch.nn.init`` does) and keeps the
result as float32 constants inside an :class:`InitSpec`. Files store those constants, so a loader never redoes
platform-dependent float math: regeneration is ``words -> (uniform | normal | sign) -> one or two float32 ops``.

Every spec reduces to one of four distributions (spec/RNG.md, "Initializers"):
    normal    w = a + b * z        z standard normal        (a = mean, b = std)
    uniform   w = a + b * u        u in (0, 1)              (a = low,  b = span = high - low)
    sign      w = a * s            s = +-1 with prob. 1/2   (a = sigma)
    constant  w = a                no random bits used
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SpecError
from . import eager, native, rng
from .initializers import INITIALIZERS, NONLINEARITIES, TABLE

DISTRIBUTIONS = ("normal", "uniform", "sign", "constant")


def _f32(x: float) -> float:
    """Round once to float32 (and keep it as the exactly equal Python float)."""
    return float(np.float32(x))


def fans(shape) -> tuple[int, int]:
    """fan_in, fan_out exactly as torch.nn.init._calculate_fan_in_and_fan_out computes them."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise SpecError(f"fan in and fan out need a tensor of at least 2 dimensions, got shape {shape}")
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """torch.nn.init.calculate_gain, restated so results are computed in Python float64 the same everywhere."""
    if nonlinearity in NONLINEARITIES[:8]:  # the linear ones
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise SpecError(f"unsupported nonlinearity {nonlinearity!r}")


@dataclass(frozen=True)
class InitSpec:
    """A fully resolved initializer: what a file stores for a tensor's frozen part."""

    name: str
    dist: str
    a: float
    b: float = 0.0
    params: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.dist not in DISTRIBUTIONS:
            raise SpecError(f"unknown distribution {self.dist!r} (known: {', '.join(DISTRIBUTIONS)})")
        for k in ("a", "b"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or _f32(v) != v:
                raise SpecError(f"initializer {self.name!r}: {k}={v!r} is not a finite float32 value")

    @property
    def uses_bits(self) -> bool:
        return self.dist != "constant"

    def to_json(self) -> dict:
        return {"name": self.name, "dist": self.dist, "a": self.a, "b": self.b, "params": dict(self.params)}

    @classmethod
    def from_json(cls, d) -> InitSpec:
        if not isinstance(d, dict):
            raise SpecError("initializer record must be a JSON object")
        try:
            return cls(name=str(d["name"]), dist=d["dist"], a=d["a"], b=d.get("b", 0.0),
                       params=dict(d.get("params", {})))
        except KeyError as e:
            raise SpecError(f"initializer record lacks field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise SpecError(f"initializer record is malformed: {e}") from None


def _fan(shape, mode: str) -> int:
    fan_in, fan_out = fans(shape)
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    raise SpecError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")


def make_init(name: str, shape=(), **params) -> InitSpec:
    """Resolve an initializer for a tensor shape, matching torch.nn.init's distributions.

    Names: xavier_normal(gain), xavier_uniform(gain), kaiming_normal(a, mode, nonlinearity),
    kaiming_uniform(a, mode, nonlinearity), normal(mean, std), uniform(a, b), pm_sigma(gain), zeros,
    constant(val). Defaults are torch's (freezepack.format.initializers.TABLE).
    """
    p = dict(params)
    defaults = TABLE[name].defaults() if name in TABLE else {}

    def take(key):  # the user's value, else torch's default from the one table (initializers.TABLE)
        return p.pop(key, defaults[key])

    if name == "xavier_normal":
        gain = float(take("gain"))
        fi, fo = fans(shape)
        spec = InitSpec(name, "normal", 0.0, _f32(gain * math.sqrt(2.0 / float(fi + fo))), {"gain": gain})
    elif name == "xavier_uniform":
        gain = float(take("gain"))
        fi, fo = fans(shape)
        bound = _f32(gain * math.sqrt(3.0) * math.sqrt(2.0 / float(fi + fo)))
        spec = InitSpec(name, "uniform", -bound, _f32(2.0 * bound), {"gain": gain})
    elif name in ("kaiming_normal", "kaiming_uniform"):
        a = float(take("a"))
        mode = take("mode")
        nl = take("nonlinearity")
        std = calculate_gain(nl, a) / math.sqrt(_fan(shape, mode))
        kw = {"a": a, "mode": mode, "nonlinearity": nl}
        if name == "kaiming_normal":
            spec = InitSpec(name, "normal", 0.0, _f32(std), kw)
        else:
            bound = _f32(math.sqrt(3.0) * std)
            spec = InitSpec(name, "uniform", -bound, _f32(2.0 * bound), kw)
    elif name == "normal":
        mean, std = float(take("mean")), float(take("std"))
        spec = InitSpec(name, "normal", _f32(mean), _f32(std), {"mean": mean, "std": std})
    elif name == "uniform":
        lo, hi = float(take("a")), float(take("b"))
        spec = InitSpec(name, "uniform", _f32(lo), _f32(hi - lo), {"a": lo, "b": hi})
    elif name == "pm_sigma":
        gain = float(take("gain"))
        fi, fo = fans(shape)
        spec = InitSpec(name, "sign", _f32(gain * math.sqrt(2.0 / float(fi + fo))), 0.0, {"gain": gain})
    elif name == "zeros":
        spec = InitSpec(name, "constant", 0.0, 0.0, {})
    elif name == "constant":
        val = float(take("val"))
        spec = InitSpec(name, "constant", _f32(val), 0.0, {"val": val})
    else:
        raise SpecError(f"unknown initializer {name!r} (known: {', '.join(INITIALIZERS)})")
    if p:
        raise SpecError(f"initializer {name!r} got unknown parameters: {', '.join(sorted(p))}")
    return spec


def _numel(shape) -> int:
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise SpecError(f"negative dimension in shape {shape}")
    return math.prod(shape)


def generate_np(spec: InitSpec, shape, seed: int, name: str) -> np.ndarray:
    """Reference regeneration in plain numpy (slow, obvious)."""
    n = _numel(shape)
    if spec.dist == "constant":
        return np.full(shape, spec.a, dtype=np.float32)
    w = rng.words_np(seed, rng.stream_id(name), 0, n)
    a, b = np.float32(spec.a), np.float32(spec.b)
    if spec.dist == "normal":
        out = a + b * rng.normal_np(w)
    elif spec.dist == "uniform":
        out = a + b * rng.uniform_np(w)
    else:
        out = a * rng.sign_np(w)
    return out.astype(np.float32).reshape(shape)


def generate(spec: InitSpec, shape, seed: int, name: str, *, device=None, out: torch.Tensor | None = None,
             chunk: int | None = None, start: int = 0, threads: int | None = None) -> torch.Tensor:
    """Regenerate a float32 tensor straight on ``device`` (or into ``out``), ``chunk`` elements at a time.

    ``chunk`` bounds the torch path's batches (its workspace is about 24 bytes per element); the default keeps them
    in cache on a CPU and uses fewer, larger launches on an accelerator (freezepack/format/eager.py). It never
    changes a bit. ``start``: the elements ``[start, start + numel)`` of the tensor's stream (a piece of a bigger
    tensor, flattened), for streaming.
    ``threads``: CPU threads of the generator (default torch's CPU threads); never changes a bit either.
    """
    shape = tuple(int(s) for s in shape)
    n = _numel(shape)
    rng.check_seed(seed)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    elif out.shape != torch.Size(shape) or out.dtype != torch.float32 or not out.is_contiguous():
        raise SpecError(f"out must be a contiguous float32 tensor of shape {shape}")
    if spec.dist == "constant":
        return out.fill_(spec.a)
    if chunk is not None and chunk <= 0:
        raise SpecError("chunk must be positive")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= 2**64 - n:
        raise SpecError(f"start must be an integer with start + numel <= 2**64, got {start!r}")
    if n == 0:
        return out
    flat = out.view(-1)
    stream = rng.stream_id(name)
    if out.device.type == "cpu" and not out.requires_grad and native.available():
        # Compiled kernel (freezepack/format/_philox.c): same bits as the numpy reference, written straight into out.
        native.fill(flat, spec.dist, spec.a, spec.b, seed, stream, start=start, threads=threads)
        return out
    eager.fill(flat, spec.dist, spec.a, spec.b, seed, stream, start=start, chunk=chunk, threads=threads)
    return out
