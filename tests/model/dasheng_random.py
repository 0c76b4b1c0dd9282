"""Non-trivial values everywhere a freshly built dasheng encoder holds constants (BN statistics, LayerNorm affine,
biases, LayerScale gammas), so that comparisons exercise them. Shared by the reference tests and
bench/make_dasheng_fixtures.py (which runs without pytest); torch only."""

from __future__ import annotations

import torch
from torch import nn


def randomize_constants(model: nn.Module) -> None:
    """In place, drawing from torch's global generator in a fixed order (the committed fixtures depend on it)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith(("weight", "gamma")) else 0.1 * torch.randn_like(p))
        bn = model.init_bn[1]
        bn.running_mean.copy_(-40 + 10 * torch.randn_like(bn.running_mean))
        bn.running_var.copy_(50 + 20 * torch.rand_like(bn.running_var))
