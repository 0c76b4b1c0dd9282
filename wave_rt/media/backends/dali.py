"""The DALI backend: NVIDIA DALI pipelines (fn.* API) for the codecs DALI decodes.

Video: fn.decoders.video on the "mixed" backend (NVDEC on the GPU: H.264, HEVC, VP8, VP9, AV1, MPEG-4, MJPEG)
when CUDA is present, else on the CPU backend (VP8, VP9, MJPEG only). Frames decoded on the GPU stay there, and
patchify_video / whisper_log_mel then run on the GPU too (torch ops, which reproduce the reference numerics
exactly; DALI's own resize and spectrogram use different filters and would not).
Audio: fn.decoders.audio (CPU only in DALI: WAV, FLAC, OGG Vorbis, OGG Opus).
What DALI cannot decode (H.264 without a GPU, AAC or MP3 audio, other containers) falls back to the CPU
backend with a one-time warning, so backend="dali" never fails on a file PyAV can read.

Frame choice and counting come from the same PyAV demux index as the CPU backend, so both backends pick the
same frames; DALI numbers frames in presentation order, as that index does. Audio samples equal PyAV's (WAV and
FLAC bit for bit, Vorbis/Opus within 1e-7). Pixels do not quite: DALI converts YUV to RGB with bilinear chroma
upsampling and exact BT.601 rounding, FFmpeg's swscale (PyAV, and decord, which WAVE used) repeats chroma and
rounds through 8-bit tables, so colour edges differ and flat areas differ by up to 2 levels. The CPU backend is
the one bit-identical to WAVE's decord pipeline."""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np
import torch

from wave_rt._optional import require
from wave_rt.media.backends.cpu import (
    LINEAR_DECODE_FORMATS,
    VideoIndex,
    check_audio_stream,
    declared_seconds,
    open_container,
)
from wave_rt.media.errors import CorruptMediaError, EmptyMediaError, MediaTooLongError, MissingStreamError
from wave_rt.media.limits import MediaLimits
from wave_rt.media.source import Source

FEATURE = "the DALI media backend (backend='dali')"
CPU_VIDEO_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_VIDEO_CODECS = CPU_VIDEO_CODECS | {"h264", "hevc", "av1", "mpeg4"}
AUDIO_CONTAINERS = frozenset({"wav", "flac", "ogg"})
AUDIO_CODECS_PREFIX = ("pcm_", "flac", "vorbis", "opus")
MAX_BATCH = 8

_local = threading.local()  # DALI pipelines are not thread-safe: one set per thread
_warned: set[str] = set()


def dali() -> Any:
    """Import nvidia.dali or raise MissingDependencyError with the pip command."""
    return require("nvidia.dali", FEATURE)


def video_device() -> str:
    return "mixed" if torch.cuda.is_available() else "cpu"


def _fallback(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"DALI cannot decode {what}; using the CPU (PyAV) backend for it", RuntimeWarning, stacklevel=3)


def _pipelines() -> dict[str, Any]:
    pipes = getattr(_local, "pipes", None)
    if pipes is None:
        pipes = _local.pipes = {}
    return pipes


def _build(kind: str) -> Any:
    """One cached pipeline per thread and kind ('audio' | 'video-cpu' | 'video-mixed')."""
    nd = dali()  # first, so a missing DALI is reported even when pipelines were built before
    pipes = _pipelines()
    if kind in pipes:
        return pipes[kind]
    fn, types = nd.fn, nd.types
    device_id = torch.cuda.current_device() if kind == "video-mixed" else None

    @nd.pipeline_def(batch_size=MAX_BATCH, num_threads=2, device_id=device_id, prefetch_queue_depth=1)
    def audio_pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        samples, rate = fn.decoders.audio(encoded, dtype=types.FLOAT, downmix=False)
        return samples, rate

    @nd.pipeline_def(batch_size=MAX_BATCH, num_threads=2, device_id=device_id, prefetch_queue_depth=1)
    def video_pipe(device: str):
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frame_ids = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, device=device, frames=frame_ids)

    pipe = audio_pipe() if kind == "audio" else video_pipe(kind.split("-", 1)[1])
    pipe.build()
    pipes[kind] = pipe
    return pipe


def _to_torch(tensor: Any) -> torch.Tensor:
    """A DALI output tensor (CPU or GPU) -> torch, without a host round trip for GPU data."""
    from nvidia.dali.backend import TensorGPU

    if isinstance(tensor, TensorGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tensor))


