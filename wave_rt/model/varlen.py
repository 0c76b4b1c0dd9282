"""Variable-length attention over packed sequences: one call per layer, no padding, no host sync.

Sequences are concatenated along the token axis and delimited by `cu_seqlens` (int32, [n + 1]).
The backend is chosen once per process, at run time, and logged:

- `torch_varlen`: `torch.nn.attention.varlen.varlen_attn` (CUDA flash kernels, fp16/bf16 only);
- `flash_attn`: `flash_attn.flash_attn_varlen_func` when that package is installed (CUDA, fp16/bf16);
- `sdpa_per_sequence`: one `scaled_dot_product_attention` per sequence, the sequence bounds read from
  host-side lengths (the CPU path, and the CUDA fallback for fp32 or when no varlen kernel exists).
  It is what transformers' own "sdpa" path computes, so it is also the reference the tests hold the
  kernels to.

`register_encoder_attention()` registers the same function with transformers' `AttentionInterface`
under a name containing "flash": transformers' Omni audio and vision towers then take their one-call
`cu_seqlens` branch instead of splitting Q/K/V with `cu_seqlens.tolist()` and launching one SDPA per
window.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ENCODER_ATTENTION = "wave_rt_flash_varlen"


@functools.cache
def _torch_varlen() -> tuple[Any, frozenset[str]] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def _flash_attn() -> Any | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def backend_for(device: torch.device, dtype: torch.dtype) -> str:
    """The backend `varlen_attention` uses for tensors on `device` in `dtype`."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _torch_varlen() is not None:
            return "torch_varlen"
        if _flash_attn() is not None:
            return "flash_attn"
    return "sdpa_per_sequence"


_logged: set[tuple[str, str]] = set()


def _log_backend(device: torch.device, backend: str) -> None:
    key = (device.type, backend)
    if key not in _logged:
        _logged.add(key)
        log.info("variable-length attention on %s: %s", device.type, backend)


def _repeat_kv(k: torch.Tensor, groups: int) -> torch.Tensor:
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    causal: bool,
    scale: float,
    lengths_q: Sequence[int] | None = None,
    lengths_k: Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention of packed queries [Nq, Hq, d] over packed keys/values [Nk, Hkv, d] (Hq a multiple of Hkv,
    grouped-query attention without copying K/V where the backend allows) -> [Nq, Hq, d].

    Sequence i owns query rows cu_q[i]:cu_q[i+1] and key rows cu_k[i]:cu_k[i+1]. `causal` aligns the
    mask to the bottom right (query j of a sequence with fewer queries than keys sees the keys up to its
    own position counted from the end), as flash attention does. `lengths_q`/`lengths_k` are the host-side
    sequence lengths: the per-sequence SDPA path slices with them so that it never reads `cu_*` back."""
    backend = backend_for(q.device, q.dtype)
    _log_backend(q.device, backend)
    groups = q.shape[1] // k.shape[1]
    if backend == "torch_varlen":
        fn, params = _torch_varlen()
        kw: dict[str, Any] = {}
        if "scale" in params:
            kw["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            raise NotImplementedError("this torch's varlen_attn has no scale argument; need scale = head_dim ** -0.5")
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        if "window_size" in params:
            kw["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kw["is_causal"] = causal
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    if backend == "flash_attn":
        return _flash_attn()(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal)
    if lengths_q is None or lengths_k is None:
        # Only on the CPU (where reading cu_seqlens is no device sync) or on a CUDA fp32 fallback.
        lengths_q = (cu_q[1:] - cu_q[:-1]).tolist()
        lengths_k = lengths_q if cu_k is cu_q else (cu_k[1:] - cu_k[:-1]).tolist()
    outs = []
    sq = sk = 0
    for nq, nk in zip(lengths_q, lengths_k):
        qi = q[sq : sq + nq].transpose(0, 1).unsqueeze(0)
        ki = k[sk : sk + nk].transpose(0, 1).unsqueeze(0)
        vi = v[sk : sk + nk].transpose(0, 1).unsqueeze(0)
        mask = None
        is_causal = causal
        if causal and nq != nk:
            # Bottom-right alignment (SDPA's is_causal is top-left): build the mask explicitly.
            idx_q = torch.arange(nq, device=q.device).view(-1, 1) + (nk - nq)
            mask = idx_q >= torch.arange(nk, device=q.device).view(1, -1)
            is_causal = False
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=is_causal, scale=scale,
                                           enable_gqa=groups > 1)
        outs.append(o[0].transpose(0, 1))
        sq += nq
        sk += nk
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def encoder_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract ([1, H, N, d] in, [1, N, H, d] out) for the encoder
    towers' flash branch: block-diagonal (bidirectional) attention over the windows in cu_seqlens."""
    if dropout:
        raise NotImplementedError("wave_rt's encoder attention is inference/frozen-encoder only (dropout=0)")
    if cu_seq_lens_q is None:
        raise ValueError(f"{ENCODER_ATTENTION} needs cu_seqlens (packed input); got a padded call")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if max_length_q is None:
        max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    cu_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    out = varlen_attention(q, k, v, cu_seq_lens_q, cu_k, int(max_length_q), int(max_length_k or max_length_q),
                           causal=bool(is_causal), scale=scale)
    return out.unsqueeze(0), None


@functools.cache
def register_encoder_attention() -> str:
    """Register `encoder_attention_forward` with transformers (once) and return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ENCODER_ATTENTION, encoder_attention_forward)
    return ENCODER_ATTENTION
