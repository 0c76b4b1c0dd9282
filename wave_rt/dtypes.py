"""Devices and compute dtypes by name: the one parser behind every `device=` / `dtype=` argument and every
`--device` / `--dtype` option."""

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


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The device to run on: `device` when this process can use it (None: the first CUDA device if there is one,
    else the CPU). A device it cannot use raises DeviceError before any model is built (torch's own failure on
    a CPU-only build is an AssertionError deep inside the first .to())."""
    from wave_rt.errors import DeviceError

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(device, str(exc)) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise DeviceError(device, f"{why}; use device='cpu' (or --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(device, f"only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if callable(available) and not available():
            raise DeviceError(device, f"no {dev.type} device is available")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the released weights' dtype), fp32 on the CPU (where bf16 matmuls are slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype | str) -> str:
    """'float32', 'bfloat16'...: the name manifests store (any torch.dtype, or a name parse_dtype knows)."""
    return str(dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype)).replace("torch.", "")
