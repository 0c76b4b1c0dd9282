"""Mutation fuzzing of the media loaders: small valid files (made here with soundfile and PyAV, no ffmpeg CLI)
mutated with a seeded generator, each run through the loaders that apply. Every run must end in a result or
a typed MediaError; anything else (an untyped exception) is a finding. Shared by tests/media/test_media_fuzz.py
(a few hundred inputs) and `python bench/bench_media.py --fuzz 10000`."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf

from wave_rt.errors import MediaError
from wave_rt.media import MediaLimits, load_audio, load_av, load_video

# Tight enough that a stuck decode ends well inside the 10 s each input is allowed.
FUZZ_LIMITS = MediaLimits(max_decode_seconds=5.0, max_seconds=60.0)


def _tone(seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = np.stack([0.3 * np.sin(2 * np.pi * (300 + 200 * c) * t) for c in range(channels)], 1)
    return x.astype(np.float32)


def _sf_bytes(fmt: str, subtype: str | None, sr: int = 16000, channels: int = 1, seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, _tone(seconds, sr, channels), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _av_bytes(container: str, vcodec: str, acodec: str | None, seconds: float = 1.0, fps: int = 10,
              size: tuple[int, int] = (64, 48), gop: int = 5) -> bytes:
    import av

    buf = io.BytesIO()
    out = av.open(buf, mode="w", format=container)
    vs = out.add_stream(vcodec, rate=fps)
    vs.width, vs.height = size
    vs.pix_fmt = "yuv420p"
    vs.options = {"g": str(gop)}
    a_sr = 48000
    as_ = out.add_stream(acodec, rate=a_sr) if acodec else None
    if as_ is not None:
        as_.layout = "mono"
    rng = np.random.default_rng(1)
    n = int(seconds * fps)
    w, h = size
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for i in range(n):
        img = np.roll(base, 3 * i, axis=1)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = i
        for p in vs.encode(frame):
            out.mux(p)
    for p in vs.encode():
        out.mux(p)
    if as_ is not None:
        pcm = _tone(seconds, a_sr)[:, 0]
        step = as_.codec_context.frame_size or 1024
        for k in range(0, len(pcm), step):
            chunk = pcm[k: k + step]
            if len(chunk) < step:
                chunk = np.pad(chunk, (0, step - len(chunk)))
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = a_sr
            frame.pts = k
            for p in as_.encode(frame):
                out.mux(p)
        for p in as_.encode():
            out.mux(p)
    out.close()
    return buf.getvalue()


def seed_media() -> dict[str, bytes]:
    """One small valid file per format the loaders must survive mutations of."""
    return {
        "wav": _sf_bytes("WAV", "PCM_16"),
        "flac": _sf_bytes("FLAC", "PCM_16", sr=22050),
        "ogg": _sf_bytes("OGG", "VORBIS", sr=22050, channels=2),
        "mp3": _sf_bytes("MP3", "MPEG_LAYER_III", sr=22050),
        "mp4": _av_bytes("mp4", "libx264", "aac"),
        "webm": _av_bytes("webm", "libvpx-vp9", "libopus"),
    }


LOADERS: dict[str, Callable[[bytes], object]] = {
    "load_audio": lambda b: load_audio(b, backend="cpu", limits=FUZZ_LIMITS),
    "load_video": lambda b: load_video(b, backend="cpu", limits=FUZZ_LIMITS),
    "load_av": lambda b: load_av(b, backend="cpu", limits=FUZZ_LIMITS),
}
VIDEO_FORMATS = ("mp4", "webm")


def loaders_for(fmt: str) -> list[str]:
    return ["load_audio", "load_video", "load_av"] if fmt in VIDEO_FORMATS else ["load_audio"]


# ---------------------------------------------------------------------------------------------- mutations
def _span(rng: np.random.Generator, n: int, max_len: int) -> tuple[int, int]:
    length = int(rng.integers(1, max(2, min(max_len, n // 2) + 1)))
    start = int(rng.integers(0, max(1, n - length)))
    return start, length


def bit_flips(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 17))):
        i = int(rng.integers(0, len(b)))
        b[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(1, len(data)))]


def swap_chunks(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    n = len(b)
    length = int(rng.integers(1, max(2, n // 4)))
    i, j = sorted(int(x) for x in rng.integers(0, n - length, 2))
    if j - i < length:
        j = min(n - length, i + length)
    a, c = bytes(b[i: i + length]), bytes(b[j: j + length])
    b[i: i + length], b[j: j + length] = c, a
    return bytes(b)


def header_garbage(data: bytes, rng: np.random.Generator) -> bytes:
    start = int(rng.integers(0, min(256, len(data))))
    length = int(rng.integers(1, 33))
    garbage = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    return data[:start] + garbage + data[start + length:]


def zero_range(data: bytes, rng: np.random.Generator) -> bytes:
    start, length = _span(rng, len(data), 4096)
    return data[:start] + bytes(length) + data[start + length:]


def duplicate_range(data: bytes, rng: np.random.Generator) -> bytes:
    start, length = _span(rng, len(data), 4096)
    at = int(rng.integers(0, len(data)))
    return data[:at] + data[start: start + length] + data[at:]


MUTATIONS: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    "bit_flips": bit_flips, "truncate": truncate, "swap_chunks": swap_chunks, "header_garbage": header_garbage,
    "zero_range": zero_range, "duplicate_range": duplicate_range,
}


@dataclass
class FuzzCase:
    index: int
    fmt: str
    mutation: str
    data: bytes


def cases(n: int, seed: int = 0, seeds: dict[str, bytes] | None = None) -> Iterator[FuzzCase]:
    """n mutated inputs, formats and mutations in rotation, contents from one seeded generator."""
    seeds = seeds if seeds is not None else seed_media()
    fmts = sorted(seeds)
    names = sorted(MUTATIONS)
    rng = np.random.default_rng(seed)
    for i in range(n):
        fmt = fmts[i % len(fmts)]
        name = names[(i // len(fmts)) % len(names)]
        yield FuzzCase(i, fmt, name, MUTATIONS[name](seeds[fmt], rng))


@dataclass
class FuzzReport:
    runs: int = 0
    results: int = 0
    media_errors: dict[str, int] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)  # untyped exceptions: each one a bug
    max_seconds: float = 0.0
    slowest: str = ""


def run_case(case: FuzzCase, report: FuzzReport) -> None:
    for name in loaders_for(case.fmt):
        t0 = time.perf_counter()
        try:
            LOADERS[name](case.data)
            report.results += 1
        except MediaError as exc:
            kind = type(exc).__name__
            report.media_errors[kind] = report.media_errors.get(kind, 0) + 1
        except Exception as exc:  # noqa: BLE001 - the point: record anything untyped as a finding
            report.findings.append(f"case {case.index} ({case.fmt}, {case.mutation}) {name}: "
                                   f"{type(exc).__name__}: {exc}")
        dt = time.perf_counter() - t0
        report.runs += 1
        if dt > report.max_seconds:
            report.max_seconds, report.slowest = dt, f"case {case.index} ({case.fmt}, {case.mutation}) {name}"
