"""Pooling and attention options of the padded reference forward: mean pooling and bidirectional attention.

Used by WaveModel.forward when a recipe asks for `pooling="mean"` or `attention="bidirectional"`
(Omni-Embed-Nemotron style); the default last-token + causal path stays WaveModel.last_token_states.

The packed hot path (wave_rt.model.packed_decoder.packed_pooled_states) gives the same numbers per item of a
packed stream: varlen attention with causal=False within each item's cu_seqlens segment, the final norm on
every token, a segment mean over cu_seqlens; heads read the pooled row as `layer_states[:, -1]` in both.
Left padding here is harmless for both: padding keys are masked for every query and padding rows are
excluded from the mean, so an item alone equals the same item in any mixed batch.
"""

from __future__ import annotations

import torch

from wave_rt.model.recipes import Attention, Pooling


def attention_mask_4d(attention_mask: torch.Tensor, attention: Attention) -> torch.Tensor:
    """[B, T] (1 = real) -> bool [B, 1, T, T], True = may attend. The diagonal stays open so padding rows attend
    to themselves (never to nothing: SDPA would produce NaN rows that later poison values)."""
    T = attention_mask.shape[-1]
    keys = attention_mask.bool().view(-1, 1, 1, T)
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device).view(1, 1, T, T)
    if attention == "bidirectional":
        return (keys.expand(-1, 1, T, T)) | eye
    idx = torch.arange(T, device=attention_mask.device)
    causal = (idx.view(1, T) <= idx.view(T, 1)).view(1, 1, T, T)
    return (causal & keys) | eye


def pool_states(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Final-norm states [B, T, D] -> [B, D]: the last position (left padding) or the mean over real tokens."""
    if pooling == "last":
        return hidden[:, -1]
    if pooling == "mean":
        w = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)
    raise ValueError(f"unknown pooling {pooling!r}")


def pooled_decoder_states(
    lm: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    pooling: Pooling,
    attention: Attention,
    mrope: bool,
) -> torch.Tensor:
    """Run the decoder `lm` (embed_tokens/layers/norm/rotary_emb, as transformers' text models hold them) with the
    given attention and return the pooled final-norm state [B, D]. Rows are left-padded; position_ids [3, B, T]."""
    pos = position_ids if mrope else position_ids[0]
    position_embeddings = lm.rotary_emb(inputs_embeds, pos)
    mask = attention_mask_4d(attention_mask, attention)
    h = inputs_embeds
    for layer in lm.layers:
        out = layer(h, attention_mask=mask, position_embeddings=position_embeddings, use_cache=False)
        h = out[0] if isinstance(out, tuple) else out
    return pool_states(lm.norm(h), attention_mask, pooling)
