"""Media: decode audio/video (PyAV on the CPU, DALI on the GPU) and turn it into what the model reads.

Loaders follow WAVE's preprocessing (DESIGN.md section 1): audio 16 kHz mono first channel, >= 1 s, 300 s
segments; video ~2 fps, 1..128 frames spread over the whole clip. Features equal transformers' processors:
Whisper log-mel (Qwen2.5-Omni feature extractor), BEATs Kaldi fbank, Qwen2-VL video patches."""

from __future__ import annotations

from wave_rt.media.audio import audio_segments, load_audio, resample
from wave_rt.media.audiovisual import AVClip, load_av
from wave_rt.media.backends import resolve_backend
from wave_rt.media.errors import (
    CorruptMediaError,
    DecodeTimeoutError,
    EmptyMediaError,
    MediaError,
    MediaTooLargeError,
    MediaTooLongError,
    MissingStreamError,
    TruncatedMediaError,
    UnsupportedCodecError,
    UnsupportedFrameShapeError,
)
from wave_rt.media.features_audio import beats_fbank, whisper_log_mel
from wave_rt.media.features_video import VideoFeatures, patchify_video, smart_resize
from wave_rt.media.limits import MediaLimits
from wave_rt.media.probe import MediaInfo, probe
from wave_rt.media.source import MediaNotFoundError
from wave_rt.media.video import VideoClip, load_video, sample_frame_ids

__all__ = [
    "load_audio", "audio_segments", "resample", "load_video", "VideoClip", "sample_frame_ids", "load_av", "AVClip",
    "probe", "MediaInfo", "whisper_log_mel", "beats_fbank", "patchify_video", "VideoFeatures", "smart_resize",
    "MediaLimits", "resolve_backend", "MediaError", "EmptyMediaError", "CorruptMediaError", "TruncatedMediaError",
    "UnsupportedCodecError", "MissingStreamError", "MediaTooLongError", "MediaTooLargeError", "MediaNotFoundError",
    "UnsupportedFrameShapeError",
    "DecodeTimeoutError",
]
