"""The one FLOP model every benchmark uses (DESIGN.md section 7): useful FLOPs of an embedding forward.

Counted: matmul FLOPs (2 per multiply-add) of real tokens only, never padding.
- Decoder: 2 * P_nonembedding * T per item (the embedding table is a lookup, not a matmul) plus causal
  attention 2 * L * T^2 * d_attn (QK^T and AV, half the square; the whole square, 4 * L * T^2 * d_attn, for
  the bidirectional recipes). The embedding forward's last layer only
  needs keys/values for all tokens and the rest for the last token: `last_layer_trimmed=True` counts that.
- Audio tower (Whisper-style): conv1/conv2 on the mel frames, 2 * P_layers per token after conv2,
  bidirectional attention 4 * T_w^2 * d per window per layer, the projection on the pooled tokens.
- Vision tower: patch embedding, 2 * P_blocks per patch, attention 4 * T_w^2 * d per window (frames for
  the full-attention blocks), the merger on the merged tokens.
- BEATs: patch embedding, 2 * P_layers per token, full attention 4 * T^2 * d per segment.
MFU = FLOPs / seconds / peak, against the peak measured in the same run and the datasheet figure.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# NVIDIA H100/H200 SXM dense bf16 tensor-core peak on the datasheet (TFLOP/s).
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def _params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    attn_width: int  # heads * head_dim
    nonembedding_params: int  # all decoder parameters except the input embedding table
    layer_params: int  # one layer's parameters
    kv_params: int  # one layer's k_proj + v_proj parameters

    @classmethod
    def of(cls, lm: nn.Module) -> DecoderShape:
        layer = lm.layers[-1]
        attn = layer.self_attn
        embed = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else lm.embed_tokens
        return cls(
            layers=len(lm.layers),
            attn_width=int(attn.q_proj.out_features),
            nonembedding_params=_params(lm) - embed.weight.numel(),
            layer_params=_params(layer),
            kv_params=_params(attn.k_proj) + _params(attn.v_proj),
        )


def decoder_flops(lengths: Sequence[int], shape: DecoderShape, last_layer_trimmed: bool = False,
                  causal: bool = True) -> float:
    """Prefill FLOPs of items of `lengths` real tokens (causal attention within each item: half the square;
    `causal=False`, the bidirectional recipes: the whole square, and every layer runs for every token)."""
    total = 0.0
    square = 2 if causal else 4
    for t in lengths:
        if not last_layer_trimmed or not causal:
            total += 2 * shape.nonembedding_params * t + square * shape.layers * t * t * shape.attn_width
            continue
        full = shape.layers - 1
        rest = shape.nonembedding_params - shape.layer_params  # full layers + final norm
        total += 2 * rest * t + 2 * full * t * t * shape.attn_width
        # last layer: K/V for every token, the rest of the layer for the last token, its attention over t keys
        total += 2 * shape.kv_params * t + 2 * (shape.layer_params - shape.kv_params) + 4 * t * shape.attn_width
    return total


def _attention_windows(cu: Sequence[int]) -> int:
    return sum((b - a) ** 2 for a, b in zip(cu[:-1], cu[1:]))


def whisper_flops(mel_lens: Sequence[int], tower: nn.Module) -> float:
    """Omni audio tower on segments of `mel_lens` frames (windows of n_window * 2 frames)."""
    cfg = tower.config
    d, win = int(cfg.d_model), int(cfg.n_window) * 2
    layers = _params(tower.layers)
    total = 0.0
    for frames in mel_lens:
        tokens = (frames - 1) // 2 + 1
        total += 2 * _params(tower.conv1) * frames + 2 * _params(tower.conv2) * tokens
        total += 2 * layers * tokens
        chunks = [win] * (frames // win) + ([frames % win] if frames % win else [])
        sq = sum(((c - 1) // 2 + 1) ** 2 for c in chunks)
        total += 4 * sq * d * len(tower.layers)
        total += 2 * _params(tower.proj) * ((tokens - 2) // 2 + 1)
    return total


def vision_flops(grids: Sequence[tuple[int, int, int]], visual: nn.Module) -> float:
    """Omni vision tower on videos of (t, h, w) patch grids."""
    cfg = visual.config
    d = int(cfg.hidden_size)
    merge = int(cfg.spatial_merge_size)
    side = int(cfg.window_size) // merge // int(cfg.patch_size)  # window side in merged tokens
    full_blocks = set(cfg.fullatt_block_indexes)
    total = 0.0
    per_block = _params(visual.blocks[0])
    for t, h, w in grids:
        n = t * h * w
        total += 2 * _params(visual.patch_embed) * n + 2 * per_block * len(visual.blocks) * n
        total += 2 * _params(visual.merger) * n // (merge * merge)
        frame = (h * w) ** 2 * t
        gh, gw = h // merge, w // merge
        win = 0
        for wh in [side] * (gh // side) + ([gh % side] if gh % side else []):
            for ww in [side] * (gw // side) + ([gw % side] if gw % side else []):
                win += (wh * ww * merge * merge) ** 2
        win *= t
        for b in range(len(visual.blocks)):
            total += 4 * d * (frame if b in full_blocks else win)
    return total


def beats_flops(token_counts: Sequence[int], beats: nn.Module) -> float:
    """BEATs on segments of `token_counts` patch tokens (full attention per segment)."""
    width = int(beats.cfg.encoder_embed_dim)
    layers = int(beats.cfg.encoder_layers)
    patch = _params(getattr(beats, "patch_embedding", None))
    # the AudioSet predictor of a fine-tuned checkpoint is loaded but never run by the embedding forward
    per_token = _params(beats) - patch - _params(getattr(beats, "predictor", None))
    return float(sum(2 * per_token * n + 2 * patch * n + 4 * layers * n * n * width for n in token_counts))


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / 1e12 / peak_tflops


def datasheet_peak(device_name: str) -> float | None:
    for key, value in DATASHEET_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def padding_fraction(real_tokens: int, processed_tokens: int) -> float:
    """processed / real tokens (1.0 = no padding)."""
    return processed_tokens / real_tokens if real_tokens else 1.0


def measure_gemm_tflops(device: torch.device | str, n: int = 8192, repeats: int = 10) -> float | None:
    """bf16 n^3 GEMM TFLOP/s measured now on a CUDA device (the ceiling MFU is reported against); None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / repeats
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / dt / 1e12
