"""Media generated once per session in a temp dir with ffmpeg / espeak-ng / numpy + soundfile."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", *args], check=True)


def tone(seconds: float, freq: float, sr: int, amp: float = 0.4) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_header(sample_rate: int, channels: int, data_bytes: int, fmt_tag: int = 1, bits: int = 16) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, sample_rate, sample_rate * block, block, bits)
    body_size = 4 + 8 + len(fmt) + 8 + data_bytes
    return (b"RIFF" + struct.pack("<I", min(body_size, 0xFFFFFFFE)) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt))
            + fmt + b"data" + struct.pack("<I", data_bytes))


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Path:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    # audio: a 16 kHz mono tone, a 44.1 kHz stereo pair of tones (first channel 300 Hz), noise at 22.05 kHz
    sf.write(d / "tone16k.wav", tone(2.5, 440, 16000), 16000, subtype="PCM_16")
    sf.write(d / "stereo44k.wav", np.stack([tone(1.7, 300, 44100), tone(1.7, 2000, 44100)], 1), 44100, subtype="PCM_16")
    sf.write(d / "short.wav", tone(0.3, 500, 16000), 16000, subtype="PCM_16")
    sf.write(d / "noise22k.flac", (0.2 * rng.standard_normal(22050 * 3)).astype(np.float32), 22050, subtype="PCM_24")
    ffmpeg("-i", str(d / "stereo44k.wav"), "-c:a", "libvorbis", str(d / "stereo44k.ogg"))
    ffmpeg("-i", str(d / "stereo44k.wav"), "-c:a", "libopus", str(d / "stereo44k.opus"))
    ffmpeg("-i", str(d / "tone16k.wav"), "-c:a", "libmp3lame", str(d / "tone.mp3"))
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(d / "speech.wav"), "the quick brown fox jumps over the lazy dog"],
                       check=True, capture_output=True)
    # video: VP9 (DALI's CPU decoder handles it), H.264 + AAC, a long low-rate clip, a long-GOP clip
    src = ["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=10:duration=3"]
    ffmpeg(*src, "-c:v", "libvpx-vp9", "-g", "8", str(d / "vp9.webm"))
    ffmpeg(*src, "-vf", "hue=s=0", "-c:v", "libvpx-vp9", "-g", "8", str(d / "vp9_gray.webm"))
    ffmpeg(*src, "-f", "lavfi", "-i", "sine=frequency=440:duration=3:sample_rate=44100", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(d / "av.mp4"))
    ffmpeg(*src, "-c:v", "libx264", "-pix_fmt", "yuv420p", str(d / "silent.mp4"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=32x24:rate=4:duration=70", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-g", "12", "-bf", "2", str(d / "long70s.mp4"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=32x24:rate=25:duration=20", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-g", "25", "-bf", "3", str(d / "gop25.mp4"))
    # an MP3 with cover art: a video stream that is not a video
    ffmpeg("-f", "lavfi", "-i", "color=c=red:size=32x32:duration=1", "-frames:v", "1", str(d / "cover.png"))
    ffmpeg("-i", str(d / "tone.mp3"), "-i", str(d / "cover.png"), "-map", "0:a", "-map", "1:v", "-c:a", "copy",
           "-c:v", "png", "-disposition:v", "attached_pic", str(d / "with_cover.mp3"))
    # broken inputs
    (d / "empty.wav").write_bytes(b"")
    (d / "random.mp4").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    full = (d / "av.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(full[: len(full) * 2 // 3])
    one_second = (tone(1.0, 440, 16000) * 0).astype(np.int16).tobytes()
    ten_hours = 10 * 3600 * 16000 * 2
    (d / "ten_hours_header.wav").write_bytes(wav_header(16000, 1, ten_hours) + one_second)
    (d / "unknown_codec.wav").write_bytes(wav_header(16000, 1, len(one_second), fmt_tag=0x1234) + one_second)
    return d
