"""Bounds on what one media item may cost. Every decoder checks them while it runs, so a header that lies
(a 10-hour WAV holding one second of data, a 100k x 100k frame size) can never drive an allocation."""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_seconds", "max_frames_decoded", "max_pixels_decoded", "max_channels",
                     "max_sample_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"MediaLimits.{name} must be positive or None, got {value!r}")


DEFAULT_LIMITS = MediaLimits()


def resolve(limits: MediaLimits | None) -> MediaLimits:
    return DEFAULT_LIMITS if limits is None else limits
