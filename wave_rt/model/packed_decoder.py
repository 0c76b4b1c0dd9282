"""The decoder over a packed stream: [N, D] hidden states, variable-length attention per item.

Runs transformers' decoder layers' own weights (norms, projections, MLP) with the attention replaced by
`varlen_attention`, so the numbers equal the padded forward's while no padding token, no dense mask and
no repeat_kv copy is ever made. Attention is causal within each item, or bidirectional (every token of an
item sees all of its item's tokens, none of another's) for encoder-style recipes.

Pooling follows the recipe, as the padded reference (WaveModel.last_token_states, wave_rt.model.pooling) does:
- `last`: the last-token row of every layer. The last layer only computes what that reads: its keys and values
  for every token, but its query, attention output and MLP for each item's last token alone (valid under either
  attention, since an item's last token sees all of its item's keys in both);
- `mean`: the last layer runs on every token, the final norm on every token, then the plain mean over each
  item's cu_seqlens segment (exactly the item's real tokens, the set the padded mask averages).
"""

from __future__ import annotations

import torch
from torch import nn

from wave_rt.model.varlen import varlen_attention


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, heads, d], cos/sin [n, d] (M-RoPE sections already recomposed by the rotary module)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def packed_layer(
    layer: nn.Module,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    lengths: tuple[int, ...],
    last_index: torch.Tensor | None = None,
    cu_last: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """One decoder layer on h [N, D], attention causal or bidirectional within each item. With last_index ([B]
    rows), returns only those rows' outputs [B, D]."""
    attn = layer.self_attn
    n = h.shape[0]
    d = attn.head_dim
    x = layer.input_layernorm(h)
    k = _rope(attn.k_proj(x).view(n, -1, d), cos, sin)
    v = attn.v_proj(x).view(n, -1, d)
    max_k = max(lengths)
    if last_index is None:
        q = _rope(attn.q_proj(x).view(n, -1, d), cos, sin)
        o = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_k, max_k, causal=causal, scale=attn.scaling,
                             lengths_q=lengths, lengths_k=lengths)
        residual = h
    else:
        # The last token of an item attends to all of its item's keys, causal or not: no mask needed.
        xl = x.index_select(0, last_index)
        q = _rope(attn.q_proj(xl).view(xl.shape[0], -1, d), cos.index_select(0, last_index),
                  sin.index_select(0, last_index))
        o = varlen_attention(q, k, v, cu_last, cu_seqlens, 1, max_k, causal=False, scale=attn.scaling,
                             lengths_q=(1,) * len(lengths), lengths_k=lengths)
        residual = h.index_select(0, last_index)
    h = residual + attn.o_proj(o.reshape(o.shape[0], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def segment_mean(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N, D] rows -> [B, D]: the mean over each cu_seqlens segment, accumulated in float32 (index_add over
    segment ids found on the device: no host read of cu_seqlens)."""
    n = x.shape[0]
    seg = torch.searchsorted(cu_seqlens, torch.arange(n, dtype=cu_seqlens.dtype, device=x.device), right=True) - 1
    sums = torch.zeros(cu_seqlens.shape[0] - 1, x.shape[-1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, seg, x.float())
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float32).unsqueeze(1)
    return (sums / counts).to(x.dtype)


def packed_pooled_states(
    lm: nn.Module,
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    last_index: torch.Tensor,
    lengths: tuple[int, ...],
    uses_mrope: bool,
    *,
    pooling: str = "last",
    attention: str = "causal",
) -> torch.Tensor:
    """[N, D] packed embeddings -> the rows the recipe's head reads, exactly what the padded forward gives:
    pooling "last": [B, L, D] last-token rows (entries 0..L-2 raw layer outputs, L-1 the final-norm output), as
    `WaveModel.last_token_states`; pooling "mean": [B, 1, D], the mean of the final-norm states over each item's
    tokens, as `wave_rt.model.pooling.pooled_decoder_states`."""
    if pooling not in ("last", "mean") or attention not in ("causal", "bidirectional"):
        raise ValueError(f"unknown pooling {pooling!r} or attention {attention!r}")
    causal = attention == "causal"
    layers = lm.layers
    B, D = len(lengths), inputs_embeds.shape[-1]
    pos = position_ids.unsqueeze(1) if uses_mrope else position_ids[:1]  # [3, 1, N] or [1, N]
    cos, sin = lm.rotary_emb(inputs_embeds.unsqueeze(0), pos)
    if cos.dim() != 3:
        raise NotImplementedError(
            "this transformers version returns M-RoPE tables per axis; wave_rt's packed path needs the "
            "recomposed [1, N, d] tables of transformers >= 5"
        )
    cos, sin = cos[0], sin[0]
    h = inputs_embeds
    if pooling == "mean":
        for layer in layers:
            h = packed_layer(layer, h, cos, sin, cu_seqlens, lengths, causal=causal)
        return segment_mean(lm.norm(h), cu_seqlens).unsqueeze(1)
    cu_last = torch.arange(B + 1, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    layer_states = inputs_embeds.new_empty(B, len(layers), D)
    for i, layer in enumerate(layers[:-1]):
        h = packed_layer(layer, h, cos, sin, cu_seqlens, lengths, causal=causal)
        layer_states[:, i] = h.index_select(0, last_index)
    last = packed_layer(layers[-1], h, cos, sin, cu_seqlens, lengths, last_index=last_index, cu_last=cu_last)
    layer_states[:, -1] = lm.norm(last)
    return layer_states
