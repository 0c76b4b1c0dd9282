"""Argument checks shared by the kernel entry points: one typed error that names the op, the argument and
what is wrong with it, raised before any launch (a bad shape inside a kernel reads out of bounds)."""

from __future__ import annotations

import torch

from wave_rt.errors import WaveRTError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelArgumentError(WaveRTError, ValueError):
    """A tensor given to a wave_rt.kernels op has the wrong shape, dtype or device."""

    def __init__(self, op: str, argument: str, reason: str) -> None:
        self.op = op
        self.argument = argument
        self.reason = reason
        super().__init__(f"{op}: argument '{argument}' {reason}")


def check_tensor(op: str, name: str, t: object, ndim: int | None = None,
                 dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(op, name, f"must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise KernelArgumentError(op, name, f"must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise KernelArgumentError(op, name, f"has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    return t


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise KernelArgumentError(op, "/".join(devices), f"must be on one device ({listing})")


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} is {d}" for n, d in dtypes.items())
        raise KernelArgumentError(op, "/".join(dtypes), f"must share one dtype ({listing})")
