"""Video loading as WAVE samples it: about `fps` frames per second spread uniformly over the whole clip,
at least one frame and at most `max_frames` (so clips longer than max_frames / fps seconds are sampled
more sparsely), frames returned at their decoded size as uint8 RGB."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wave_rt.media.backends import resolve_backend
from wave_rt.media.errors import UnsupportedFrameShapeError
from wave_rt.media.features_video import MAX_ASPECT_RATIO
from wave_rt.media.limits import MediaLimits, resolve
from wave_rt.media.source import MediaSource, Source, as_source


@dataclass
class VideoClip:
    frames: torch.Tensor  # uint8 [T, H, W, 3] RGB at the decoded size, turned upright as the stream's display
    # matrix says (on the GPU when DALI decoded it there)
    timestamps: torch.Tensor  # float64 [T] seconds from the first frame
    fps: float  # effective sampling rate T / duration: what WAVE divides temporal_patch_size by
    duration: float  # frame count / average frame rate, as decord reports it


def sample_frame_ids(num_frames: int, avg_fps: float, fps: float = 2.0, max_frames: int = 128) -> np.ndarray:
    """WAVE's frame choice: round(duration * fps) frames (clamped to [1, max_frames]) at
    np.linspace(0, num_frames - 1, n) truncated to int. Indices may repeat when the video has fewer frames."""
    if num_frames <= 0:
        raise ValueError("a video needs at least one frame")
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"fps must be positive and max_frames >= 1, got fps={fps}, max_frames={max_frames}")
    duration = num_frames / avg_fps
    interval = 1.0 / fps
    target = min(max(round(duration / interval), 1), max_frames)
    return np.linspace(0, num_frames - 1, target, dtype=int)


def _check_pixels(max_pixels: int, min_pixels: int) -> None:
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")


def load_video(src: MediaSource, fps: float = 2.0, max_frames: int = 128, max_pixels: int = 176400,
               min_pixels: int = 784, *, backend: str = "auto", limits: MediaLimits | None = None) -> VideoClip:
    """Decode the frames WAVE samples from `src` (path or encoded bytes).

    `max_pixels`/`min_pixels` are checked here and applied by patchify_video, which resizes; frames stay at
    their decoded size so other consumers get the original pixels."""
    _check_pixels(max_pixels, min_pixels)
    lim = resolve(limits)
    return _load_video(as_source(src, lim), fps, max_frames, backend, lim)


def _load_video(source: Source, fps: float, max_frames: int, backend: str, lim: MediaLimits) -> VideoClip:
    from wave_rt.media.backends.cpu import decode_video_frames, video_index

    index = video_index(source, lim)
    if max(index.width, index.height) > MAX_ASPECT_RATIO * min(index.width, index.height):
        raise UnsupportedFrameShapeError(source.label, f"frames of {index.width}x{index.height} pixels: the video "
                                         f"processor takes aspect ratios up to {MAX_ASPECT_RATIO}:1")
    ids = sample_frame_ids(index.num_frames, index.avg_fps, fps, max_frames)
    frames = None
    if resolve_backend(backend) == "dali":
        from wave_rt.media.backends import dali

        frames = dali.decode_video(source, index, ids, lim)
    if frames is None:
        frames = torch.from_numpy(decode_video_frames(source, index, ids, lim))
    if index.rotation:  # turned as the display matrix says, as players, ffmpeg and decord show the clip
        frames = torch.rot90(frames, index.rotation // 90, dims=(1, 2)).contiguous()
    t0 = index.pts[0]
    timestamps = torch.tensor([float((index.pts[i] - t0) * index.time_base) for i in ids], dtype=torch.float64)
    duration = index.duration
    return VideoClip(frames=frames, timestamps=timestamps, fps=len(ids) / duration, duration=duration)
