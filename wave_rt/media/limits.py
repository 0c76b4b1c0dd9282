"""Bounds on what one media item may cost. Every decoder checks them while it runs, so a header that lies
(a 10-hour WAV holding one second of data, a 100k x 100k frame size) can never drive an allocation."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class MediaLimits:
    """Per-item limits; `None` disables one. Defaults fit a 24 GiB host decoding a few items at once."""

    max_bytes: int | None = 8 << 30  # size of the encoded file
    max_seconds: float | None = 4 * 3600.0  # decoded duration (audio samples / rate; video stream duration)
    max_frames_decoded: int | None = 200_000  # video frames run through the decoder for one clip
    max_pixels_decoded: int | None = 7680 * 4320  # width * height of one decoded frame (8K)
    max_channels: int | None = 64  # audio channels
    max_sample_rate: int | None = 768_000  # audio sample rate
    # Wall-clock seconds one decode call (video index, video frames, audio track) may run. A corrupt stream can
    # keep FFmpeg busy far longer than the frame budget suggests; this ends it between frames. A decoder that
    # blocks inside one call is ended by the archive job's per-item timeout (a worker process is killed).
    max_decode_seconds: float | None = 60.0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_seconds", "max_frames_decoded", "max_pixels_decoded", "max_channels",
                     "max_sample_rate", "max_decode_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"MediaLimits.{name} must be positive or None, got {value!r}")


DEFAULT_LIMITS = MediaLimits()

# Frames a clip may run through the decoder, as a multiple of the frames its container and stream declare
# (duration x frame rate, or the packet count): seeks re-decode a group of pictures at most once per target,
# so an honest file never needs more than twice its frames; the constant covers tiny clips' reorder delay.
FRAME_BUDGET_FACTOR = 2.0
FRAME_BUDGET_SLACK = 64
# Audio may decode to this multiple of the duration an exact-duration container declares (plus a second).
AUDIO_BUDGET_FACTOR = 1.5


class Deadline:
    """The wall-clock budget of one decode call; `check` raises DecodeTimeoutError once it is spent."""

    __slots__ = ("_end", "_seconds")

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds
        self._end = None if seconds is None else time.monotonic() + seconds

    def check(self, label: object, doing: str) -> None:
        if self._end is not None and time.monotonic() > self._end:
            from wave_rt.media.errors import DecodeTimeoutError

            raise DecodeTimeoutError(
                label, f"{doing} took longer than MediaLimits.max_decode_seconds={self._seconds:g} s")


def resolve(limits: MediaLimits | None) -> MediaLimits:
    return DEFAULT_LIMITS if limits is None else limits
