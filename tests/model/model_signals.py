"""Synthetic audio for the model tests (its own module: `conftest` is a different module in every test folder)."""

from __future__ import annotations

import numpy as np


def noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 100 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def qwen2_audio_item(ids: dict[str, int], seconds: float, seed: int) -> tuple:
    """One Qwen2-Audio item (audio placeholders + a short text) from `noise`, featurized as Qwen2-Audio's
    processor does (Whisper, 30 s chunk, max-length padding). Returns (ItemInputs, the feature extractor output)."""
    import transformers

    from wave_rt.embed.processor import whisper_tokens
    from wave_rt.model.batch import AudioSegmentInputs, ItemInputs
    from wave_rt.model.positions import SequenceBuilder

    fe30 = transformers.WhisperFeatureExtractor(feature_size=128, chunk_length=30)
    f = fe30(noise(seconds, seed), sampling_rate=16000, return_attention_mask=True, return_tensors="pt",
             padding="max_length")
    n_frames = int(f["attention_mask"].sum())
    n = whisper_tokens(n_frames)
    sb = SequenceBuilder()
    sb.audio(n, audio_id=ids["<|AUDIO|>"], bos_id=ids["<|audio_bos|>"], eos_id=ids["<|audio_eos|>"])
    sb.text([90, 91, 92])
    a_ids, a_pos = sb.build()
    return ItemInputs(a_ids, a_pos, True, audio=[AudioSegmentInputs(f["input_features"][0], n_frames, n)]), f
