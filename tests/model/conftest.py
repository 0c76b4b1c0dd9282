"""Fixtures for the model tests: tiny tokenizers/configs and a synthetic audio source."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_token_ids(tmp_path_factory) -> dict[str, int]:
    from tiny_checkpoints import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def whisper_fe():
    """transformers' WhisperFeatureExtractor as Qwen2.5-Omni configures it (the upstream reference)."""
    import transformers

    return transformers.WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
                                                chunk_length=300)
