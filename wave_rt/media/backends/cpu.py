"""The CPU backend: FFmpeg through PyAV. Demux once to index a video's frames (no decoding), decode only the
frames that sampling picks (seeking over groups of pictures that hold none), decode audio to float32.

Every loop checks MediaLimits as it goes, so no header value sizes an allocation."""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from wave_rt._optional import require
from wave_rt.media.errors import (
    CorruptMediaError,
    EmptyMediaError,
    MediaError,
    MediaTooLargeError,
    MediaTooLongError,
    MissingStreamError,
    TruncatedMediaError,
    UnsupportedCodecError,
)
from wave_rt.media.limits import (
    AUDIO_BUDGET_FACTOR,
    FRAME_BUDGET_FACTOR,
    FRAME_BUDGET_SLACK,
    Deadline,
    MediaLimits,
)
from wave_rt.media.source import Source

# FFmpeg's video decoder and colour-conversion threads per clip; 0 lets FFmpeg pick (one per core). Worker
# processes that each decode one clip set 1: with a process per core, FFmpeg's threads would only oversubscribe
# the cores.
DECODER_THREADS = 0


def _av() -> Any:
    return require("av", "decoding media with the CPU backend")


def media_error(source: Source, exc: Exception, doing: str) -> MediaError:
    """Map an FFmpeg/PyAV failure to the MediaError subclass that names its cause."""
    av = _av()
    if isinstance(exc, MediaError):
        return exc
    if isinstance(exc, av.error.DecoderNotFoundError):
        return UnsupportedCodecError(source.label, f"no decoder for the stream's codec while {doing}")
    if isinstance(exc, av.error.EOFError):
        return TruncatedMediaError(source.label, f"unexpected end of data while {doing}")
    if isinstance(exc, (av.error.InvalidDataError, av.error.FFmpegError)):
        return CorruptMediaError(source.label, f"{doing} failed: {exc}")
    if isinstance(exc, MemoryError):
        return MediaTooLargeError(source.label, f"out of memory while {doing}")
    return CorruptMediaError(source.label, f"{doing} failed: {type(exc).__name__}: {exc}")


# FFmpeg's default probe reads up to 5 MB and decodes packets to fill in stream parameters: 25 ms for a WAV
# that needs none of it. A small probe suffices for containers with headers; streams it leaves incomplete
# (e.g. MPEG-TS) are reopened with the default probe.
_QUICK_PROBE = {"probesize": "65536"}


def _incomplete(container: Any) -> bool:
    for s in container.streams:
        ctx = s.codec_context
        if ctx is None:
            continue
        if s.type == "audio" and not ctx.sample_rate:
            return True
        if s.type == "video" and not (ctx.width and ctx.height):
            return True
    return False


def _open(source: Source, options: dict[str, str] | None) -> Any:
    av = _av()
    try:
        return av.open(source.open(), mode="r", options=options)
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, av.error.FFmpegError) or not isinstance(exc, OSError):
            raise CorruptMediaError(source.label, f"not a media container FFmpeg can read ({exc})") from None
        raise CorruptMediaError(source.label, f"cannot open: {exc}") from None


@contextlib.contextmanager
def open_container(source: Source) -> Iterator[Any]:
    container = _open(source, _QUICK_PROBE)
    if _incomplete(container):
        container.close()
        container = _open(source, None)
    try:
        yield container
    finally:
        container.close()


def is_cover_art(stream: Any) -> bool:
    """A still picture attached to an audio file (MP3/M4A cover) is a video stream but not a video."""
    av = _av()
    try:
        return bool(stream.disposition & av.stream.Disposition.attached_pic)
    except AttributeError:  # older PyAV
        return False


def video_streams(container: Any) -> list[Any]:
    return [s for s in container.streams.video if not is_cover_art(s)]


# ------------------------------------------------------------------------------------------------ audio
_INT_SCALE = {"s16": 1.0 / 32768.0, "s32": 1.0 / 2147483648.0, "s64": 1.0 / 9223372036854775808.0}


