"""Stage graphs: one export-friendly nn.Module per stage the runtime has, and the host-side bookkeeping
that turns a collated PaddedBatch into each graph's tensors.

Every graph takes tensors only and has no Python decision on data, so torch.export traces it once with
symbolic batch/sequence axes and ONNX / AOTInductor / TensorRT all see the same program. Whatever
depends on lengths held on the host (chunking, window permutations, gather indices) is computed by the
`*_inputs` functions below, in integer arithmetic on the CPU, before the graph runs; the floating-point
work is all in the graphs and uses the model's own weights.

Stages (names are the bundle's file stems):
- ``decoder``: inputs_embeds [B, T, D], attention_mask [B, T], position_ids [3, B, T], use_head [B]
  -> embedding [B, E]: the padded dense-mask decoder + the recipe's heads (WaveModel.forward_core).
- ``audio_tower``: the Whisper-style tower of Qwen2.5-Omni on fixed-size chunks [C, 128, 2*n_window]
  (the transformers module splits lengths with .tolist() and cannot export with dynamic lengths).
- ``beats``: BEATs + the pad/truncate, pair-pooling and projector of the WAVE merge.
- ``vision``: the Qwen2.5-VL vision tower with its window/full attention given as segment ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wave_rt.config import OMNI_THINKER, WaveConfig
from wave_rt.model.batch import PaddedBatch
from wave_rt.model.wave_model import WaveModel

STAGES = ("audio_tower", "beats", "vision", "decoder")
BEATS_MAX_PATCHES = 512


# ---------------------------------------------------------------------------------------------- decoder
class DecoderStage(nn.Module):
    """Decoder + heads; use_head picks the recipe's head (media, text queries) or the text-target head."""

    def __init__(self, model: WaveModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                use_head: torch.Tensor) -> torch.Tensor:
        return self.model.forward_core(inputs_embeds, attention_mask, position_ids, use_head)


def decoder_inputs(batch: PaddedBatch, inputs_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
    # The graph always takes the mask: an unpadded batch gives an all-ones mask, which masks nothing.
    return {
        "inputs_embeds": inputs_embeds,
        "attention_mask": batch.attention_mask.to(torch.int64),
        "position_ids": batch.position_ids.to(torch.int64),
        "use_head": batch.use_head.to(torch.bool),
    }


# ------------------------------------------------------------------------------------------ audio tower
class AudioTowerStage(nn.Module):
    """Qwen2.5-Omni's audio tower over fixed-size chunks: the same arithmetic as the transformers module
    (conv stack per chunk, sinusoidal positions restarting in every chunk, attention within a chunk over its
    valid frames, stride-2 average pooling over each segment's valid stream, ln_post, proj), with the
    chunk axis dynamic and attention as a padded [C, n_window, n_window] key mask instead of cu_seqlens."""

    def __init__(self, model: WaveModel) -> None:
        super().__init__()
        self.tower = model.audio_tower
        self.n_window = int(model.audio_tower.n_window)

    def forward(self, chunks: torch.Tensor, chunk_lens: torch.Tensor, valid_index: torch.Tensor,
                pool_index: torch.Tensor) -> torch.Tensor:
        tw = self.tower
        dtype = tw.conv1.weight.dtype
        x = chunks.to(dtype)
        frame_ok = (torch.arange(x.shape[2], device=x.device).view(1, 1, -1) < chunk_lens.view(-1, 1, 1)).to(dtype)
        x = F.gelu(tw.conv1(x)) * frame_ok
        x = F.gelu(tw.conv2(x)).transpose(1, 2)  # [C, n_window, d]
        n_tok = x.shape[1]
        x = x + tw.positional_embedding.positional_embedding[:n_tok].unsqueeze(0).to(dtype)
        after = (chunk_lens - 1) // 2 + 1
        key_ok = (torch.arange(n_tok, device=x.device).view(1, -1) < after.view(-1, 1)).view(-1, 1, 1, n_tok)
        for layer in tw.layers:
            x = _whisper_layer(layer, x, key_ok)
        flat = x.reshape(-1, x.shape[-1]).index_select(0, valid_index)
        pooled = (flat.index_select(0, pool_index) + flat.index_select(0, pool_index + 1)) / 2
        return tw.proj(tw.ln_post(pooled))


def _whisper_layer(layer: nn.Module, x: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
    attn = layer.self_attn
    C, T, d = x.shape
    h = layer.self_attn_layer_norm(x)
    heads = attn.num_heads
    q = attn.q_proj(h).view(C, T, heads, -1).transpose(1, 2)
    k = attn.k_proj(h).view(C, T, heads, -1).transpose(1, 2)
    v = attn.v_proj(h).view(C, T, heads, -1).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok, scale=attn.scaling)
    x = x + attn.out_proj(o.transpose(1, 2).reshape(C, T, d))
    h = layer.final_layer_norm(x)
    x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
    if x.dtype == torch.float16:
        bound = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-bound, bound)
    return x


def audio_tower_inputs(mel: torch.Tensor, mel_lens: torch.Tensor, n_window: int) -> dict[str, torch.Tensor]:
    """Concatenated log-mel [128, sum(frames)] + per-segment lengths -> chunked graph inputs."""
    size = 2 * n_window
    lens = [int(v) for v in mel_lens.tolist()]
    pieces: list[torch.Tensor] = []
    chunk_lens: list[int] = []
    valid: list[int] = []
    offset = 0
    for n in lens:
        for start in range(0, n, size):
            m = min(size, n - start)
            piece = mel[:, offset + start: offset + start + m]
            pieces.append(F.pad(piece, (0, size - m)))
            c = len(chunk_lens)
            chunk_lens.append(m)
            valid.extend(c * n_window + j for j in range((m - 1) // 2 + 1))
        offset += n
    pool: list[int] = []
    base = 0
    for n in lens:
        after = (n - 1) // 2 + 1
        pool.extend(base + 2 * j for j in range((after - 2) // 2 + 1))
        base += after
    return {
        "chunks": torch.stack(pieces).to(torch.float32),
        "chunk_lens": torch.tensor(chunk_lens, dtype=torch.int64),
        "valid_index": torch.tensor(valid, dtype=torch.int64),
        "pool_index": torch.tensor(pool, dtype=torch.int64),
    }


# ----------------------------------------------------------------------------------------------- BEATs
class BeatsStage(nn.Module):
    """BEATs on padded fbank segments, then WAVE's merge: each segment's tokens padded with zeros /
    truncated to 2x its Whisper tokens (a gather through `token_index` [tokens, 2], where index n_seg*n_max
    is a zero row), averaged in pairs, LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, model: WaveModel) -> None:
        super().__init__()
        self.beats = model.beats
        self.beats_ln = model.beats_ln
        self.beats_proj = model.beats_proj

    def forward(self, fbank: torch.Tensor, fbank_padding: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        dtype = self.beats_ln.weight.dtype
        tokens, _ = self.beats(fbank.to(dtype), padding_mask=fbank_padding)
        width = tokens.shape[-1]
        flat = torch.cat([tokens.reshape(-1, width), tokens.new_zeros(1, width)])
        pooled = (flat.index_select(0, token_index[:, 0]) + flat.index_select(0, token_index[:, 1])) / 2
        return self.beats_proj(self.beats_ln(pooled))


def beats_inputs(fbank: torch.Tensor, fbank_padding: torch.Tensor, audio_tokens: torch.Tensor,
                 patch: int, freq_patches: int) -> dict[str, torch.Tensor]:
    """The same index arithmetic as WaveModel.encode_beats, done on the host. Frames are padded (as
    padding) up to whole time patches, at least two: the graph's time axis is a multiple of the patch."""
    from wave_rt.errors import InputError

    n_seg, frames = fbank_padding.shape
    valid = (((~fbank_padding).sum(1) // patch) * freq_patches).tolist()
    patches = max(2, -(-frames // patch))
    if patches > BEATS_MAX_PATCHES:
        raise InputError(f"audio segment of {frames} fbank frames",
                         f"the exported BEATs graph takes at most {BEATS_MAX_PATCHES * patch} frames per segment")
    extra = patches * patch - frames
    if extra:
        fbank = F.pad(fbank, (0, 0, 0, extra))
        fbank_padding = F.pad(fbank_padding, (0, extra), value=True)
    n_max = patches * freq_patches
    index: list[int] = []
    for s, want in enumerate((2 * audio_tokens).tolist()):
        index.extend(s * n_max + j if j < valid[s] else n_seg * n_max for j in range(want))
    return {
        "fbank": fbank.to(torch.float32),
        "fbank_padding": fbank_padding.to(torch.bool),
        "token_index": torch.tensor(index, dtype=torch.int64).view(-1, 2),
    }


# ---------------------------------------------------------------------------------------------- vision
class VisionStage(nn.Module):
    """Qwen2.5-VL vision tower: patch embedding, blocks with 2-D rotary embeddings and either window or
    full attention, merger. Window permutation, rotary positions and attention segments come from the
    host (`vision_inputs`) because they depend on grid_thw; attention is a dense mask from segment ids."""

    def __init__(self, model: WaveModel) -> None:
        super().__init__()
        self.visual = model.visual
        self.full = set(int(i) for i in model.visual.fullatt_block_indexes)

    def forward(self, pixel_values: torch.Tensor, rope_positions: torch.Tensor, window_index: torch.Tensor,
                reverse_index: torch.Tensor, window_segments: torch.Tensor,
                item_segments: torch.Tensor) -> torch.Tensor:
        vis = self.visual
        unit = vis.spatial_merge_unit
        h = vis.patch_embed(pixel_values)
        n = h.shape[0]
        h = h.reshape(n // unit, unit, -1).index_select(0, window_index).reshape(n, -1)
        cos, sin = vis.rotary_pos_emb(h, rope_positions)
        cos = cos.reshape(n // unit, unit, -1).index_select(0, window_index).reshape(n, -1)
        sin = sin.reshape(n // unit, unit, -1).index_select(0, window_index).reshape(n, -1)
        window_mask = (window_segments.view(-1, 1) == window_segments.view(1, -1)).view(1, 1, n, n)
        full_mask = (item_segments.view(-1, 1) == item_segments.view(1, -1)).view(1, 1, n, n)
        for i, blk in enumerate(vis.blocks):
            mask = full_mask if i in self.full else window_mask
            h = h + _vision_attention(blk.attn, blk.norm1(h), cos, sin, mask)
            h = h + blk.mlp(blk.norm2(h))
        merged = vis.merger(h)
        return merged.index_select(0, reverse_index)


def _vision_attention(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import apply_rotary_pos_emb_vision

    n = x.shape[0]
    q = attn.q(x).reshape(n, attn.num_heads, -1)
    k = attn.k(x).reshape(n, attn.num_heads, -1)
    v = attn.v(x).reshape(n, attn.num_heads, -1)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                       v.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=attn.scaling)
    return attn.proj(o.squeeze(0).transpose(0, 1).reshape(n, -1))


def vision_inputs(pixel_values: torch.Tensor, grid_thw: torch.Tensor, vision_config: Any) -> dict[str, torch.Tensor]:
    """grid_thw-dependent bookkeeping with transformers' own helpers (the ones the module calls)."""
    from transformers.vision_utils import (
        get_vision_attention_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    grid = grid_thw.to(torch.int64)
    merge = int(vision_config.spatial_merge_size)
    positions = get_vision_position_ids(grid, merge)
    cu_seqlens, _ = get_vision_attention_seqlens(grid, vision_config)
    window_index, cu_window = get_vision_window_index(grid, spatial_merge_size=merge,
                                                      window_size=int(vision_config.window_size),
                                                      patch_size=int(vision_config.patch_size))
    n = int(pixel_values.shape[0])
    idx = torch.arange(n)
    cu_window = torch.as_tensor(cu_window, dtype=torch.int64)
    cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.int64)
    # Segment of each (window-permuted) row: the count of boundaries at or before it.
    window_segments = torch.searchsorted(cu_window[1:].contiguous(), idx, right=True)
    item_segments = torch.searchsorted(cu_seqlens[1:].contiguous(), idx, right=True)
    return {
        "pixel_values": pixel_values.to(torch.float32),
        "rope_positions": positions.to(torch.int64),
        "window_index": window_index.to(torch.int64),
        "reverse_index": torch.argsort(window_index).to(torch.int64),
        "window_segments": window_segments.to(torch.int64),
        "item_segments": item_segments.to(torch.int64),
    }


# ------------------------------------------------------------------------------------------ stage specs
@dataclass(frozen=True)
class StageSpec:
    """What an exporter needs: the module, input/output names, dynamic axes per input (axis -> name)."""

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    bounds: dict[str, tuple[int, int]] = field(default_factory=dict)  # axis name -> (min, max) where not (1, 2**20)


def stage_specs(model: WaveModel) -> list[StageSpec]:
    """The stages this model has (BEATs only with use_beats, the audio tower unless beats_only)."""
    cfg = model.config
    if cfg.backbone != OMNI_THINKER:
        from wave_rt.errors import CheckpointError

        raise CheckpointError(cfg.backbone, "export supports the Qwen2.5-Omni thinker backbone (WAVE, ALM2Vec-style "
                                            "recipes); the Qwen2-Audio backbone has no export graphs yet")
    recipe = cfg.recipe
    if getattr(recipe, "pooling", "last") != "last" or getattr(recipe, "attention", "causal") != "causal":
        from wave_rt.errors import CheckpointError

        raise CheckpointError(recipe.name, "export graphs cover last-token pooling with causal attention only")
    specs: list[StageSpec] = []
    model.eval()
    if not cfg.beats_only:
        specs.append(StageSpec("audio_tower", AudioTowerStage(model),
                               ("chunks", "chunk_lens", "valid_index", "pool_index"), ("audio_embeds",),
                               {"chunks": {0: "chunks"}, "chunk_lens": {0: "chunks"},
                                "valid_index": {0: "frames"}, "pool_index": {0: "tokens"}}))
    if cfg.use_beats:
        patch = int(model.beats.cfg.input_patch_size)
        specs.append(StageSpec("beats", BeatsStage(model), ("fbank", "fbank_padding", "token_index"),
                               ("beats_embeds",),
                               {"fbank": {0: "segments", 1: f"fbank_patches*{patch}"},
                                "fbank_padding": {0: "segments", 1: f"fbank_patches*{patch}"},
                                "token_index": {0: "audio_tokens"}},
                               # BEATs switches to query-blocked attention past 4096 tokens (512 time patches,
                               # 82 s): the graph holds the one-block path, longer segments are refused.
                               {"fbank_patches": (2, BEATS_MAX_PATCHES)}))
    patches = f"merged*{int(model.visual.spatial_merge_unit)}"
    specs.append(StageSpec("vision", VisionStage(model),
                           ("pixel_values", "rope_positions", "window_index", "reverse_index", "window_segments",
                            "item_segments"), ("video_embeds",),
                           {"pixel_values": {0: patches}, "rope_positions": {0: patches},
                            "window_index": {0: "merged"}, "reverse_index": {0: "merged"},
                            "window_segments": {0: patches}, "item_segments": {0: patches}}))
    specs.append(StageSpec("decoder", DecoderStage(model),
                           ("inputs_embeds", "attention_mask", "position_ids", "use_head"), ("embedding",),
                           {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                            "position_ids": {1: "batch", 2: "seq"}, "use_head": {0: "batch"}}))
    for spec in specs:
        spec.module.eval()
    return specs


# ------------------------------------------------------------------------------ host-side bookkeeping
class StageInputs:
    """PaddedBatch -> each stage graph's named inputs (integer bookkeeping on the host)."""

    def __init__(self, config: WaveConfig, embed_table: torch.Tensor) -> None:
        self.config = config
        self.table = embed_table
        hf = config.hf_config
        self.n_window = int(hf.audio_config.n_window)
        self.vision_config = getattr(hf, "vision_config", None)
        beats = config.beats or {}
        self.patch = int(beats.get("input_patch_size", 16))

    def token_embeddings(self, batch: PaddedBatch) -> torch.Tensor:
        return self.table[batch.input_ids.to(self.table.device)]

    def audio_tower(self, batch: PaddedBatch) -> dict[str, torch.Tensor]:
        return audio_tower_inputs(batch.mel.float().cpu(), batch.mel_lens.cpu(), self.n_window)

    def beats(self, batch: PaddedBatch) -> dict[str, torch.Tensor]:
        fbank = batch.fbank.cpu()
        return beats_inputs(fbank, batch.fbank_padding.cpu(), batch.audio_tokens.cpu(), self.patch,
                            int(fbank.shape[-1]) // self.patch)

    def vision(self, batch: PaddedBatch) -> dict[str, torch.Tensor]:
        return vision_inputs(batch.pixel_values.float().cpu(), batch.grid_thw.cpu(), self.vision_config)

    def decoder(self, batch: PaddedBatch, inputs_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return decoder_inputs(batch, inputs_embeds)
