"""What a media file holds, from its headers only (no decoding): the archive job uses it to pick a modality
(a video file with an audio track is audio-visual)."""

from __future__ import annotations

from dataclasses import dataclass, field

from wave_rt.media.backends.cpu import declared_seconds, open_container, video_streams
from wave_rt.media.limits import MediaLimits, resolve
from wave_rt.media.source import MediaSource, as_source


@dataclass(frozen=True)
class MediaInfo:
    container: str  # FFmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2" or "wav"
    duration: float | None  # seconds, as the headers declare it (None when they do not)
    has_audio: bool
    has_video: bool  # a real video stream: cover art attached to an audio file does not count
    codecs: dict[str, str] = field(default_factory=dict)  # {"audio": "aac", "video": "h264"} for the first streams
    width: int | None = None
    height: int | None = None
    fps: float | None = None  # average frame rate
    sample_rate: int | None = None
    channels: int | None = None
    size_bytes: int = 0

    @property
    def modality(self) -> str:
        """'av' for video with sound, 'video' for silent video, 'audio' for sound only."""
        if self.has_video:
            return "av" if self.has_audio else "video"
        return "audio"


def probe(src: MediaSource, limits: MediaLimits | None = None) -> MediaInfo:
    """Read the container headers of `src` (path or bytes). Raises the MediaError subclass naming why it cannot."""
    source = as_source(src, resolve(limits))
    with open_container(source) as container:
        videos = video_streams(container)
        audios = list(container.streams.audio)
        codecs: dict[str, str] = {}
        info: dict[str, object] = {}
        durations = []
        if videos:
            v = videos[0]
            ctx = v.codec_context
            codecs["video"] = ctx.name if ctx is not None else "unknown"
            if ctx is not None:
                info["width"], info["height"] = int(ctx.width), int(ctx.height)
            rate = v.average_rate or v.guessed_rate
            info["fps"] = float(rate) if rate else None
            durations.append(declared_seconds(container, v))
        if audios:
            a = audios[0]
            ctx = a.codec_context
            codecs["audio"] = ctx.name if ctx is not None else "unknown"
            if ctx is not None:
                info["sample_rate"] = int(ctx.sample_rate)
                info["channels"] = int(ctx.layout.nb_channels)
            durations.append(declared_seconds(container, a))
        known = [d for d in durations if d is not None]
        duration = max(known) if known else (container.duration / 1_000_000.0 if container.duration else None)
        return MediaInfo(container=container.format.name, duration=duration, has_audio=bool(audios),
                         has_video=bool(videos), codecs=codecs, size_bytes=source.size, **info)  # type: ignore[arg-type]
