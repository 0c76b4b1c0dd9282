"""The contrastive objective: symmetric InfoNCE through wave_rt.kernels.info_nce, with a fixed or
learnable temperature and an optional false-negative margin (ALM2Vec).

Dispatch: float16/bfloat16/float32 embeddings go to the info_nce kernel (Triton on CUDA, its chunked
torch path on the CPU), across ranks to info_nce_distributed; float64 (the exactness tests, CPU-only
double-precision runs) goes to kernels.reference.info_nce_reference, the full-matrix definition the kernel
is tested against, since the kernel has no float64 path. Rows with explicit negatives (QA options) use
ContrastiveLoss.options instead: each query against its own answer and options only, as WAVE trains them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from wave_rt.kernels import info_nce, info_nce_distributed
from wave_rt.kernels.reference import info_nce_reference


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ContrastiveLoss(nn.Module):
    """loss(q [B, D], d [M, D]) with d[:B] the positives of q and d[B:] extra negatives.

    With `learnable_temperature` the parameter is log(t) (t = exp(log_t) stays positive), clamped to
    [min_temperature, max_temperature] in the forward as CLIP does."""

    def __init__(self, temperature: float, learnable_temperature: bool = False, symmetric: bool = True,
                 false_negative_margin: float | None = None, min_temperature: float = 1e-3,
                 max_temperature: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.symmetric = symmetric
        self.false_negative_margin = false_negative_margin
        self.learnable = learnable_temperature
        self.min_log_t, self.max_log_t = math.log(min_temperature), math.log(max_temperature)
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature), dtype=torch.float32))
        else:
            self.fixed_temperature = float(temperature)

    def temperature(self, dtype: torch.dtype = torch.float32) -> float | torch.Tensor:
        if not self.learnable:
            return self.fixed_temperature
        return self.log_temperature.clamp(self.min_log_t, self.max_log_t).exp().to(dtype)

    def options(self, q: torch.Tensor, c: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
        """WAVE's loss for rows with explicit negatives (its `give_neg` QA batches): each query against only its
        own candidates, the answer first then its options, c[g_0 + ... + g_(i-1) : ... + g_i] for query i;
        cross-entropy with the answer as the class, one direction, mean over the rows. No in-batch or
        cross-rank negatives (WAVE gathers none for these batches)."""
        g = torch.as_tensor(list(groups), device=q.device)
        if g.numel() != q.shape[0] or int(g.sum()) != c.shape[0] or bool((g < 1).any()):
            raise ValueError(f"option groups {list(groups)} do not cover {q.shape[0]} queries and {c.shape[0]} candidates")
        width = int(g.max())
        col = torch.arange(width, device=q.device)[None, :]
        index = ((torch.cumsum(g, 0) - g)[:, None] + col).clamp(max=c.shape[0] - 1)
        logits = torch.einsum("bkd,bd->bk", c[index], q) / self.temperature(q.dtype if q.dtype == torch.float64
                                                                            else torch.float32)
        logits = logits.masked_fill(col >= g[:, None], float("-inf"))
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))

    def forward(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if q.dtype == torch.float64:
            if _distributed():
                raise ValueError("float64 training is single-process only (info_nce_distributed has no float64 path)")
            return info_nce_reference(q, d, self.temperature(torch.float64), self.symmetric, self.false_negative_margin)
        t = self.temperature(torch.float32)
        if isinstance(t, torch.Tensor):
            t = t.to(q.device)
        if _distributed():
            return info_nce_distributed(q, d, t, symmetric=self.symmetric,
                                        false_negative_margin=self.false_negative_margin)
        return info_nce(q, d, t, symmetric=self.symmetric, false_negative_margin=self.false_negative_margin)
