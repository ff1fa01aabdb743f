"""Element types, once: safetensors names, sizes, which may be frozen, the v2 code order, and torch's twins.

Rounding a float to F16/BF16 lives here too (torch's round-to-nearest-even casts), so the rules, the api and the
writers agree on what "exactly an F16 number" means.
"""
from __future__ import annotations

import numpy as np
import torch

# safetensors dtype name -> bytes per element. The order is v2's dtype code (spec/FORMAT.md §12.4): never reorder.
DTYPE_SIZES: dict[str, int] = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                               "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DTYPES: tuple[str, ...] = tuple(DTYPE_SIZES)
# Dense dtypes a frozen tensor may have: the generator makes float32, a reader rounds to the others (spec §5.3).
FROZEN_DTYPES: tuple[str, ...] = ("F32", "F16", "BF16")

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
FROZEN_TORCH_DTYPES: dict[torch.dtype, str] = {TORCH_DTYPES[k]: k for k in FROZEN_DTYPES}

F32_MAX = 3.4028234663852886e38


def round_float(x: float, dtype: str) -> float:
    """``x`` rounded to ``dtype`` (F32/F16/BF16) with round-to-nearest-even, as a Python float (via float32 first,
    as every frozen value is: the generator's output is float32)."""
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32).to(TORCH_DTYPES[dtype]))


def is_float32(v: float) -> bool:
    """A finite number that float32 holds exactly."""
    return isinstance(v, float) and abs(v) <= F32_MAX and float(np.float32(v)) == v
