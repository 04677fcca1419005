"""Number formats shared by every layer: their names and their width in bytes."""

from __future__ import annotations

import math
from typing import Literal

from matrixstack.errors import UserError

Dtype = Literal["fp32", "bf16", "fp16", "fp8", "int8", "fp4"]

BYTES_PER_ELEMENT: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "fp4": 0.5,
}


def parse_dtype(text: str) -> Dtype:
    """Return `text` as a Dtype, or raise UserError listing the known dtypes."""
    if text not in BYTES_PER_ELEMENT:
        raise UserError(f"unknown dtype {text!r}; use one of {', '.join(BYTES_PER_ELEMENT)}")
    return text  # type: ignore[return-value]


def bytes_for(elements: int, dtype: Dtype) -> int:
    """Return the bytes that `elements` values take in `dtype`, rounded up to a whole byte."""
    return math.ceil(elements * BYTES_PER_ELEMENT[dtype])
