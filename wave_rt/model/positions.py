"""Token layout and 3-D (M-RoPE) position ids of one sequence, built segment by segment.

The processor knows the structure of every sequence it builds (text runs, an audio span, a video
grid, interleaved audio-visual chunks), so positions are assigned from that structure directly
instead of being re-derived by scanning token ids as transformers' `get_rope_index` does. The rules
are the same as transformers' (plain Qwen2.5-Omni thinker) and as WAVE's reference code (dual audio:
doubled audio spans, chunk sizes scaled by seconds-per-grid, chunks read from the layout):

- text: consecutive integers in all three dims, starting at (max position so far) + 1;
- audio: `<|audio_bos|>`, the audio tokens and `<|audio_eos|>` are consecutive like text;
- video: `<|vision_bos|>` at p, token (t, h, w) at p + 1 + (floor(t * spg * 25), h, w), then
  `<|vision_eos|>` at (max of the video block) + 1;
- audio-visual: `<|vision_bos|><|audio_bos|>` both at p, video tokens as above from p + 1, audio token k
  at p + 1 + k, video and audio interleaved chunk by chunk (video first), then `<|audio_eos|><|vision_eos|>`
  both at (max so far) + 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

ChunkRule = Literal["transformers", "wave"]


def chunk_bounds(values: np.ndarray, tokens_per_chunk: float, *, isclose: bool = False) -> list[tuple[int, int]]:
    """Split a non-decreasing array of position values into runs at multiples of tokens_per_chunk.

    Mirrors the reference iteration exactly, including its corner cases (a value that jumps over
    several boundaries opens one chunk per boundary crossed). `isclose` is WAVE's variant, which
    also cuts at values within 1e-5 (relative) of a boundary.
    """
    bounds: list[tuple[int, int]] = []
    start, current = 0, 1
    for i, v in enumerate(values.tolist()):
        edge = current * tokens_per_chunk
        if v >= edge or (isclose and math.isclose(v, edge, rel_tol=1e-5)):
            bounds.append((start, i))
            start = i
            current += 1
    bounds.append((start, len(values)))
    return bounds


@dataclass(frozen=True)
class VideoGrid:
    t: int  # temporal patches (frames / temporal_patch_size)
    h: int  # patch rows (before spatial merge)
    w: int  # patch columns (before spatial merge)
    second_per_grid: float
    merge: int = 2

    @property
    def tokens(self) -> int:
        return self.t * (self.h // self.merge) * (self.w // self.merge)

    def token_time_values(self, position_id_per_seconds: float) -> np.ndarray:
        """Per LLM token, t * spg * pps in float64, as the processors compute it for chunking."""
        per_frame = (self.h // self.merge) * (self.w // self.merge)
        return np.repeat(np.arange(self.t, dtype=np.float64), per_frame) * self.second_per_grid * position_id_per_seconds

    def positions(self, start: int, position_id_per_seconds: float) -> torch.Tensor:
        """(3, tokens) positions; the temporal index is computed in float32 and truncated like the reference."""
        gh, gw = self.h // self.merge, self.w // self.merge
        spg = torch.tensor(self.second_per_grid, dtype=torch.float32)
        t_index = (torch.arange(self.t) * spg * position_id_per_seconds).long()
        t_idx = t_index.view(-1, 1).expand(-1, gh * gw).flatten()
        h_idx = torch.arange(gh).view(1, -1, 1).expand(self.t, -1, gw).flatten()
        w_idx = torch.arange(gw).view(1, 1, -1).expand(self.t, gh, -1).flatten()
        return torch.stack([t_idx, h_idx, w_idx]) + start


class SequenceBuilder:
    """Accumulates token ids and their (3, T) positions; `build()` returns both as tensors."""

    def __init__(self) -> None:
        self._ids: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []
        self._next = 0

    def _append(self, ids: torch.Tensor, pos: torch.Tensor) -> None:
        self._ids.append(ids)
        self._pos.append(pos)
        if pos.numel():
            self._next = int(pos.max()) + 1

    def _run(self, ids: Sequence[int] | torch.Tensor) -> None:
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        pos = (torch.arange(ids_t.numel()) + self._next).view(1, -1).expand(3, -1)
        self._append(ids_t, pos)

    def text(self, ids: Sequence[int]) -> None:
        if len(ids):
            self._run(ids)

    def audio(self, n_tokens: int, *, audio_id: int, bos_id: int, eos_id: int) -> None:
        self._run([bos_id] + [audio_id] * n_tokens + [eos_id])

    def video(self, grid: VideoGrid, *, video_id: int, bos_id: int, eos_id: int, position_id_per_seconds: float) -> None:
        self._run([bos_id])
        pos = grid.positions(self._next, position_id_per_seconds)
        self._append(torch.full((grid.tokens,), video_id, dtype=torch.long), pos)
        self._run([eos_id])

    def audio_visual(
        self,
        grid: VideoGrid,
        audio_tokens: int,
        *,
        audio_repeat: int,
        rule: ChunkRule,
        video_id: int,
        audio_id: int,
        vision_bos_id: int,
        vision_eos_id: int,
        audio_bos_id: int,
        audio_eos_id: int,
        position_id_per_seconds: float,
        seconds_per_chunk: float,
    ) -> None:
        """Interleaved audio-visual block. `audio_tokens` counts Whisper tokens; `audio_repeat` is 2 when
        each is followed by a BEATs token (WAVE), which doubles the chunk lengths and the audio positions."""
        p = self._next
        both = torch.full((3, 2), p, dtype=torch.long)
        self._append(torch.tensor([vision_bos_id, audio_bos_id]), both)
        start = p + 1
        video_pos = grid.positions(start, position_id_per_seconds)
        n_audio = audio_tokens * audio_repeat
        audio_pos = (torch.arange(n_audio) + start).view(1, -1).expand(3, -1)

        if rule == "wave":
            # WAVE's processor chunks by 2 * spg seconds on float values (with isclose), before doubling.
            tpc = position_id_per_seconds * seconds_per_chunk * grid.second_per_grid
            v_chunks = chunk_bounds(grid.token_time_values(position_id_per_seconds), tpc, isclose=True)
            a_chunks = chunk_bounds(np.arange(audio_tokens, dtype=np.float64), tpc, isclose=True)
            a_chunks = [(a * audio_repeat, b * audio_repeat) for a, b in a_chunks]
        else:
            tpc = int(position_id_per_seconds * seconds_per_chunk)
            v_chunks = chunk_bounds(grid.token_time_values(position_id_per_seconds), tpc)
            a_chunks = chunk_bounds(np.arange(n_audio, dtype=np.float64), tpc)

        ids_parts: list[torch.Tensor] = []
        pos_parts: list[torch.Tensor] = []
        for j in range(max(len(v_chunks), len(a_chunks))):
            if j < len(v_chunks):
                a, b = v_chunks[j]
                ids_parts.append(torch.full((b - a,), video_id, dtype=torch.long))
                pos_parts.append(video_pos[:, a:b])
            if j < len(a_chunks):
                a, b = a_chunks[j]
                ids_parts.append(torch.full((b - a,), audio_id, dtype=torch.long))
                pos_parts.append(audio_pos[:, a:b])
        self._append(torch.cat(ids_parts), torch.cat(pos_parts, dim=1))
        # The end markers (and the text after them) follow the LAST chunk's largest position, not the block's:
        # WAVE's and transformers' get_rope_index take llm_pos_ids_list[-1].max() + 1. They differ when the
        # audio is shorter than the video, so the block ends below its largest position.
        p_end = int(pos_parts[-1].max()) + 1 if pos_parts else self._next
        self._append(torch.tensor([audio_eos_id, vision_eos_id]), torch.full((3, 2), p_end, dtype=torch.long))

    def build(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._ids:
            return torch.empty(0, dtype=torch.long), torch.empty(3, 0, dtype=torch.long)
        return torch.cat(self._ids), torch.cat(self._pos, dim=1).contiguous()
