"""Compute dtypes by name: the one parser behind every `dtype=` argument and `--dtype` option."""

from __future__ import annotations

from typing import Any

import torch

DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str | Any) -> torch.dtype:
    """A torch.dtype from a dtype or one of DTYPE_NAMES (case-insensitive); ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}") from None


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the released weights' dtype), fp32 on the CPU (where bf16 matmuls are slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype | str) -> str:
    """'float32', 'bfloat16'...: the name manifests store (any torch.dtype, or a name parse_dtype knows)."""
    return str(dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype)).replace("torch.", "")
