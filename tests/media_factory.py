"""Test media made with numpy, soundfile and PyAV only, so the suite needs no ffmpeg, sox or espeak-ng binary.

PyAV's wheels carry their own FFmpeg (libx264, libvpx-vp9, AAC, libopus, libmp3lame, PNG); Ogg Vorbis
comes from libsndfile (soundfile), as PyAV's FFmpeg has no Vorbis encoder. Content is synthetic:
tones, noise, a formant "voice" and moving test patterns, deterministic for a given seed.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf


def tone(seconds: float, freq: float, sr: int, amp: float = 0.4) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def square(seconds: float, freq: float, sr: int, amp: float = 0.2) -> np.ndarray:
    return (amp * np.sign(tone(seconds, freq, sr, 1.0))).astype(np.float32)


def pink_noise(seconds: float, sr: int, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    """1/f noise by shaping white noise's spectrum."""
    n = int(round(seconds * sr))
    spec = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    f = np.arange(spec.shape[0], dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spec / np.sqrt(f), n)
    return (amp * x / (np.abs(x).max() + 1e-12)).astype(np.float32)


def voice(seconds: float, sr: int = 22050, seed: int = 0) -> np.ndarray:
    """A speech-like signal: a gliding glottal pulse train through moving vowel formants, in syllables."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    f0 = 120 + 25 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    source = sum(np.sin(k * phase) / k for k in range(1, 30))
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480)]
    out = np.zeros(n)
    syll = int(0.18 * sr)
    for start in range(0, n, syll):
        seg = slice(start, min(n, start + syll))
        formants = vowels[int(rng.integers(len(vowels)))]
        spec = np.fft.rfft(source[seg])
        freqs = np.fft.rfftfreq(seg.stop - seg.start, 1 / sr)
        gain = sum(np.exp(-0.5 * ((freqs - fc) / 90.0) ** 2) for fc in formants)
        out[seg] = np.fft.irfft(spec * gain, seg.stop - seg.start) * np.hanning(seg.stop - seg.start)
    return (0.5 * out / (np.abs(out).max() + 1e-12)).astype(np.float32)


def pattern_frames(n: int, h: int, w: int, gray: bool = False, seed: int = 0) -> np.ndarray:
    """Moving colour bars and a sliding block (like FFmpeg's testsrc): every frame differs."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, (8, 3)).astype(np.uint8)
    xx = np.arange(w)
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        bars = colours[((xx + 3 * i) * 8 // max(1, w)) % 8]
        frame = np.broadcast_to(bars, (h, w, 3)).copy()
        x0 = (5 * i) % max(1, w - w // 4)
        frame[h // 3: h // 3 + h // 4, x0: x0 + w // 4] = 255 - frame[h // 3: h // 3 + h // 4, x0: x0 + w // 4]
        frames[i] = frame
    if gray:
        frames[:] = frames.mean(axis=3, keepdims=True).astype(np.uint8)
    return frames


def write_audio(path: Path, samples: np.ndarray, rate: int, subtype: str | None = None, fmt: str | None = None) -> None:
    """WAV/FLAC/Ogg Vorbis through libsndfile; samples are [n] or [n, channels] float32."""
    sf.write(path, samples, rate, subtype=subtype, format=fmt)


def _encode_audio(container, stream, samples: np.ndarray, rate: int) -> None:
    import av

    planar = np.ascontiguousarray(samples.T if samples.ndim == 2 else samples[None, :], dtype=np.float32)
    layout = "stereo" if planar.shape[0] == 2 else "mono"
    step = stream.codec_context.frame_size or 1024
    for start in range(0, planar.shape[1], step):
        chunk = planar[:, start:start + step]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_encoded_audio(path: Path, samples: np.ndarray, rate: int, codec: str, bit_rate: int | None = None) -> None:
    """Audio-only file through PyAV's FFmpeg (aac in .m4a, libopus in .opus, libmp3lame in .mp3)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "stereo" if samples.ndim == 2 else "mono"
        if bit_rate:
            stream.bit_rate = bit_rate
        _encode_audio(container, stream, samples, rate)


def write_video(path: Path, frames: np.ndarray, fps: int, codec: str = "libx264", audio: np.ndarray | None = None,
                audio_rate: int = 44100, gop: int | None = None, bframes: int | None = None,
                options: dict[str, str] | None = None, rotation: int = 0) -> None:
    """H.264 / VP9 video (rgb24 frames [n, h, w, 3]), optionally with a mono AAC track."""
    from wave_rt.archive.demo_data import write_video as encode

    options = dict(options or {})
    if gop is not None:
        options["g"] = str(gop)
    if bframes is not None:
        options["bf"] = str(bframes)
    encode(path, frames, fps, codec, audio=audio, audio_rate=audio_rate, options=options, rotation=rotation)


def write_mp3_with_cover(path: Path, samples: np.ndarray, rate: int, cover_rgb: np.ndarray) -> None:
    """An MP3 whose PNG cover picture is an attached-picture 'video' stream (not a video)."""
    import av

    with av.open(str(path), "w") as container:
        audio = container.add_stream("libmp3lame", rate=rate)
        audio.layout = "mono"
        pic = container.add_stream("png", rate=1)
        pic.width, pic.height = cover_rgb.shape[1], cover_rgb.shape[0]
        pic.pix_fmt = "rgb24"
        pic.disposition = av.stream.Disposition.attached_pic
        packets = list(pic.encode(av.VideoFrame.from_ndarray(cover_rgb, format="rgb24"))) + list(pic.encode(None))
        for packet in packets:
            packet.stream = pic
            container.mux(packet)
        _encode_audio(container, audio, samples, rate)
