"""Media generated once per session in a temp dir with numpy, soundfile and PyAV (no ffmpeg binary needed)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from media_factory import pattern_frames, tone, voice, write_encoded_audio, write_mp3_with_cover, write_video


def wav_header(sample_rate: int, channels: int, data_bytes: int, fmt_tag: int = 1, bits: int = 16) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, sample_rate, sample_rate * block, block, bits)
    body_size = 4 + 8 + len(fmt) + 8 + data_bytes
    return (b"RIFF" + struct.pack("<I", min(body_size, 0xFFFFFFFE)) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt))
            + fmt + b"data" + struct.pack("<I", data_bytes))


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    # audio: a 16 kHz mono tone, a 44.1 kHz stereo pair of tones (first channel 300 Hz), noise at 22.05 kHz
    sf.write(d / "tone16k.wav", tone(2.5, 440, 16000), 16000, subtype="PCM_16")
    stereo = np.stack([tone(1.7, 300, 44100), tone(1.7, 2000, 44100)], 1)
    sf.write(d / "stereo44k.wav", stereo, 44100, subtype="PCM_16")
    sf.write(d / "short.wav", tone(0.3, 500, 16000), 16000, subtype="PCM_16")
    sf.write(d / "noise22k.flac", (0.2 * rng.standard_normal(22050 * 3)).astype(np.float32), 22050, subtype="PCM_24")
    sf.write(d / "stereo44k.ogg", stereo, 44100, format="OGG", subtype="VORBIS")
    # Opus codes 48 kHz only (FFmpeg would resample the 44.1 kHz pair the same way)
    write_encoded_audio(d / "stereo44k.opus", np.stack([tone(1.7, 300, 48000), tone(1.7, 2000, 48000)], 1), 48000,
                        "libopus")
    write_encoded_audio(d / "tone.mp3", tone(2.5, 440, 16000), 16000, "libmp3lame")
    sf.write(d / "speech.wav", voice(2.5, 22050), 22050, subtype="PCM_16")
    # video: VP9 (DALI's CPU decoder handles it), H.264 + AAC, a long low-rate clip, a long-GOP clip
    frames = pattern_frames(30, 64, 96)
    write_video(d / "vp9.webm", frames, 10, "libvpx-vp9", gop=8)
    write_video(d / "vp9_gray.webm", pattern_frames(30, 64, 96, gray=True), 10, "libvpx-vp9", gop=8)
    write_video(d / "av.mp4", frames, 10, "libx264", audio=tone(3.0, 440, 44100), audio_rate=44100)
    write_video(d / "silent.mp4", frames, 10, "libx264")
    write_video(d / "long70s.mp4", pattern_frames(70 * 4, 24, 32), 4, "libx264", gop=12, bframes=2)
    write_video(d / "gop25.mp4", pattern_frames(20 * 25, 24, 32), 25, "libx264", gop=25, bframes=3)
    # an MP3 with cover art: a video stream that is not a video
    write_mp3_with_cover(d / "with_cover.mp3", tone(2.5, 440, 16000), 16000, np.full((32, 32, 3), (255, 0, 0), np.uint8))
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