def first_channel_float(frame_array: np.ndarray, fmt: str, planar: bool, channels: int) -> np.ndarray:
    """One decoded PyAV audio frame -> float32 samples of its first channel, FFmpeg's int->float scaling."""
    row = frame_array[0] if planar else frame_array.reshape(-1)[::channels]
    base = fmt.rstrip("p")
    if base in ("flt",):
        return np.array(row, dtype=np.float32, copy=True)
    if base == "dbl":
        return row.astype(np.float32)
    if base == "u8":
        return (row.astype(np.float32) - 128.0) * np.float32(1.0 / 128.0)
    if base in _INT_SCALE:
        return row.astype(np.float32) * np.float32(_INT_SCALE[base])
    raise ValueError(f"unknown sample format {fmt}")


@dataclass
class DecodedAudio:
    samples: np.ndarray  # float32, first channel, native rate
    sample_rate: int
    channels: int
    declared_seconds: float | None  # what the container's headers claim


def check_audio_stream(source: Source, stream: Any, limits: MediaLimits) -> tuple[int, int]:
    ctx = stream.codec_context
    if ctx is None:
        raise UnsupportedCodecError(source.label, "the audio stream's codec has no decoder in FFmpeg")
    sr = int(ctx.sample_rate or 0)
    channels = int(getattr(ctx, "channels", 0) or ctx.layout.nb_channels or 0)
    if sr <= 0:
        raise CorruptMediaError(source.label, f"audio stream declares sample rate {sr}")
    if limits.max_sample_rate is not None and sr > limits.max_sample_rate:
        raise MediaTooLargeError(source.label, f"sample rate {sr} Hz exceeds MediaLimits.max_sample_rate")
    if limits.max_channels is not None and channels > limits.max_channels:
        raise MediaTooLargeError(source.label, f"{channels} audio channels exceed MediaLimits.max_channels")
    return sr, channels


