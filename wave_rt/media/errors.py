"""Why a media file could not be used: one MediaError subclass per cause, each naming the file and the reason.

The base class lives in wave_rt.errors so that code above media (the processor, the archive job) can catch
every media failure without importing the decoders."""

from __future__ import annotations

from wave_rt.errors import MediaError

__all__ = [
    "MediaError",
    "EmptyMediaError",
    "CorruptMediaError",
    "TruncatedMediaError",
    "UnsupportedCodecError",
    "MissingStreamError",
    "MediaTooLongError",
    "MediaTooLargeError",
    "UnsupportedFrameShapeError",
    "DecodeTimeoutError",
]


class EmptyMediaError(MediaError):
    """The file has no bytes, or its streams hold no decodable sample or frame."""


class CorruptMediaError(MediaError):
    """The bytes are not a container any demuxer recognizes, or the decoder rejects the data."""


class TruncatedMediaError(MediaError):
    """The container is recognizable but ends before the data its headers declare."""


class UnsupportedCodecError(MediaError):
    """The stream's codec has no decoder in the chosen backend."""


class MissingStreamError(MediaError):
    """The file has no stream of the kind asked for (e.g. load_video on an audio-only file)."""


class MediaTooLongError(MediaError):
    """The media lasts longer than MediaLimits.max_seconds (checked while decoding, never trusted from headers)."""


class MediaTooLargeError(MediaError):
    """The file or its decoded frames exceed a size limit of MediaLimits."""


class UnsupportedFrameShapeError(MediaError):
    """The video decodes, but its frames are narrower than the model's video processor accepts (an aspect
    ratio over 200:1, the limit of Qwen2-VL's smart_resize)."""


class DecodeTimeoutError(MediaError):
    """Decoding one item ran past its wall-clock budget (MediaLimits.max_decode_seconds, or the archive job's
    per-item timeout): a corrupt stream that keeps the decoder busy, or a decoder that blocks."""
