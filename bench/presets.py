"""Full-size configs for benchmarks with random weights (no checkpoint is downloadable here).

Widths are those of the released Qwen2.5-Omni-7B thinker config and BEATs_iter3_plus_AS2M;
token ids are Qwen's.
"""

from __future__ import annotations

from typing import Any

QWEN_TOKEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|AUDIO|>": 151646,
    "<|audio_bos|>": 151647,
    "<|audio_eos|>": 151648,
    "<|vision_bos|>": 151652,
    "<|vision_eos|>": 151653,
    "<|IMAGE|>": 151655,
    "<|VIDEO|>": 151656,
}


def omni_7b_config_dict(recipe: str = "all_layer", use_beats: bool = True) -> dict[str, Any]:
    ids = QWEN_TOKEN_IDS
    data: dict[str, Any] = {
        "model_type": "qwen2_5_omni_thinker",
        "audio_token_index": ids["<|AUDIO|>"],
        "image_token_index": ids["<|IMAGE|>"],
        "video_token_index": ids["<|VIDEO|>"],
        "audio_start_token_id": ids["<|audio_bos|>"],
        "audio_end_token_id": ids["<|audio_eos|>"],
        "vision_start_token_id": ids["<|vision_bos|>"],
        "vision_end_token_id": ids["<|vision_eos|>"],
        "position_id_per_seconds": 25,
        "seconds_per_chunk": 2,
        "text_config": {
            "model_type": "qwen2_5_omni_text",
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "pad_token_id": ids["<|endoftext|>"],
            "use_cache": False,
        },
        "audio_config": {
            "model_type": "qwen2_5_omni_audio_encoder",
            "num_mel_bins": 128,
            "encoder_layers": 32,
            "encoder_attention_heads": 20,
            "encoder_ffn_dim": 5120,
            "d_model": 1280,
            "n_window": 100,
            "output_dim": 3584,
            "max_source_positions": 1500,
        },
        "vision_config": {
            "model_type": "qwen2_5_omni_vision_encoder",
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": 3584,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        "wave_rt": {"recipe": recipe},
    }
    if recipe in ("all_layer", "last_layer"):
        data.update(train_classify=True, classify_type=recipe, sim_temperature=0.01)
    if use_beats:
        data["audio_config"]["beats_path"] = "BEATs_iter3_plus_AS2M.pt"
        data["audio_config"]["beats_only"] = False
    return data
