"""BEATs transformer building blocks: bucketed + gated relative position bias, the self-attention that
applies it, the deep-norm encoder layer and the weight-normalized convolutional positional embedding.

Module and parameter names follow microsoft/unilm `beats/backbone.py` so that the released checkpoint's
state dict loads with strict=True; the maths is restated from that file (write-up in beats.py).
Tensors are batch-first here ([B, N, C]); the reference works time-first, which changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The reference scales queries down by 32 before q.k and multiplies the max-shifted scores back up,
# a guard against fp16 overflow in its bmm. SDPA accumulates in fp32, so the shift-and-rescale (a
# softmax-invariant no-op mathematically) is not repeated here.


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5-style bucket of `key_pos - query_pos`: half of the buckets per direction
    (positive offsets get the upper half); within a half, offsets below half/2 map to themselves, larger
    ones log-spaced up to `max_distance`, clamped to the last bucket. The log branch is evaluated in
    float32 with the reference's operation order, because a bucket id flips when it rounds differently."""
    half = num_buckets // 2
    direction = (relative_position > 0).to(torch.long) * half
    distance = relative_position.abs()
    max_exact = half // 2
    # clamp(min=1) only keeps log() finite on the exact branch, whose value torch.where discards.
    scaled = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    far = max_exact + (scaled * (half - max_exact)).to(torch.long)
    far = torch.clamp(far, max=half - 1)
    return direction + torch.where(distance < max_exact, distance, far)


def _upcast(x: Tensor) -> Tensor:
    """x in at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d whose weight is stored as `weight_g` (magnitude per kernel tap, shape [1, 1, K])
    and `weight_v` (direction), the layout of `torch.nn.utils.weight_norm(conv, dim=2)` that the
    released checkpoint uses: weight = v * g / ||v|| with the norm over output and input channels."""

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.groups = groups
        self.padding = kernel_size // 2
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        channels = self.weight_v.shape[0]
        nn.init.normal_(self.weight_v, mean=0.0, std=math.sqrt(4.0 / (self.kernel_size * channels)))
        nn.init.zeros_(self.bias)
        with torch.no_grad():
            self.weight_g.copy_(self._norm_v().to(self.weight_g.dtype))

    def _norm_v(self) -> Tensor:
        # At least fp32: the sum of squares runs over channels * channels / groups terms.
        return _upcast(self.weight_v).pow(2).sum(dim=(0, 1), keepdim=True).sqrt()

    def weight(self) -> Tensor:
        return (_upcast(self.weight_v) * (_upcast(self.weight_g) / self._norm_v())).to(self.weight_v.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class TrimLast(nn.Module):
    """Drops the extra trailing step an even kernel adds with padding K//2 on both sides ("same" length)."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[..., : x.shape[-1] - self.remove]


class GatedRelPosSelfAttention(nn.Module):
    """Multi-head self-attention with an additive relative position bias that each query gates:
    logits = q.k / sqrt(d) + gate(q_h) * bias_h(j - i), gate = a * (b * grep_a_h - 1) + 2 where a, b are
    sigmoids of two 4-way sums of `grep_linear(q_h)` (q_h: the projected, unscaled query of head h).
    The bias table (`relative_attention_bias`, [num_buckets, H]) is read by layer 0 only: the reference
    computes the bias once and hands the raw values up the stack, every layer gating them itself."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        has_relative_attention_bias: bool = False,
        num_buckets: int = 320,
        max_distance: int = 800,
        gru_rel_pos: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"encoder_embed_dim {embed_dim} is not divisible by {num_heads} heads")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.gru_rel_pos = gru_rel_pos
        if gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        gain = 1 / math.sqrt(2)
        for proj in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        if hasattr(self, "relative_attention_bias"):
            nn.init.xavier_normal_(self.relative_attention_bias.weight)

    def relative_bias_by_offset(self, length: int) -> Tensor:
        """Raw bias for every offset -(length-1) .. length-1: [2*length - 1, H] (row o is offset o - length + 1)."""
        device = self.relative_attention_bias.weight.device
        offsets = torch.arange(-(length - 1), length, device=device)
        return self.relative_attention_bias(relative_position_bucket(offsets, self.num_buckets, self.max_distance))

    def _gate(self, q: Tensor) -> Tensor:
        b, h, n, _ = q.shape
        a, g = torch.sigmoid(self.grep_linear(q).view(b, h, n, 2, 4).sum(-1)).chunk(2, dim=-1)
        return a * (g * self.grep_a - 1.0) + 2.0  # [B, H, N, 1]

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        start: int,
        stop: int,
        bias_by_offset: Tensor | None,
        gate: Tensor | None,
        key_bias: Tensor | None,
    ) -> Tensor:
        """Attention output of query rows start:stop, [B, H, rows, d]."""
        n = k.shape[2]
        mask = None
        if bias_by_offset is not None:
            keys = torch.arange(n, device=q.device).view(1, n)
            offset = keys - torch.arange(start, stop, device=q.device).view(-1, 1) + (n - 1)
            mask = bias_by_offset[offset].permute(2, 0, 1).unsqueeze(0)  # [1, H, rows, N]
            if gate is not None:
                mask = gate[:, :, start:stop] * mask
        if key_bias is not None:
            mask = key_bias if mask is None else mask + key_bias
        if mask is not None:
            mask = mask.to(q.dtype)
        rows = q if (start == 0 and stop == n) else q[:, :, start:stop]
        return F.scaled_dot_product_attention(
            rows, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.head_dim**-0.5
        )

    def forward(
        self,
        x: Tensor,
        bias_by_offset: Tensor | None,
        key_bias: Tensor | None,
        query_block: int | None = None,
    ) -> Tensor:
        """x [B, N, C]; bias_by_offset [2N-1, H] or None; key_bias [B, 1, 1, N] (0 or -inf) or None.
        Queries are processed in blocks of `query_block` rows so the [B, H, rows, N] bias never has to
        exist for all N rows at once (long audio); None = one block (what an export should trace)."""
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(x).view(b, n, h, d).transpose(1, 2)
        k = self.k_proj(x).view(b, n, h, d).transpose(1, 2)
        v = self.v_proj(x).view(b, n, h, d).transpose(1, 2)
        gate = self._gate(q) if (bias_by_offset is not None and self.gru_rel_pos) else None
        if query_block is None or query_block >= n:
            out = self._attend(q, k, v, 0, n, bias_by_offset, gate, key_bias)
        else:
            out = torch.cat(
                [
                    self._attend(q, k, v, start, min(n, start + query_block), bias_by_offset, gate, key_bias)
                    for start in range(0, n, query_block)
                ],
                dim=2,
            )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


