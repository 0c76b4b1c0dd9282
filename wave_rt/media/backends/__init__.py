"""Decoding backends: `cpu` (PyAV/FFmpeg) and `dali` (NVIDIA DALI, GPU decoders with CPU operators where DALI
has them). `auto` picks DALI on a CUDA machine with DALI installed, else the CPU backend."""

from __future__ import annotations

import functools

BACKENDS = ("auto", "cpu", "dali")


@functools.lru_cache(maxsize=1)
def _dali_usable() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("nvidia.dali") is not None


def resolve_backend(backend: str) -> str:
    """'auto' -> 'dali' where CUDA and DALI are both present, else 'cpu'; any other name is checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "dali" if _dali_usable() else "cpu"
    return backend
