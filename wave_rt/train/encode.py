"""Prepared items -> L2-normalised embeddings with autograd (the training twin of WaveEncoder.embed_prepared,
which runs under inference_mode)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wave_rt.embed.prepared import PreparedItem
from wave_rt.model.batch import collate


def embed_items(model: nn.Module, items: Sequence[PreparedItem], pad_token_id: int, *,
                device: torch.device | None = None, dtype: torch.dtype | None = None,
                autocast: torch.dtype | None = None) -> torch.Tensor:
    """[len(items), D] unit vectors, differentiable when grad mode is on. `autocast` (e.g. bf16 on CUDA)
    runs the forward under torch.autocast; the result is returned in float32 (or the model's float64)."""
    device = device or next(model.parameters()).device
    dtype = dtype or next(model.parameters()).dtype
    batch = collate([p.inputs for p in items], pad_token_id,
                    stack_mel=model.config.backbone == "qwen2_audio").to(device, dtype)
    if autocast is not None:
        with torch.autocast(device.type, dtype=autocast):
            out = model(batch)
    else:
        out = model(batch)
    out = out.double() if dtype == torch.float64 else out.float()
    return F.normalize(out, dim=-1)
