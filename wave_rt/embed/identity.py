"""What identifies a model's embeddings (id, fingerprint, dtype, width), read from the checkpoint files.

The archive manifest records this. The Ray engine's driver needs it but never runs the model, so it
reads it here without building the model or reading a weight tensor (a 7B model is ~15 GB): config.json,
the checkpoint's tensor names (safetensors headers), BEATs' config, and the weight files' fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from wave_rt.config import WaveConfig
from wave_rt.dtypes import parse_dtype

DEMO_MODEL = "demo"  # model=None or "demo": the bundled demo model


@dataclass(frozen=True)
class ModelIdentity:
    model_id: str
    fingerprint: str
    dtype: torch.dtype
    dim: int


def weights_fingerprint(path: str | os.PathLike[str], sample_blocks: int = 64, block: int = 1 << 16) -> str:
    """A stable hash of a checkpoint's weight files: names, sizes, and (for files over 256 MB) 64 evenly
    spread 64 KiB blocks instead of every byte, so a 16 GB checkpoint is fingerprinted in milliseconds."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(
        p for p in root.iterdir()
        if p.suffix in (".safetensors", ".bin", ".pt") or p.name.endswith(".safetensors.index.json")
    )
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size};".encode())
        with p.open("rb") as f:
            if size <= 256 * 1024 * 1024:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            else:
                for k in range(sample_blocks):
                    f.seek((size - block) * k // max(1, sample_blocks - 1))
                    h.update(f.read(block))
    return h.hexdigest()[:16]


def encoder_fingerprint(weights_id: str, config: WaveConfig, dtype: torch.dtype) -> str:
    """Changes whenever an embedding could change: weights, config/recipe/prompts, dtype."""
    blob = f"{weights_id}|{config.fingerprint()}|{dtype}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_wave_config(path: str | os.PathLike[str], recipe: str | None = None,
                     beats_path: str | os.PathLike[str] | None = None, preset: str | None = None) -> WaveConfig:
    """The config load_wave_model builds, without its weights (the same preset detection, from the tensor
    names only): when BEATs ships as its own file (no beats.* tensors in the checkpoint), its config comes
    from that file."""
    from wave_rt.model.loading import _apply_preset, _find_beats_file, _TensorSource

    root = Path(path)
    source = _TensorSource(root)
    config = _apply_preset(root, WaveConfig.from_pretrained(root, recipe=recipe), source, preset, recipe)
    if config.use_beats and not any(k.startswith("beats.") for k in source.index):
        beats_file = _find_beats_file(root, beats_path)
        if beats_file is not None:  # without one, loading fails later with the full message
            from wave_rt.model.beats import read_beats_config

            config.beats = read_beats_config(beats_file).to_dict()
    return config


def read_identity(path: str | os.PathLike[str] | None, dtype: torch.dtype | str, recipe: str | None = None,
                  beats_path: str | os.PathLike[str] | None = None, preset: str | None = None) -> ModelIdentity:
    """The identity WaveEncoder.from_pretrained(path, dtype=dtype, ...) would report, from the files alone.
    path None or "demo": the bundled demo model."""
    demo = path is None or str(path) == DEMO_MODEL
    if demo:
        from wave_rt.model.demo import DEMO_MODEL_ID, demo_checkpoint

        path = demo_checkpoint()
    config = read_wave_config(path, recipe, beats_path, preset)
    dt = parse_dtype(dtype)
    model_id = DEMO_MODEL_ID if demo else Path(path).resolve().name
    return ModelIdentity(model_id=model_id, fingerprint=encoder_fingerprint(weights_fingerprint(path), config, dt),
                         dtype=dt, dim=int(config.embedding_dim))
