"""Both tracks of one clip: WAVE's audio-visual input (sampled frames plus the 16 kHz first-channel audio)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wave_rt.media.audio import finish_audio, load_audio_native
from wave_rt.media.errors import MissingStreamError
from wave_rt.media.limits import MediaLimits, resolve
from wave_rt.media.source import MediaSource, as_source
from wave_rt.media.video import VideoClip, _check_pixels, _load_video


@dataclass
class AVClip:
    video: VideoClip
    audio: torch.Tensor  # float32 [samples] at the requested rate, >= 1 s; empty when the clip has no audio
    sample_rate: int = 16000

    @property
    def has_audio(self) -> bool:
        return self.audio.numel() > 0


def load_av(src: MediaSource, fps: float = 2.0, max_frames: int = 128, max_pixels: int = 176400,
            min_pixels: int = 784, sample_rate: int = 16000, *, backend: str = "auto",
            limits: MediaLimits | None = None) -> AVClip:
    """Decode the video frames WAVE samples and the whole audio track of `src`. A file without an audio
    track gives has_audio False (an empty waveform), not an error: the caller decides."""
    _check_pixels(max_pixels, min_pixels)
    lim = resolve(limits)
    source = as_source(src, lim)
    video = _load_video(source, fps, max_frames, backend, lim)
    try:
        samples, native_sr = load_audio_native(source, backend=backend, limits=lim)
    except MissingStreamError:
        return AVClip(video, torch.zeros(0, dtype=torch.float32), sample_rate)
    return AVClip(video, finish_audio(samples[0], native_sr, sample_rate), sample_rate)
