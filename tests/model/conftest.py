"""Fixtures for the model tests: tiny tokenizers/configs and a synthetic audio source."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_token_ids(tmp_path_factory) -> dict[str, int]:
    from wave_rt.model.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def whisper_fe():
    """transformers' WhisperFeatureExtractor as Qwen2.5-Omni configures it (the upstream reference)."""
    import transformers

    return transformers.WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
                                                chunk_length=300)


def noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 100 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