def _gelu_fp32(x: Tensor) -> Tensor:
    # The reference evaluates its FFN GELU in float32 for half dtypes.
    return F.gelu(_upcast(x)).type_as(x)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(_upcast(x), approximate="tanh").type_as(x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": _gelu_fp32,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": F.relu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


class BEATsEncoderLayer(nn.Module):
    """Transformer layer. Post-LN (the released models, with deep norm: residual scaled by
    alpha = (2 * layers) ** 0.25 before each add):  x = LN1(alpha * x + attn(x));  x = LN2(alpha * x + ffn(x)).
    Pre-LN when layer_norm_first:  x = x + attn(LN1(x));  x = x + ffn(LN2(x))."""

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_heads: int,
        *,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        activation_fn: str,
        layer_norm_first: bool,
        deep_norm: bool,
        encoder_layers: int,
        has_relative_attention_bias: bool,
        num_buckets: int,
        max_distance: int,
        gru_rel_pos: bool,
    ) -> None:
        super().__init__()
        if activation_fn not in ACTIVATIONS:
            raise ValueError(
                f"BEATs activation_fn {activation_fn!r} is not supported (supported: {sorted(ACTIVATIONS)})"
            )
        self.activation = ACTIVATIONS[activation_fn]
        self.dropout = dropout
        self.activation_dropout = activation_dropout
        self.layer_norm_first = layer_norm_first
        self.residual_scale = math.pow(2 * encoder_layers, 0.25) if deep_norm else 1.0
        self.self_attn = GatedRelPosSelfAttention(
            embed_dim,
            num_heads,
            dropout=attention_dropout,
            has_relative_attention_bias=has_relative_attention_bias,
            num_buckets=num_buckets,
            max_distance=max_distance,
            gru_rel_pos=gru_rel_pos,
        )
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)

    def _ffn(self, x: Tensor) -> Tensor:
        x = F.dropout(self.activation(self.fc1(x)), self.activation_dropout, self.training)
        return F.dropout(self.fc2(x), self.dropout, self.training)

    def forward(
        self, x: Tensor, bias_by_offset: Tensor | None, key_bias: Tensor | None, query_block: int | None
    ) -> Tensor:
        if self.layer_norm_first:
            attn = self.self_attn(self.self_attn_layer_norm(x), bias_by_offset, key_bias, query_block)
            x = x + F.dropout(attn, self.dropout, self.training)
            return x + self._ffn(self.final_layer_norm(x))
        attn = self.self_attn(x, bias_by_offset, key_bias, query_block)
        x = self.self_attn_layer_norm(x * self.residual_scale + F.dropout(attn, self.dropout, self.training))
        return self.final_layer_norm(x * self.residual_scale + self._ffn(x))