def declared_seconds(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000.0
    return None


def decode_audio(source: Source, limits: MediaLimits) -> DecodedAudio:
    """First audio stream -> float32 first channel at its own rate. Raises MissingStreamError without one."""
    with open_container(source) as container:
        if not container.streams.audio:
            raise MissingStreamError(source.label, "no audio stream")
        stream = container.streams.audio[0]
        sr, channels = check_audio_stream(source, stream, limits)
        declared = declared_seconds(container, stream)
        cap = None if limits.max_seconds is None else int(limits.max_seconds * sr)
        # Decoding past what an exact-duration header declares means the data lies about itself.
        budget = None
        if declared is not None and _exact_duration(container.format.name):
            budget = int((AUDIO_BUDGET_FACTOR * declared + 1.0) * sr)
        deadline = Deadline(limits.max_decode_seconds)
        chunks: list[np.ndarray] = []
        total = 0
        delivered = 0.0  # seconds of stream the demuxer handed over (packet times): what the bytes still held
        packet = None
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and packet.duration and stream.time_base is not None:
                    delivered = max(delivered, float((packet.pts + packet.duration) * stream.time_base))
                for frame in packet.decode():
                    deadline.check(source.label, "decoding audio")
                    if frame.sample_rate and frame.sample_rate != sr:
                        raise CorruptMediaError(source.label, f"sample rate changes mid-stream ({sr} -> {frame.sample_rate} Hz)")
                    fmt = frame.format
                    chunk = first_channel_float(frame.to_ndarray(), fmt.name, fmt.is_planar, frame.layout.nb_channels)
                    total += chunk.shape[0]
                    if cap is not None and total > cap:
                        raise MediaTooLongError(source.label, f"audio is longer than MediaLimits.max_seconds={limits.max_seconds}")
                    if budget is not None and total > budget:
                        raise CorruptMediaError(
                            source.label, f"audio decodes to more than {AUDIO_BUDGET_FACTOR:g}x the {declared:.2f} s "
                                          "its headers declare")
                    chunks.append(chunk)
        except MediaError:
            raise
        except Exception as exc:  # FFmpeg raises many error types mid-stream; each becomes a typed MediaError
            at = getattr(packet, "pos", None)
            if total and declared is not None and total / sr < 0.9 * declared - 0.5 and (
                    at is None or at < 0 or at + getattr(packet, "size", 0) >= source.size - _TAIL_BYTES):
                # The data stops well short of what the headers declare, at the end of the bytes: a cut-off file.
                raise TruncatedMediaError(
                    source.label, f"headers declare {declared:.2f} s of audio but decoding fails after "
                                  f"{total / sr:.2f} s ({exc})") from None
            if at is not None and at >= 0:
                raise CorruptMediaError(source.label, f"decoding audio fails at byte {at} of {source.size}, after "
                                                      f"{total / sr:.2f} s: the data there is damaged ({exc})") from None
            raise media_error(source, exc, "decoding audio") from None
    if total == 0:
        raise EmptyMediaError(source.label, "the audio stream holds no samples")
    samples = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    check_complete(source, container.format.name, total / sr, declared, "audio", delivered=delivered)
    return DecodedAudio(samples, sr, channels, declared)


# A failure this close to the end of the bytes is where a cut-off file ends (its last packet is partial).
_TAIL_BYTES = 4096


# Containers whose headers state the duration exactly (not an estimate from the bitrate, as MP3/ADTS have).
_EXACT_DURATION = ("wav", "mov", "mp4", "matroska", "webm", "flac", "aiff", "w64")


def _exact_duration(container_format: str) -> bool:
    return any(f in container_format.split(",") for f in _EXACT_DURATION)


def check_complete(source: Source, container_format: str, got: float, declared: float | None, what: str,
                   delivered: float | None = None) -> None:
    """A file whose headers promise much more than the decoder delivered was cut off, unless its packets did
    cover the declared time (`delivered`, seconds of packets demuxed) and the decoder dropped them as damaged."""
    if declared is None or not _exact_duration(container_format):
        return
    if got < 0.9 * declared - 0.5:
        if delivered is not None and delivered >= 0.9 * declared - 0.5:
            raise CorruptMediaError(
                source.label, f"its packets cover {delivered:.2f} s of {what}, as the headers declare "
                              f"({declared:.2f} s), but only {got:.2f} s decode: the data is damaged")
        raise TruncatedMediaError(
            source.label, f"headers declare {declared:.2f} s of {what} but only {got:.2f} s could be decoded")


# ------------------------------------------------------------------------------------------------ video
@dataclass
class VideoIndex:
    """Where a video's frames are, from one demux pass (no decoding)."""

    pts: list[int]  # presentation timestamps of every frame, in presentation order
    keyframe_pts: list[int]  # sorted
    time_base: Fraction
    avg_fps: float
    width: int
    height: int
    codec: str
    container_format: str
    declared_seconds: float | None
    # the display matrix's rotation, counter-clockwise degrees in {0, 90, 180, 270} (a phone's portrait clip is
    # stored landscape with 90 or 270): frames are shown, and sampled by WAVE's decord loader, turned by it
    rotation: int = 0

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @property
    def duration(self) -> float:
        """WAVE's clip length: frame count / average frame rate (what decord reports)."""
        return self.num_frames / self.avg_fps

    def frame_budget(self) -> int:
        """Frames the decoder may produce for this clip: a multiple of what the container and stream declare
        (declared duration x frame rate, or the packet count when that is larger) plus a little slack."""
        declared = self.num_frames
        if self.declared_seconds is not None and self.declared_seconds > 0:
            declared = max(declared, math.ceil(self.declared_seconds * self.avg_fps))
        return int(FRAME_BUDGET_FACTOR * declared) + FRAME_BUDGET_SLACK


def check_video_stream(source: Source, stream: Any, limits: MediaLimits) -> None:
    ctx = stream.codec_context
    if ctx is None:
        raise UnsupportedCodecError(source.label, "the video stream's codec has no decoder in FFmpeg")
    w, h = int(ctx.width or 0), int(ctx.height or 0)
    if w <= 0 or h <= 0:
        raise CorruptMediaError(source.label, f"video stream declares frame size {w}x{h}")
    if limits.max_pixels_decoded is not None and w * h > limits.max_pixels_decoded:
        raise MediaTooLargeError(source.label, f"frame size {w}x{h} exceeds MediaLimits.max_pixels_decoded")


def _avg_fps(stream: Any) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return 0.0


def video_index(source: Source, limits: MediaLimits) -> VideoIndex:
    with open_container(source) as container:
        streams = video_streams(container)
        if not streams:
            raise MissingStreamError(source.label, "no video stream")
        stream = streams[0]
        check_video_stream(source, stream, limits)
        fps = _avg_fps(stream)
        if fps <= 0:
            raise CorruptMediaError(source.label, "video stream has no frame rate")
        pts: list[int] = []
        keys: list[int] = []
        rotation: int | None = None
        max_frames = None if limits.max_seconds is None else int(limits.max_seconds * fps) + 1
        deadline = Deadline(limits.max_decode_seconds)
        try:
            for packet in container.demux(stream):
                deadline.check(source.label, "reading video packets")
                if packet.size == 0:  # the flush packet at the end
                    continue
                if packet.pts is None:
                    raise CorruptMediaError(source.label, "video packets carry no timestamps")
                pts.append(int(packet.pts))
                if packet.is_keyframe:
                    keys.append(int(packet.pts))
                if rotation is None:
                    rotation = _first_frame_rotation(packet, len(pts))
                if max_frames is not None and len(pts) > max_frames:
                    raise MediaTooLongError(source.label, f"video is longer than MediaLimits.max_seconds={limits.max_seconds}")
        except MediaError:
            raise
        except Exception as exc:  # FFmpeg's demuxers raise several error types; all become typed MediaErrors
            raise media_error(source, exc, "reading video packets") from None
        index = VideoIndex(
            pts=sorted(pts), keyframe_pts=sorted(keys), time_base=Fraction(stream.time_base), avg_fps=fps,
            width=int(stream.codec_context.width), height=int(stream.codec_context.height),
            codec=stream.codec_context.name, container_format=container.format.name,
            declared_seconds=declared_seconds(container, stream), rotation=rotation or 0)
    if not index.pts:
        raise EmptyMediaError(source.label, "the video stream holds no frames")
    return index


# Packets decoded while indexing until the first frame comes out, for its display matrix (a decoder with frame
# reordering holds a few back); past this the clip is taken as unrotated.
ROTATION_PROBE_PACKETS = 32


def _first_frame_rotation(packet: Any, n: int) -> int | None:
    """The display rotation carried by the first decoded frame (None: no frame out yet, keep feeding packets)."""
    try:
        for frame in packet.decode():
            return int(round(float(getattr(frame, "rotation", 0) or 0) / 90.0)) % 4 * 90
    except Exception:  # noqa: BLE001 - a damaged first packet: decoding proper reports it, with its reason
        return 0
    return None if n < ROTATION_PROBE_PACKETS else 0


# Containers without a seek index: FFmpeg seeks in them by bisecting on timestamps read from the bytes and can land a
# group of pictures (or more) past the target, so their frames are decoded in one forward pass from the start.
LINEAR_DECODE_FORMATS = frozenset({"mpegts", "mpeg", "mpegvideo", "h264", "hevc", "m4v", "mpeg1video", "mpeg2video"})


class _SeekMissed(Exception):
    """A seek did not land where decoding can go on from (past the target, back before frames already decoded,
    or on no frame at all): the clip is decoded again in one forward pass, which needs no seek."""


def decode_video_frames(source: Source, index: VideoIndex, frame_ids: np.ndarray, limits: MediaLimits) -> np.ndarray:
    """Frames at `frame_ids` (presentation order, ascending, repeats allowed) -> uint8 [T, H, W, 3] RGB, as stored
    (before the display rotation, see VideoIndex.rotation).

    Decodes forward and seeks to a target's keyframe only when that skips at least one group of pictures, so a
    dense 2 fps sampling decodes linearly while a sparse one touches only the GOPs it needs. Every seek is
    checked by the first frame it yields; one that misses (MPEG-TS, MP4 edit lists whose seeks restart at the
    first frame, ...) makes the clip decode in one forward pass instead, as ffmpeg does without -ss."""
    deadline = Deadline(limits.max_decode_seconds)
    if index.container_format not in LINEAR_DECODE_FORMATS and len(index.keyframe_pts) > 1:
        try:
            return _decode_frames(source, index, frame_ids, limits, deadline, seek=True)
        except _SeekMissed:
            pass
    return _decode_frames(source, index, frame_ids, limits, deadline, seek=False)


def _decode_frames(source: Source, index: VideoIndex, frame_ids: np.ndarray, limits: MediaLimits,
                   deadline: Deadline, seek: bool) -> np.ndarray:
    wanted = sorted(set(int(i) for i in frame_ids))
    target_pts = [index.pts[i] for i in wanted]
    slots: dict[int, list[int]] = {}
    for j, i in enumerate(frame_ids):
        slots.setdefault(int(i), []).append(j)
    # Filled in place as frames arrive: the clip is held once, at decoded size.
    out = np.empty((len(frame_ids), index.height, index.width, 3), dtype=np.uint8)
    filled = 0
    decoded = 0
    cap = limits.max_frames_decoded
    budget = index.frame_budget()
    keys = index.keyframe_pts
    # One converter for the clip: `frame.to_ndarray(format=...)` builds a new swscale context per frame, and with
    # threads unset each context starts (and joins) a pool of one slice thread per core: ~25 thread starts and
    # context switches per clip that cost a worker process ~20% of its core when all cores are busy (measured).
    from av.video.reformatter import VideoReformatter

    to_rgb = VideoReformatter()
    with open_container(source) as container:
        stream = video_streams(container)[0]
        stream.thread_type = "AUTO"
        if DECODER_THREADS:
            stream.codec_context.thread_count = DECODER_THREADS
        k = 0  # next target (position in target_pts)
        last_pts: int | None = None
        frames = None
        landing: tuple[int, int | None] | None = None  # after a seek: (its target, the last frame before it)
        try:
            while k < len(target_pts):
                key = _keyframe_before(keys, target_pts[k])
                # the first target in the first group of pictures is decoded from the start: nothing to skip
                if seek and (key > keys[0] if frames is None else last_pts is not None and key > last_pts):
                    container.seek(key, stream=stream, backward=True, any_frame=False)
                    frames = container.decode(stream)
                    landing = (target_pts[k], last_pts)
                elif frames is None:
                    frames = container.decode(stream)
                ran_dry = True
                for frame in frames:
                    decoded += 1
                    if cap is not None and decoded > cap:
                        raise MediaTooLargeError(
                            source.label, f"decoding needs more than MediaLimits.max_frames_decoded={cap} frames")
                    if decoded > budget:
                        raise CorruptMediaError(
                            source.label, f"decoding ran through {budget} frames, {FRAME_BUDGET_FACTOR:g}x what the "
                                          f"stream declares ({index.num_frames} packets, "
                                          f"{index.declared_seconds or 0:.2f} s at {index.avg_fps:.3g} fps), "
                                          f"and reached {filled} of the {len(wanted)} frames sampled")
                    deadline.check(source.label, "decoding video")
                    fpts = frame.pts
                    if fpts is None:
                        raise CorruptMediaError(source.label, "decoded frames carry no timestamps")
                    if landing is not None:
                        target, before = landing
                        landing = None
                        if fpts > target or (before is not None and fpts <= before):
                            raise _SeekMissed
                    last_pts = fpts
                    while k < len(target_pts) and fpts >= target_pts[k]:
                        # A frame past its target means the target is never shown (a frame an edit list drops,
                        # a leading frame of an open GOP): the next shown frame stands in, as a player shows it.
                        rgb = to_rgb.reformat(frame, format="rgb24", threads=DECODER_THREADS).to_ndarray()
                        if rgb.shape != out.shape[1:]:
                            raise CorruptMediaError(
                                source.label, f"frame size changes mid-stream ({out.shape[1:3]} -> {rgb.shape[:2]})")
                        out[slots[wanted[k]]] = rgb
                        filled += 1
                        k += 1
                    if k >= len(target_pts) or (seek and _keyframe_before(keys, target_pts[k]) > fpts):
                        ran_dry = False  # done, or the next target lies past another keyframe: seek there
                        break
                if ran_dry and k < len(target_pts):
                    if landing is not None:  # the seek yielded no frame at all
                        raise _SeekMissed
                    raise TruncatedMediaError(
                        source.label, f"the decoder ran out before frame {wanted[k]} of {index.num_frames}")
        except (MediaError, _SeekMissed):
            raise
        except Exception as exc:  # FFmpeg raises many error types mid-stream; each becomes a typed MediaError
            if seek:
                raise _SeekMissed from None  # a seek into a damaged stretch: the forward pass decides
            raise media_error(source, exc, "decoding video") from None
    if filled != len(wanted):
        raise TruncatedMediaError(source.label, f"decoded {filled} of the {len(wanted)} frames sampled")
    return out


def _keyframe_before(keyframe_pts: list[int], pts: int) -> int:
    i = bisect.bisect_right(keyframe_pts, pts) - 1
    return keyframe_pts[max(i, 0)] if keyframe_pts else pts
