"""Atomic training checkpoints.

A checkpoint is a folder `step-00000123/` holding
  trainable.safetensors  every trainable tensor (LoRA adapters, heads, a learnable temperature)
  state.pt               optimizer (by parameter name), scheduler, every rank's RNG states, step and data
                         position: plain tensors, numbers, strings and containers only, so
                         torch.load(weights_only=True) reads it
  meta.json              step, epoch, batch in epoch, config
It is written into a temporary folder, fsynced, and renamed into place; then `latest` (a one-line file)
is replaced atomically. A kill at any moment leaves either the previous or the new checkpoint complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    for i, s in enumerate(state.get("cuda", [])):
        if i < torch.cuda.device_count():
            torch.cuda.set_rng_state(s, i)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2) -> Path:
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}-", dir=ckpt_root))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(ckpt_root)
    pointer = ckpt_root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, ckpt_root / LATEST)
    _fsync_dir(ckpt_root)
    for old in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpt_root = Path(run_dir) / "checkpoints"
    pointer = ckpt_root / LATEST
    if not pointer.exists():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if (path / "meta.json").exists() else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path / "trainable.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    return tensors, state, meta
