"""The bundled demo input set behind `wave-rt embed demo`: a few short audio clips (WAV, FLAC, Ogg Vorbis),
two short videos (VP9 WebM without audio; H.264 + AAC MP4), four coloured shapes moving left or right (the
kind of clip the demo model was trained on: `wave-rt search DIR --text "a red circle moving to the left"`
finds video/red_circle_left.mp4 first, ahead of the clips that differ from it in one attribute) and a
handful of captions, listed in one JSONL manifest.

It is synthesized (tones, chirps, noise, moving shapes) on first use with numpy, soundfile and PyAV only
(no ffmpeg binary), into the wave_rt cache directory ($WAVE_RT_CACHE or ~/.cache/wave_rt), atomically
(temp dir + rename); about 200 KB. The decoded samples and frames are the same on every generation
(single-threaded encoders, fixed seeds); container bytes may differ (Ogg and WebM carry random stream ids).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from wave_rt.archive.moving_shapes import FPS as SHAPE_FPS
from wave_rt.archive.moving_shapes import shape_frames

DEMO_DATA_VERSION = 2
MANIFEST = "manifest.jsonl"

CAPTIONS = {
    "text/tone": "a steady pure tone at four hundred and forty hertz",
    "text/chirp": "a whistle sweeping upward in pitch",
    "text/noise": "soft rushing noise like rain on a window",
    "text/beeps": "three short electronic beeps",
    "text/square": "a white square sliding across a dark screen",
    "text/ball": "a red ball bouncing with a beep at every bounce",
}

# name -> (colour, shape, direction, seed): the README's query and three clips one attribute away from it
SHAPE_CLIPS = {
    "red_circle_left": ("red", "circle", "left", 11),
    "red_circle_right": ("red", "circle", "right", 12),
    "blue_circle_left": ("blue", "circle", "left", 13),
    "red_bar_left": ("red", "bar", "left", 14),
}


def _cache_root() -> Path:
    from wave_rt.model.demo import cache_dir

    return cache_dir()


def demo_dir() -> Path:
    """The demo data folder, generated on first use."""
    target = _cache_root() / f"demo-data-v{DEMO_DATA_VERSION}"
    if (target / MANIFEST).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-data-", dir=target.parent))
    try:
        generate(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: use its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def demo_manifest() -> Path:
    return demo_dir() / MANIFEST


# ---------------------------------------------------------------------------------------------- synthesis
def _envelope(n: int, sr: int, fade: float = 0.02) -> np.ndarray:
    k = max(1, int(fade * sr))
    env = np.ones(n)
    ramp = np.linspace(0.0, 1.0, k)
    env[:k] = ramp
    env[-k:] = ramp[::-1]
    return env


def _tone(sr: int = 16000, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.15 * np.sin(2 * np.pi * 880 * t)
    return (x * _envelope(len(t), sr)).astype(np.float32)


def _chirp(sr: int = 22050, seconds: float = 3.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    f0, f1 = 200.0, 4000.0
    k = np.log(f1 / f0) / seconds
    phase = 2 * np.pi * f0 * (np.exp(k * t) - 1) / k
    return (0.5 * np.sin(phase) * _envelope(len(t), sr)).astype(np.float32)


def _noise(sr: int = 44100, seconds: float = 2.5) -> np.ndarray:
    rng = np.random.default_rng(20240601)
    white = rng.standard_normal(int(sr * seconds))
    brown = np.cumsum(white)
    brown -= np.convolve(brown, np.ones(512) / 512, mode="same")  # remove the drift, keep the rumble
    brown /= np.abs(brown).max() + 1e-9
    return (0.4 * brown * _envelope(len(brown), sr)).astype(np.float32)


def _beeps(sr: int = 8000, seconds: float = 1.5) -> np.ndarray:
    n = int(sr * seconds)
    t = np.arange(n) / sr
    x = np.zeros(n)
    for start in (0.1, 0.6, 1.1):
        on = (t >= start) & (t < start + 0.2)
        x[on] = 0.5 * np.sin(2 * np.pi * 1000 * t[on])
    stereo = np.stack([x, 0.5 * x], axis=1)  # two channels: the first is what gets embedded
    return stereo.astype(np.float32)


def _square_frames(n: int, h: int = 120, w: int = 160) -> np.ndarray:
    frames = np.full((n, h, w, 3), 24, np.uint8)
    for i in range(n):
        x = int((w - 40) * i / max(1, n - 1))
        frames[i, 40:80, x:x + 40] = 235
    return frames


def _ball_frames(n: int, fps: int, h: int = 120, w: int = 160) -> tuple[np.ndarray, list[float]]:
    frames = np.full((n, h, w, 3), (30, 60, 90), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    bounces = []
    period = 1.0  # seconds per bounce
    for i in range(n):
        t = i / fps
        phase = (t % period) / period
        cy = 20 + (h - 40) * (1 - 4 * (phase - 0.5) ** 2)  # parabola, floor at phase 0 and 1
        cx = 20 + (w - 40) * (t / (n / fps))
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 12 ** 2
        frames[i][mask] = (220, 40, 40)
    t = 0.0
    while t < n / fps:
        bounces.append(t)
        t += period
    return frames, bounces


def write_video(path: Path, frames: np.ndarray, fps: int, codec: str, audio: np.ndarray | None = None,
                audio_rate: int = 48000, options: dict[str, str] | None = None, rotation: int = 0) -> None:
    """rgb24 frames [n, h, w, 3] as H.264 or VP9 (yuv420p), with an optional mono AAC track; `options`
    adds to or overrides the encoder's defaults (e.g. {"g": "8", "bf": "2"}); `rotation` (counter-clockwise
    degrees) goes into the display matrix, as a phone writes a portrait clip it stored landscape."""
    import av

    with av.open(str(path), "w") as container:
        vs = container.add_stream(codec, rate=fps)
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "yuv420p"
        vs.codec_context.thread_count = 1  # single-threaded encoders give the same bytes every time
        defaults = {"libx264": {"preset": "veryfast", "crf": "28"},
                    "libvpx-vp9": {"crf": "40", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}}
        vs.options = {**defaults.get(codec, {}), **(options or {})}
        if rotation:
            vs.set_display_rotation(rotation)
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=audio_rate)
            astream.layout = "mono"
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = i
            for packet in vs.encode(frame):
                container.mux(packet)
        for packet in vs.encode(None):
            container.mux(packet)
        if astream is not None and audio is not None:
            step = 1024
            for start in range(0, len(audio), step):
                chunk = np.ascontiguousarray(audio[start:start + step], dtype=np.float32)[None, :]
                aframe = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                aframe.sample_rate = audio_rate
                aframe.pts = start
                for packet in astream.encode(aframe):
                    container.mux(packet)
            for packet in astream.encode(None):
                container.mux(packet)


def generate(root: str | os.PathLike[str]) -> Path:
    """Write the demo set under `root` (audio/, video/, manifest.jsonl); returns the manifest path."""
    import soundfile as sf

    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "video").mkdir(parents=True, exist_ok=True)
    sf.write(root / "audio" / "tone_a440.wav", _tone(), 16000, subtype="PCM_16")
    sf.write(root / "audio" / "chirp.flac", _chirp(), 22050, subtype="PCM_16")
    sf.write(root / "audio" / "rain_noise.ogg", _noise(), 44100, format="OGG", subtype="VORBIS")
    sf.write(root / "audio" / "beeps.wav", _beeps(), 8000, subtype="PCM_16")

    fps = 12
    write_video(root / "video" / "square.webm", _square_frames(3 * fps), fps, "libvpx-vp9")
    frames, bounces = _ball_frames(3 * fps, fps)
    rate = 48000
    sound = np.zeros(3 * rate, np.float32)
    for b in bounces:
        s = int(b * rate)
        n = int(0.08 * rate)
        t = np.arange(n) / rate
        sound[s:s + n] += (0.5 * np.sin(2 * np.pi * 880 * t) * np.exp(-t * 30)).astype(np.float32)[: len(sound) - s]
    write_video(root / "video" / "ball.mp4", frames, fps, "libx264", audio=sound, audio_rate=rate)
    for name, (colour, shape, direction, seed) in SHAPE_CLIPS.items():
        clip = shape_frames(np.random.default_rng(seed), colour, shape, direction, seconds=2.0)
        write_video(root / "video" / f"{name}.mp4", clip, SHAPE_FPS, "libx264")

    rows = [{"id": f"audio/{name}", "path": f"audio/{name}"}
            for name in ("tone_a440.wav", "chirp.flac", "rain_noise.ogg", "beeps.wav")]
    videos = ["square.webm", "ball.mp4"] + [f"{name}.mp4" for name in SHAPE_CLIPS]
    rows += [{"id": f"video/{name}", "path": f"video/{name}"} for name in videos]
    rows += [{"id": key, "text": text} for key, text in CAPTIONS.items()]
    manifest = root / MANIFEST
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest
