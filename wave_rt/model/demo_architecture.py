"""The bundled demo model's architecture, and random checkpoints of it.

The trained demo model (wave_rt/assets/demo_model) is this architecture: a Qwen2.5-Omni thinker with every
width tiny, BEATs and the WAVE fusion head, and a byte-level tokenizer carrying Qwen's special tokens, all
built offline (nothing is downloaded). The runtime builds it from random weights in two places: training from
scratch (`init_tiny = true` in a training config, which is how `python -m wave_rt.train.demo` reproduces the
bundled weights) and the demo fallback of a stripped install without the bundled weights (wave_rt.model.demo).
Tests build tiny checkpoints of other backbones on top of `save_random_checkpoint` (tests/tiny_checkpoints.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Qwen2.5-Omni's special tokens (order matters only for their ids in the tiny vocabulary).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
)


def write_demo_tokenizer(out_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Write the demo tokenizer (byte-level BPE, no merges, Qwen's special tokens) into out_dir; return
    {special token: id}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 32768,
            },
            indent=2,
        )
    )
    return {tok: tokenizer.token_to_id(tok) for tok in QWEN_SPECIAL_TOKENS}


def demo_thinker_config_dict(
    token_ids: dict[str, int],
    *,
    vocab_size: int = 320,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    audio_layers: int = 2,
    vision_depth: int = 2,
) -> dict[str, Any]:
    """A Qwen2.5-Omni thinker config dict: the demo model's widths by default (the benchmarks scale them up), and the
    token ids of the demo tokenizer."""
    head_dim = hidden // heads
    half = head_dim // 2
    t = max(1, half // 4)
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    return {
        "model_type": "qwen2_5_omni_thinker",
        "audio_token_index": token_ids["<|AUDIO|>"],
        "image_token_index": token_ids["<|IMAGE|>"],
        "video_token_index": token_ids["<|VIDEO|>"],
        "audio_start_token_id": token_ids["<|audio_bos|>"],
        "audio_end_token_id": token_ids["<|audio_eos|>"],
        "vision_start_token_id": token_ids["<|vision_bos|>"],
        "vision_end_token_id": token_ids["<|vision_eos|>"],
        "position_id_per_seconds": 25,
        "seconds_per_chunk": 2,
        "text_config": {
            "model_type": "qwen2_5_omni_text",
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            "pad_token_id": token_ids["<|endoftext|>"],
            "use_cache": False,
        },
        "audio_config": {
            "model_type": "qwen2_5_omni_audio_encoder",
            "num_mel_bins": 128,
            "encoder_layers": audio_layers,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "d_model": 32,
            "n_window": 50,
            "output_dim": hidden,
            "max_source_positions": 1500,
        },
        "vision_config": {
            "model_type": "qwen2_5_omni_vision_encoder",
            "depth": vision_depth,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [vision_depth - 1],
        },
    }


def save_random_checkpoint(out_dir: str | os.PathLike[str], data: dict[str, Any], *, recipe: str, use_beats: bool,
                           seed: int, beats_in_safetensors: bool = True,
                           extra_config: dict[str, Any] | None = None) -> Path:
    """Build a randomly initialised model from a transformers config dict `data` (the tokenizer is already in
    out_dir), with the recipe's WAVE fields and optionally BEATs, and save it in the released layout. With
    beats_in_safetensors=False the BEATs weights go to a separate BEATs_iter3_plus_AS2M.pt beside the
    safetensors, as the released checkpoint ships them."""
    import torch

    from wave_rt.config import WaveConfig
    from wave_rt.model.loading import save_wave_model
    from wave_rt.model.wave_model import WaveModel

    out = Path(out_dir)
    data = dict(data)
    ours: dict[str, Any] = {"recipe": recipe}
    if recipe in ("all_layer", "last_layer"):
        data["train_classify"] = True
        data["classify_type"] = recipe
        data["sim_temperature"] = 0.01
    if use_beats:
        from wave_rt.model.beats import BEATsConfig

        data["audio_config"] = {**data["audio_config"], "beats_path": "BEATs_iter3_plus_AS2M.pt", "beats_only": False}
        ours["beats"] = BEATsConfig.tiny().to_dict()
    if recipe == "eos_projection":
        ours["projection_dim"] = int(data["text_config"]["hidden_size"])
    data["wave_rt"] = ours
    if extra_config:
        data.update(extra_config)
    config = WaveConfig.from_dict(data)
    model = WaveModel.build(config, seed=seed)
    save_wave_model(model, out)
    if use_beats and not beats_in_safetensors:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(out / "model.safetensors"))
        beats = {k[len("beats."):]: v for k, v in tensors.items() if k.startswith("beats.")}
        save_file({k: v for k, v in tensors.items() if not k.startswith("beats.")}, str(out / "model.safetensors"))
        torch.save({"cfg": config.beats, "model": beats}, out / "BEATs_iter3_plus_AS2M.pt")
    return out


def random_demo_checkpoint(out_dir: str | os.PathLike[str], *, recipe: str = "all_layer", use_beats: bool = True,
                           seed: int = 0) -> Path:
    """The demo architecture with random weights (seeded), saved as a checkpoint directory: the starting point
    of `init_tiny` training and the untrained demo fallback. recipe "last_token" / "eos_projection" without
    BEATs gives the plain thinker those recipes pool."""
    ids = write_demo_tokenizer(out_dir)
    return save_random_checkpoint(out_dir, demo_thinker_config_dict(ids), recipe=recipe, use_beats=use_beats,
                                  seed=seed)
