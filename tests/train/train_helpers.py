"""Shared inputs for the training tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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


WORKER = Path(__file__).with_name("_train_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(cfg: dict, tmp: Path, tag: str, world: int, *extra: str) -> dict:
    """Run _train_worker.py on `world` gloo ranks (torchrun's environment; world 1: no process group from
    the environment) with config `cfg`; returns rank 0's record (losses, gradients, parameters)."""
    cfg_file = tmp / f"{tag}.json"
    cfg_file.write_text(json.dumps(cfg))
    out = tmp / f"{tag}.pt"
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        else:
            env.pop("WORLD_SIZE", None)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(cfg_file), str(out), *extra], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return torch.load(out, weights_only=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
