"""Model-ready inputs: one item's tensors (ItemInputs), a collated left-padded batch (PaddedBatch, the
reference and export layout) and a packed batch (PackedBatch, the hot path: no padding at all).

Everything here is CPU-side bookkeeping done before the forward, so that the forward itself only
sees tensors (no per-item Python decisions on device data).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class AudioSegmentInputs:
    """One <= 300 s audio segment: Whisper log-mel, its valid length, and (WAVE) BEATs fbank.

    Deferred (features computed later, in batch, on the model's device: wave_rt.embed.batch_features): `mel`
    and `fbank` are None and `waveform` holds the segment's 16 kHz samples; `mel_len` and `tokens` are
    already exact, since they follow from the sample count alone."""

    mel: torch.Tensor | None  # [128, frames] float32 (valid frames only, or padded for Qwen2-Audio)
    mel_len: int  # valid mel frames
    tokens: int  # LLM audio tokens from the Whisper tower for this segment
    fbank: torch.Tensor | None = None  # [fbank_frames, 128] float32, BEATs input
    waveform: torch.Tensor | None = None  # deferred: float32 [samples], the features' only input


@dataclass
class ItemInputs:
    input_ids: torch.Tensor  # [T] long
    position_ids: torch.Tensor  # [3, T] long (all three rows equal for 1-D RoPE backbones)
    use_head: bool  # True: the recipe's head; False: the text-target head
    audio: list[AudioSegmentInputs] = field(default_factory=list)
    pixel_values: torch.Tensor | None = None  # [patches, 1176]
    grid_thw: tuple[int, int, int] | None = None
    second_per_grid: float | None = None  # seconds per temporal patch (already folded into position_ids)
    # deferred video: uint8 [T, H, W, 3] frames at their decoded size, and the size they are resized to
    frames: torch.Tensor | None = None
    frame_size: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def deferred(self) -> bool:
        """Whether some features still have to be computed from raw samples or frames before collation."""
        return self.frames is not None or any(s.waveform is not None for s in self.audio)


@dataclass
class PaddedBatch:
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

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> PaddedBatch:
        """Move tensors to device; floating tensors other than fbank also to dtype (fbank is kept fp32
        until the BEATs module casts it, since it was computed in float64 for precision)."""
        return _move(self, lambda name, v: _to(name, v, device, dtype, non_blocking))

    def pin_memory(self) -> PaddedBatch:
        return _move(self, _pin)


# Floating inputs cast to the model dtype on the way to the device (fbank stays fp32, see PaddedBatch.to).
_CAST_TO_MODEL_DTYPE = ("mel", "pixel_values", "padded_feature")


def _to(name: str, v: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None,
        non_blocking: bool) -> torch.Tensor:
    v = v.to(device, non_blocking=non_blocking)
    if dtype is not None and v.is_floating_point() and name in _CAST_TO_MODEL_DTYPE:
        v = v.to(dtype)
    return v


def _pin(name: str, v: torch.Tensor) -> torch.Tensor:
    # Features computed on the device (deferred items) are already there: only host tensors are pinned.
    return v.pin_memory() if v.device.type == "cpu" else v


def _move(batch: Any, fn: Any) -> Any:
    """A copy of a batch dataclass with fn(name, tensor) applied to every tensor, also inside dict fields."""
    out = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            v = fn(f.name, v)
        elif isinstance(v, dict):
            v = {k: fn(k, t) if isinstance(t, torch.Tensor) else t for k, t in v.items()}
        out[f.name] = v
    return type(batch)(**out)


@dataclass
class PackedBatch:
    """Items concatenated into one token stream: no padding row, no [B, 1, T, T] mask.

    Item i owns rows cu_seqlens[i]:cu_seqlens[i+1]; its last token is row last_index[i]. Everything the
    forward would otherwise read back from the device (lengths, the longest item, which head runs, how many
    placeholder rows each encoder fills, the encoders' window tables) is fixed here, on the host."""

    input_ids: torch.Tensor  # [N] long, N = sum of the items' real tokens
    position_ids: torch.Tensor  # [3, N]
    cu_seqlens: torch.Tensor  # [B + 1] int32
    last_index: torch.Tensor  # [B] long
    use_head: torch.Tensor  # [B] bool
    lengths: tuple[int, ...]  # host copy of the item lengths
    head_mode: str  # "head" (all rows use the recipe's head), "target" (all the text-target head), "mixed"
    audio_index: torch.Tensor | None = None  # [n audio placeholders] rows of the stream, in order
    video_index: torch.Tensor | None = None  # [n video placeholders]
    mel: torch.Tensor | None = None
    mel_lens: torch.Tensor | None = None
    audio_tokens: torch.Tensor | None = None
    fbank: torch.Tensor | None = None
    fbank_padding: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    grid_thw: torch.Tensor | None = None
    beats_tokens: int = 0  # 2 * sum(audio_tokens): the BEATs pooling's gather size
    audio_keep_index: torch.Tensor | None = None  # Qwen2-Audio: valid rows of the flattened [n, frames/4] output
    audio_tower_kwargs: dict[str, Any] | None = None  # precomputed window tables for the Omni audio tower
    vision_tower_kwargs: dict[str, Any] | None = None  # precomputed window tables for the vision tower

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> PackedBatch:
        return _move(self, lambda name, v: _to(name, v, device, dtype, non_blocking))

    def pin_memory(self) -> PackedBatch:
        return _move(self, _pin)


def collate_packed(
    items: list[ItemInputs],
    *,
    audio_token_id: int | None = None,
    video_token_id: int | None = None,
    stack_mel: bool = False,
    tower_inputs: Any | None = None,
) -> PackedBatch:
    """Concatenate items into one stream (no padding) and fix every data-dependent count on the host.
    `tower_inputs(batch)`, when given, precomputes the encoders' window tables (see WaveModel.tower_inputs)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    lengths = tuple(it.num_tokens for it in items)
    if min(lengths) <= 0:
        raise ValueError("cannot embed an item with no tokens")
    input_ids = torch.cat([it.input_ids for it in items])
    cu = torch.zeros(len(items) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    uses = [bool(it.use_head) for it in items]
    batch = PackedBatch(
        input_ids=input_ids,
        position_ids=torch.cat([it.position_ids for it in items], dim=1),
        cu_seqlens=cu,
        last_index=cu[1:].long() - 1,
        use_head=torch.tensor(uses, dtype=torch.bool),
        lengths=lengths,
        head_mode="head" if all(uses) else ("target" if not any(uses) else "mixed"),
    )
    _collate_media(batch, items, stack_mel)
    if batch.mel is not None and audio_token_id is not None:
        batch.audio_index = (input_ids == audio_token_id).nonzero().view(-1)
    if batch.pixel_values is not None and video_token_id is not None:
        batch.video_index = (input_ids == video_token_id).nonzero().view(-1)
    if batch.audio_tokens is not None:
        batch.beats_tokens = 2 * int(batch.audio_tokens.sum())
    if stack_mel and batch.mel is not None:
        # Qwen2-Audio's tower: stride-2 conv then AvgPool(2, 2) over the padded frames
        out_len = ((batch.mel.shape[-1] - 1) // 2 + 1 - 2) // 2 + 1
        batch.audio_keep_index = torch.cat([torch.arange(int(t)) + k * out_len
                                            for k, t in enumerate(batch.audio_tokens.tolist())])
    if tower_inputs is not None:
        tower_inputs(batch)
    return batch


def collate(items: list[ItemInputs], pad_token_id: int, stack_mel: bool = False) -> PaddedBatch:
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
    batch = PaddedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_head=torch.tensor([it.use_head for it in items], dtype=torch.bool),
        padded=min(lengths) != T,
    )
    _collate_media(batch, items, stack_mel)
    return batch


def _collate_media(batch: PaddedBatch | PackedBatch, items: list[ItemInputs], stack_mel: bool) -> None:
    """Concatenate every item's audio segments and video patches in item order (shared by both layouts)."""
    if any(it.deferred for it in items):
        raise ValueError("deferred items carry raw samples/frames, not features: run "
                         "wave_rt.embed.batch_features.featurize_batch on them before collating")
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
            # On the features' device: deferred features computed on the GPU are padded there.
            dev = segments[0].fbank.device
            fbank = torch.zeros((len(segments), f_max, segments[0].fbank.shape[1]), dtype=torch.float32, device=dev)
            pad = torch.ones((len(segments), f_max), dtype=torch.bool, device=dev)
            for k, s in enumerate(segments):
                fbank[k, : s.fbank.shape[0]] = s.fbank
                pad[k, : s.fbank.shape[0]] = False
            batch.fbank, batch.fbank_padding = fbank, pad
    videos = [it for it in items if it.pixel_values is not None]
    if videos:
        batch.pixel_values = torch.cat([it.pixel_values for it in videos])
        batch.grid_thw = torch.tensor([it.grid_thw for it in videos], dtype=torch.long)