# ------------------------------------------------------------------------------------------------ audio
def dali_can_decode_audio(source: Source, limits: MediaLimits) -> tuple[bool, str]:
    """(supported, what) from the container headers; also bounds DALI's allocation by MediaLimits."""
    with open_container(source) as container:
        if not container.streams.audio:
            raise MissingStreamError(source.label, "no audio stream")
        stream = container.streams.audio[0]
        check_audio_stream(source, stream, limits)
        fmt = container.format.name
        codec = stream.codec_context.name
        declared = declared_seconds(container, stream)
    if fmt not in AUDIO_CONTAINERS or not codec.startswith(AUDIO_CODECS_PREFIX):
        return False, f"{codec} audio in {fmt}"
    # DALI sizes its output from the header's frame count: refuse what the limits refuse before it allocates.
    if limits.max_seconds is not None and declared is not None and declared > limits.max_seconds:
        raise MediaTooLongError(source.label, f"headers declare {declared:.1f} s, above MediaLimits.max_seconds")
    return True, ""


def decode_audio(source: Source, limits: MediaLimits) -> tuple[torch.Tensor, int] | None:
    """First channel at the native rate as [1, samples] float32, or None when DALI cannot decode the file."""
    ok, what = dali_can_decode_audio(source, limits)
    if not ok:
        _fallback(what)
        return None
    results = decode_audio_batch([source])
    return results[0]


def decode_audio_batch(sources: list[Source]) -> list[tuple[torch.Tensor, int]]:
    """Decode up to MAX_BATCH supported files in one pipeline run."""
    pipe = _build("audio")
    out: list[tuple[torch.Tensor, int]] = []
    for s in range(0, len(sources), MAX_BATCH):
        chunk = sources[s: s + MAX_BATCH]
        pipe.feed_input("encoded", [np.frombuffer(src.read_bytes(), dtype=np.uint8) for src in chunk])
        try:
            samples, rates = pipe.run()
        except RuntimeError as exc:
            raise CorruptMediaError(chunk[0].label if len(chunk) == 1 else "<batch>", f"DALI audio decode failed: {exc}") from None
        for i, src in enumerate(chunk):
            arr = np.array(samples[i])
            if arr.size == 0:
                raise EmptyMediaError(src.label, "the audio stream holds no samples")
            first = arr[:, 0] if arr.ndim == 2 else arr
            out.append((torch.from_numpy(np.ascontiguousarray(first, dtype=np.float32))[None], int(np.array(rates[i]))))
    return out


# ------------------------------------------------------------------------------------------------ video
def decode_video(source: Source, index: VideoIndex, frame_ids: np.ndarray,
                 limits: MediaLimits) -> torch.Tensor | None:
    """Frames at `frame_ids` as uint8 [T, H, W, 3] (on the GPU with the mixed backend), or None when DALI
    cannot decode this codec here."""
    device = video_device()
    supported = GPU_VIDEO_CODECS if device == "mixed" else CPU_VIDEO_CODECS
    if index.codec not in supported:
        _fallback(f"{index.codec} video on the {'GPU' if device == 'mixed' else 'CPU'}")
        return None
    if index.container_format in LINEAR_DECODE_FORMATS:
        # DALI's decoder seeks to the frames it is given; in a container without a seek index such seeks can
        # land a group of pictures late (see cpu.LINEAR_DECODE_FORMATS), which the CPU path guards against
        _fallback(f"video in {index.container_format} containers (no seek index)")
        return None
    return decode_video_batch([(source, frame_ids)], device)[0]


def decode_video_batch(items: list[tuple[Source, np.ndarray]], device: str | None = None) -> list[torch.Tensor]:
    """Decode the given frames of up to MAX_BATCH clips per pipeline run."""
    device = device or video_device()
    pipe = _build(f"video-{device}")
    out: list[torch.Tensor] = []
    for s in range(0, len(items), MAX_BATCH):
        chunk = items[s: s + MAX_BATCH]
        pipe.feed_input("encoded", [np.frombuffer(src.read_bytes(), dtype=np.uint8) for src, _ in chunk])
        pipe.feed_input("frames", [np.ascontiguousarray(ids, dtype=np.int32) for _, ids in chunk])
        try:
            (frames,) = pipe.run()
        except RuntimeError as exc:
            raise CorruptMediaError(chunk[0][0].label if len(chunk) == 1 else "<batch>",
                                    f"DALI video decode failed: {exc}") from None
        for i in range(len(chunk)):
            out.append(_to_torch(frames[i]))
    return out
