"""The initializer table, once: name -> distribution and the arguments a file records (type, torch's default,
allowed values). ``init.make_init`` takes its defaults from here, the header rules check ``init.params`` against it
(both versions alike), and the v2 writer omits params equal to the defaults listed here.

The order of :data:`INITIALIZERS` is v2's initializer code (spec/FORMAT.md §12.5): never reorder, only append.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# calculate_gain's nonlinearities (init.calculate_gain): what a kaiming initializer may record
NONLINEARITIES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                  "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")
FAN_MODES = ("fan_in", "fan_out")


@dataclass(frozen=True)
class Param:
    """One recorded argument: its JSON type (float or str), torch's default, and for a string the allowed values."""

    type: type
    default: float | str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Initializer:
    name: str
    dist: str                                  # normal | uniform | sign | constant (init.DISTRIBUTIONS)
    params: dict[str, Param] = field(default_factory=dict)
    fan: bool = False                          # scaled by fan-in/fan-out: needs a tensor of >= 2 dimensions

    def defaults(self) -> dict[str, float | str]:
        return {k: p.default for k, p in self.params.items()}


_GAIN = {"gain": Param(float, 1.0)}
_KAIMING = {"a": Param(float, 0.0), "mode": Param(str, "fan_in", FAN_MODES),
            "nonlinearity": Param(str, "leaky_relu", NONLINEARITIES)}

TABLE: dict[str, Initializer] = {i.name: i for i in (
    Initializer("xavier_normal", "normal", _GAIN, fan=True),
    Initializer("xavier_uniform", "uniform", _GAIN, fan=True),
    Initializer("kaiming_normal", "normal", _KAIMING, fan=True),
    Initializer("kaiming_uniform", "uniform", _KAIMING, fan=True),
    Initializer("normal", "normal", {"mean": Param(float, 0.0), "std": Param(float, 1.0)}),
    Initializer("uniform", "uniform", {"a": Param(float, 0.0), "b": Param(float, 1.0)}),
    Initializer("pm_sigma", "sign", _GAIN, fan=True),
    Initializer("zeros", "constant"),
    Initializer("constant", "constant", {"val": Param(float, 0.0)}),
)}
INITIALIZERS: tuple[str, ...] = tuple(TABLE)


def params_problem(name: str, params: object) -> str | None:
    """Why ``params`` is not a valid ``init.params`` record of initializer ``name`` (None when it is): exactly the
    table's keys, each of its JSON type (a float written as a float), strings among the allowed values."""
    ini = TABLE.get(name)
    if ini is None:
        return f"unknown initializer {name!r} (known: {', '.join(INITIALIZERS)})"
    spelled = ", ".join(f"{k}: {'float' if p.type is float else 'string'}" for k, p in ini.params.items())
    if not isinstance(params, dict) or set(params) != set(ini.params) or \
            not all(type(params[k]) is p.type for k, p in ini.params.items()):
        r = repr(params)
        return f"init params of {name!r} must be exactly {{{spelled}}}, got {r if len(r) <= 60 else r[:57] + '...'}"
    for k, p in ini.params.items():
        if p.choices and params[k] not in p.choices:
            return f"init param {k}={params[k]!r} of {name!r} is not one of {', '.join(p.choices)}"
    return None
