"""Window tables of the Omni audio and vision towers, computed on the host when a batch is collated.

transformers' towers derive these from their inputs on the device with `.tolist()`, `.item()` and
Python loops (each a host sync, every batch); since 5.x they also accept them precomputed through their
forward kwargs. We compute them with transformers' own helpers on CPU tensors, so the numbers are theirs,
and pass them in: the forward then never reads the device back. Where the installed transformers has no
such helpers the functions return None and the towers compute the tables themselves.
"""

from __future__ import annotations

from typing import Any

import torch


def audio_tower_kwargs(mel: torch.Tensor, mel_lens: torch.Tensor, audio_config: Any) -> dict[str, Any] | None:
    """Chunked, padded features and the attention windows of the audio tower for concatenated log-mel
    [128, sum(frames)] on the host."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as omni

    needed = ("chunk_and_pad_features", "get_valid_indices", "get_pool_indices", "get_audio_cu_seqlens")
    # The tables come from mel_lens (host); mel itself may already be on the GPU (deferred features), where
    # the chunking is a split and a pad with host-known sizes: no sync either way.
    if mel_lens.is_cuda or not all(hasattr(omni, n) for n in needed):
        return None
    padded_feature, chunk_lengths = omni.chunk_and_pad_features(mel, mel_lens, int(audio_config.n_window))
    cu_seqlens = omni.get_audio_cu_seqlens(chunk_lengths)
    return {
        "padded_feature": padded_feature,
        "chunk_lengths": chunk_lengths,
        "valid_indices": omni.get_valid_indices(chunk_lengths),
        "pool_indices": omni.get_pool_indices(mel_lens),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
    }


def vision_tower_kwargs(grid_thw: torch.Tensor, vision_config: Any) -> dict[str, Any] | None:
    """Rotary positions, per-frame and per-window cu_seqlens (with their maxima) and the window order of
    the vision tower for the videos' grids [n, 3] on the host."""
    try:
        from transformers import vision_utils as vu
    except ImportError:
        return None
    if grid_thw.is_cuda or not all(hasattr(vu, n) for n in ("get_vision_position_ids", "get_vision_cu_seqlens",
                                                             "get_vision_window_index")):
        return None
    merge = int(vision_config.spatial_merge_size)
    cu_seqlens = vu.get_vision_cu_seqlens(grid_thw)
    window_index, cu_window = vu.get_vision_window_index(grid_thw, merge, int(vision_config.window_size),
                                                         int(vision_config.patch_size))
    return {
        "position_ids": vu.get_vision_position_ids(grid_thw, merge),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        "window_index": window_index,
        "cu_window_seqlens": cu_window,
        "max_window_seqlen": int((cu_window[1:] - cu_window[:-1]).max()),
    }
