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


def write_text_pairs(path, n: int, seed: int = 0) -> None:
    """A JSONL manifest of n text (query, caption) pairs."""
    import json

    rng = np.random.default_rng(seed)
    words = ["red", "blue", "circle", "square", "beep", "hum", "left", "right", "moving", "low", "high"]
    rows = [{"query_text": f"q{i} " + " ".join(rng.choice(words, size=2 + i % 3)),
             "target_text": f"t{i} " + " ".join(rng.choice(words, size=3)), "task": "t"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_config(ckpt, manifest, out_dir, **sections) -> dict:
    """A small fit() config dict: LoRA wave recipe on a tiny checkpoint, float32, CPU."""
    cfg = {
        "model": {"path": str(ckpt)},
        "recipe": {"name": "wave", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                   "learnable_temperature": True, "temperature": 0.05},
        "data": {"train": str(manifest), "batch_size": 6, "chunk_size": 4},
        "optim": {"lr": 1e-3, "max_steps": 3, "warmup_steps": 1},
        "run": {"out_dir": str(out_dir), "device": "cpu", "checkpoint_every": 1, "progress": False, "threads": 1},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg
