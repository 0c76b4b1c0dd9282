"""Model-ready inputs: one item's tensors (ItemInputs) and a collated, left-padded batch (ModelBatch).

Everything here is CPU-side bookkeeping done before the forward, so that the forward itself only
sees tensors (no per-item Python decisions on device data).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class AudioSegmentInputs:
    """One <= 300 s audio segment: Whisper log-mel, its valid length, and (WAVE) BEATs fbank."""

    mel: torch.Tensor  # [128, frames] float32 (valid frames only, or padded for Qwen2-Audio)
    mel_len: int  # valid mel frames
    tokens: int  # LLM audio tokens from the Whisper tower for this segment
    fbank: torch.Tensor | None = None  # [fbank_frames, 128] float32, BEATs input


@dataclass
class ItemInputs:
    input_ids: torch.Tensor  # [T] long
    position_ids: torch.Tensor  # [3, T] long (all three rows equal for 1-D RoPE backbones)
    use_head: bool  # True: the recipe's head; False: the text-target head
    audio: list[AudioSegmentInputs] = field(default_factory=list)
    pixel_values: torch.Tensor | None = None  # [patches, 1176]
    grid_thw: tuple[int, int, int] | None = None
    second_per_grid: float | None = None  # seconds per temporal patch (already folded into position_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class ModelBatch:
    input_ids: torch.Tensor  # [B, T], left-padded
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    position_ids: torch.Tensor  # [3, B, T]
    use_head: torch.Tensor  # [B] bool
    padded: bool  # any row shorter than T (lets the forward skip the explicit mask when False)
    # audio (all segments of all rows, row-major)
    mel: torch.Tensor | None = None  # [128, sum(mel_len)] (Omni) or [n_seg, 128, frames] (Qwen2-Audio)
    mel_lens: torch.Tensor | None = None  # [n_seg]
    audio_tokens: torch.Tensor | None = None  # [n_seg] Whisper tokens per segment
    fbank: torch.Tensor | None = None  # [n_seg, F_max, 128]
    fbank_padding: torch.Tensor | None = None  # [n_seg, F_max] bool, True = padding
    # video (all rows, row-major)
    pixel_values: torch.Tensor | None = None  # [sum patches, 1176]
    grid_thw: torch.Tensor | None = None  # [n_video, 3]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> ModelBatch:
        """Move tensors to device; floating tensors other than fbank also to dtype (fbank is kept fp32
        until the BEATs module casts it, since it was computed in float64 for precision)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=non_blocking)
                if dtype is not None and v.is_floating_point() and f.name in ("mel", "pixel_values"):
                    v = v.to(dtype)
            out[f.name] = v
        return ModelBatch(**out)

    def pin_memory(self) -> ModelBatch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.pin_memory() if isinstance(v, torch.Tensor) else v
        return ModelBatch(**out)


def collate(items: list[ItemInputs], pad_token_id: int, stack_mel: bool = False) -> ModelBatch:
    """Left-pad token rows (so the last position is every row's final token) and concatenate media."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    lengths = [it.num_tokens for it in items]
    T = max(lengths)
    B = len(items)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    # Padding positions get 1, like transformers; they are never attended to by real tokens.
    position_ids = torch.ones((3, B, T), dtype=torch.long)
    for i, it in enumerate(items):
        n = lengths[i]
        input_ids[i, T - n :] = it.input_ids
        attention_mask[i, T - n :] = 1
        position_ids[:, i, T - n :] = it.position_ids
    batch = ModelBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_head=torch.tensor([it.use_head for it in items], dtype=torch.bool),
        padded=min(lengths) != T,
    )
    segments = [seg for it in items for seg in it.audio]
    if segments:
        if stack_mel:
            batch.mel = torch.stack([s.mel for s in segments])
        else:
            batch.mel = torch.cat([s.mel[:, : s.mel_len] for s in segments], dim=1)
        batch.mel_lens = torch.tensor([s.mel_len for s in segments], dtype=torch.long)
        batch.audio_tokens = torch.tensor([s.tokens for s in segments], dtype=torch.long)
        if segments[0].fbank is not None:
            f_max = max(s.fbank.shape[0] for s in segments)
            fbank = torch.zeros((len(segments), f_max, segments[0].fbank.shape[1]), dtype=torch.float32)
            pad = torch.ones((len(segments), f_max), dtype=torch.bool)
            for k, s in enumerate(segments):
                fbank[k, : s.fbank.shape[0]] = s.fbank
                pad[k, : s.fbank.shape[0]] = False
            batch.fbank, batch.fbank_padding = fbank, pad
    videos = [it for it in items if it.pixel_values is not None]
    if videos:
        batch.pixel_values = torch.cat([it.pixel_values for it in videos])
        batch.grid_thw = torch.tensor([it.grid_thw for it in videos], dtype=torch.long)
    return batch
