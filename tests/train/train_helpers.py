"""Shared inputs for the training tests."""

from __future__ import annotations

import numpy as np
import torch

from wave_rt.items import Audio, Text


def pair_items(n: int, seed: int = 0, with_audio: bool = True) -> tuple[list, list]:
    """n (query, target) pairs: text queries of varying length and, with_audio, a few short tones."""
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "circle", "square", "beep", "hum", "left", "right", "moving", "low", "high"]
    queries: list = []
    targets: list = []
    for i in range(n):
        caption = " ".join(rng.choice(words, size=2 + i % 4))
        if with_audio and i % 3 == 1:
            t = np.arange(int(16000 * (0.3 + 0.1 * (i % 2)))) / 16000
            queries.append(Audio((0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), sample_rate=16000))
        else:
            queries.append(Text(f"query {i}: {caption}", side="query"))
        targets.append(f"{caption} {i}")
    return queries, targets


def perturb_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA's B starts at zero (so A's gradient is zero): give every adapter weight a random value so that
    every trainable gradient is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.05)
