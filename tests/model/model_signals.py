"""Synthetic audio for the model tests (its own module: `conftest` is a different module in every test folder)."""

from __future__ import annotations

import numpy as np


def noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 100 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
