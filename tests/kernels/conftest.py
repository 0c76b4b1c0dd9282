"""Shared setup for the wave_rt.kernels tests.

* `poison`: every output and workspace the Triton paths allocate through ``_dispatch.empty`` starts as NaN
  (floats) or -7777 (ints), so an element a kernel forgets to write shows up in the comparison.
* `seed`: fresh random inputs on every run; the seed is printed, so a failure can be replayed with
  ``WAVE_RT_TEST_SEED=<seed>``.
* `accuracy`: the accuracy rule of issue 3. A fast path may be at most twice as far from the float64
  reference as the plain PyTorch reference evaluated in the same dtype, plus a small floor (relative to the
  size of the result) for results the baseline happens to get exactly right.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from wave_rt.kernels import _dispatch as dispatch

CPU_BACKENDS = ("interpret", "torch")
CPU_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = (torch.bfloat16, torch.float16)

# Floor of the accuracy rule, in units of the dtype's epsilon times the largest reference magnitude. fp32
# errors of two summation orders over a few thousand terms differ by several times, so a ratio of two of
# them is noise: the fp32 floor (~4e-6 relative, far below any real defect) keeps the checks free of
# flakiness. For fp16/bf16 it is half an ulp of the largest result, the granularity of the result itself:
# with few, large outputs (the [L] gradient of scalar_mix) the baseline can round every one of them the
# right way while an fp32-accurate result lands one ulp off, which alone would exceed 2x the baseline.
_FLOOR_EPS = {torch.float32: 32.0, torch.float16: 0.5, torch.bfloat16: 0.5}


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(dispatch, "poison_outputs", True)
    yield


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("WAVE_RT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"random seed: WAVE_RT_TEST_SEED={value}")
    torch.manual_seed(value)
    return value


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request: pytest.FixtureRequest) -> str:
    """The CPU backends every op is tested on: the Triton kernels in the interpreter, and the torch fallback."""
    return request.param


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


def max_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    if result.numel() == 0:
        return 0.0
    return (result.detach().double().cpu() - reference.detach().double().cpu()).abs().max().item()


def allowed_error(reference64: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype) -> float:
    """2 x (error of the same-dtype PyTorch baseline) + floor."""
    scale = max(1.0, reference64.detach().abs().max().item()) if reference64.numel() else 1.0
    floor = _FLOOR_EPS[dtype] * torch.finfo(dtype).eps * scale
    return 2.0 * max_error(baseline, reference64) + floor


class Accuracy:
    allowed = staticmethod(allowed_error)

    def __call__(self, name: str, result: torch.Tensor, reference64: torch.Tensor, baseline: torch.Tensor,
                 dtype: torch.dtype) -> None:
        """Assert the accuracy rule for one output (or gradient) `name`."""
        assert result.shape == reference64.shape, f"{name}: shape {tuple(result.shape)} != {tuple(reference64.shape)}"
        assert not torch.isnan(result).any(), f"{name}: NaN in the result (an element was never written?)"
        err = max_error(result, reference64)
        allowed = allowed_error(reference64, baseline, dtype)
        assert err <= allowed, (f"{name}: max error {err:.3e} vs float64 exceeds {allowed:.3e} "
                                f"(baseline {dtype} error {max_error(baseline, reference64):.3e})")


@pytest.fixture
def accuracy() -> Accuracy:
    return Accuracy()
