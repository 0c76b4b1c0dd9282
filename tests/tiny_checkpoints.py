"""Tiny random checkpoints for the tests (every shape small enough for a 2-core CPU): the demo architecture
(wave_rt.model.demo_architecture) and the other backbones' configs (Qwen2-Audio for Vela, MiDashengLM for
ALM2Vec), built from the real transformers configs. bench/bench_presets.py borrows the MiDashengLM config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from wave_rt.model.demo_architecture import (  # noqa: F401 - re-exported under the tests' names
    QWEN_SPECIAL_TOKENS,
    save_random_checkpoint,
)
from wave_rt.model.demo_architecture import demo_thinker_config_dict as tiny_thinker_config_dict
from wave_rt.model.demo_architecture import write_demo_tokenizer as build_tiny_tokenizer


def tiny_qwen2_audio_config_dict(token_ids: dict[str, int], *, vocab_size: int = 320, hidden: int = 64,
                                 layers: int = 4) -> dict[str, Any]:
    """A Qwen2-Audio config dict (Vela's backbone) with tiny widths."""
    return {
        "model_type": "qwen2_audio",
        "audio_token_index": token_ids["<|AUDIO|>"],
        "audio_config": {
            "model_type": "qwen2_audio_encoder",
            "num_mel_bins": 128,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "d_model": 32,
            "max_source_positions": 1500,
        },
        "text_config": _tiny_qwen2_text_config(token_ids, vocab_size, hidden, layers),
    }


def _tiny_qwen2_text_config(token_ids: dict[str, int], vocab_size: int, hidden: int, layers: int) -> dict[str, Any]:
    """The tiny Qwen2 decoder shared by the Qwen2-Audio and MiDashengLM configs."""
    return {
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "pad_token_id": token_ids["<|endoftext|>"],
        "use_cache": False,
    }


def tiny_midashenglm_config_dict(token_ids: dict[str, int], *, vocab_size: int = 320, hidden: int = 64,
                                 layers: int = 4) -> dict[str, Any]:
    """A MiDashengLM config dict (ALM2Vec's backbone) as its config.json spells it, with tiny widths and a
    Dasheng encoder whose chunks are 40 frames long (so a few seconds of audio spans several chunks)."""
    from wave_rt.model.dasheng import DashengConfig

    return {
        "model_type": "midashenglm",
        "audio_token_id": token_ids["<|AUDIO|>"],
        "subsample_factor": 5,
        "audio_encoder_config": DashengConfig.tiny().to_dict(),
        "text_config": {**_tiny_qwen2_text_config(token_ids, vocab_size, hidden, layers), "rope_theta": 1000000.0},
    }


def make_tiny_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    recipe: str = "all_layer",
    use_beats: bool = True,
    seed: int = 0,
    beats_in_safetensors: bool = True,
    extra_config: dict[str, Any] | None = None,
    backbone: str = "qwen2_5_omni_thinker",
    **sizes: Any,
) -> Path:
    """A tiny random checkpoint in the WAVE layout (or a plain thinker for recipe="last_token" without BEATs)
    of `backbone`, with `sizes` passed to its config builder."""
    ids = build_tiny_tokenizer(out_dir)
    if backbone == "qwen2_audio":
        data = tiny_qwen2_audio_config_dict(ids, **sizes)
    elif backbone == "midashenglm":
        data = tiny_midashenglm_config_dict(ids, **sizes)
    else:
        data = tiny_thinker_config_dict(ids, **sizes)
    return save_random_checkpoint(out_dir, data, recipe=recipe, use_beats=use_beats, seed=seed,
                                  beats_in_safetensors=beats_in_safetensors, extra_config=extra_config)
