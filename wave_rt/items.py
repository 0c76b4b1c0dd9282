"""Item types accepted by WaveEncoder.encode(): plain str (text), Text, Audio, Video, AudioVisual."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, Union

Source = Union[str, "os.PathLike[str]", bytes, Any]  # Any: numpy array or torch tensor


@dataclass(frozen=True)
class Text:
    """A text item. `side="target"` (what a plain str means) is WAVE's text side: the final-layer
    last-token state of `text<|im_end|>`, no fusion head, no instruction. `side="query"` routes the
    text through the recipe's pooling head with the instruction template, like a media query."""

    text: str
    side: Literal["target", "query"] = "target"


@dataclass(frozen=True, eq=False)
class Audio:
    """Speech or sound: a path, encoded bytes, or a waveform (numpy/torch, mono or [channels, samples]).

    A raw waveform needs `sample_rate`; for files the container's rate is used and resampled to 16 kHz."""

    source: Source
    sample_rate: int | None = None


@dataclass(frozen=True, eq=False)
class Video:
    """Silent video: a path, encoded bytes, or decoded frames uint8 [T, H, W, 3] (then `fps` is their rate)."""

    source: Source
    fps: float | None = None


@dataclass(frozen=True, eq=False)
class AudioVisual:
    """A clip whose video and audio tracks are both used (WAVE's audio-visual input)."""

    source: Source


Item = str | Text | Audio | Video | AudioVisual

MODALITY_OF: dict[type, str] = {Text: "text", str: "text", Audio: "audio", Video: "video", AudioVisual: "av"}


def modality_of(item: object) -> str | None:
    """'text' | 'audio' | 'video' | 'av', or None for an unsupported item."""
    return MODALITY_OF.get(type(item))
