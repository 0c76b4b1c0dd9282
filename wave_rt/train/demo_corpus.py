"""The synthetic captioned corpus the bundled demo model is trained on.

Four families, twelve caption classes each; every clip is a fresh random variation (seeded) of its class:
- tones:  a {low|medium|high} {steady tone|beeping sound|chord|rising sweep}        (audio, WAV)
- speech: the word "<w>" spoken, via espeak-ng with a random speed and pitch       (audio, WAV; skipped
          with a logged note when espeak-ng is not installed)
- shapes: a {red|green|blue} {circle|bar} moving to the {left|right}               (video, MP4 without audio;
          a bar is a tall thin rectangle: at 56 x 56 pixels a square and a circle share too many patches)
- av:     a {red|green|blue} circle moving to the {left|right} with a {low|high} tone  (video + audio, MP4)
Variations: pitch (+-6 %), loudness, duration (1.5-2.5 s), start position, size, colour shade, background.
Another seed gives held-out clips of the same classes. Numbers and files depend only on (seed, n_per_class).

manifest.jsonl rows: {"id", "query_path", "query_modality", "target_text", "task"}; task = family.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from wave_rt.archive.moving_shapes import COLOURS, DIRECTIONS, FPS, SHAPES, shape_frames

log = logging.getLogger(__name__)

SR = 16000

PITCH = {"low": 200.0, "medium": 520.0, "high": 1400.0}
SOUNDS = ("steady tone", "beeping sound", "chord", "rising sweep")
WORDS = ("apple", "river", "seven", "window", "music", "yellow", "garden", "rocket", "coffee", "thunder",
         "pencil", "monkey")


def classes(speech: bool = True) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """family -> [(caption, attributes)]."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {
        "tones": [(f"a {p} {s}", {"pitch": p, "sound": s}) for p in PITCH for s in SOUNDS],
        "shapes": [(f"a {c} {sh} moving to the {d}", {"colour": c, "shape": sh, "direction": d})
                   for c in COLOURS for sh in SHAPES for d in DIRECTIONS],
        "av": [(f"a {c} circle moving to the {d} with a {p} tone", {"colour": c, "direction": d, "pitch": p})
               for c in COLOURS for d in DIRECTIONS for p in ("low", "high")],
    }
    if speech:
        out["speech"] = [(f"the word {w} spoken", {"word": w}) for w in WORDS]
    return out


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


# ---------------------------------------------------------------------------------------------- audio
def _env(n: int, fade: int = 160) -> np.ndarray:
    e = np.ones(n)
    r = np.linspace(0, 1, min(fade, n // 2))
    e[: len(r)] = r
    e[n - len(r):] = r[::-1]
    return e


def tone_clip(rng: np.random.Generator, pitch: str, sound: str, seconds: float | None = None) -> np.ndarray:
    f = PITCH[pitch] * rng.uniform(0.94, 1.06)
    seconds = seconds or rng.uniform(1.5, 2.5)
    n = int(SR * seconds)
    t = np.arange(n) / SR
    amp = rng.uniform(0.25, 0.5)
    if sound == "steady tone":
        x = np.sin(2 * np.pi * f * t)
    elif sound == "beeping sound":
        period = rng.uniform(0.25, 0.35)
        x = np.sin(2 * np.pi * f * t) * ((t % period) < period * 0.5)
    elif sound == "chord":
        x = (np.sin(2 * np.pi * f * t) + np.sin(2 * np.pi * f * 1.26 * t) + np.sin(2 * np.pi * f * 1.5 * t)) / 2
    elif sound == "rising sweep":
        k = np.log(2.0) / seconds  # one octave up over the clip
        x = np.sin(2 * np.pi * f * (np.exp(k * t) - 1) / k)
    else:
        raise ValueError(sound)
    x = amp * x * _env(n) + rng.normal(0, 0.003, n)
    return x.astype(np.float32)


def speech_clip(rng: np.random.Generator, word: str, out: Path) -> None:
    speed = int(rng.integers(130, 190))
    pitch = int(rng.integers(25, 75))
    subprocess.run(["espeak-ng", "-s", str(speed), "-p", str(pitch), "-w", str(out), word], check=True,
                   capture_output=True)


def generate_corpus(root: str | Path, seed: int, n_per_class: int, speech: bool | None = None) -> Path:
    """Write the corpus under root (clips/ and manifest.jsonl); returns the manifest path."""
    import soundfile as sf

    from wave_rt.archive.demo_data import write_video

    root = Path(root)
    clips = root / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    if speech is None:
        speech = espeak_available()
        if not speech:
            log.warning("espeak-ng not installed: the spoken-word family is skipped (apt-get install espeak-ng)")
    rng = np.random.default_rng(seed)
    rows = []
    for family, items in classes(speech).items():
        for c, (caption, attrs) in enumerate(items):
            for k in range(n_per_class):
                name = f"{family}-{c:02d}-{k:03d}"
                seconds = float(rng.uniform(1.5, 2.5))
                if family == "tones":
                    path = clips / f"{name}.wav"
                    sf.write(path, tone_clip(rng, attrs["pitch"], attrs["sound"], seconds), SR, subtype="PCM_16")
                    modality = "audio"
                elif family == "speech":
                    path = clips / f"{name}.wav"
                    speech_clip(rng, attrs["word"], path)
                    modality = "audio"
                elif family == "shapes":
                    path = clips / f"{name}.mp4"
                    frames = shape_frames(rng, attrs["colour"], attrs["shape"], attrs["direction"], seconds)
                    write_video(path, frames, FPS, "libx264")
                    modality = "video"
                else:
                    path = clips / f"{name}.mp4"
                    frames = shape_frames(rng, attrs["colour"], "circle", attrs["direction"], seconds)
                    sound = tone_clip(rng, attrs["pitch"], "steady tone", frames.shape[0] / FPS)
                    write_video(path, frames, FPS, "libx264", audio=sound, audio_rate=SR)
                    modality = "av"
                rows.append({"id": name, "query_path": f"clips/{path.name}", "query_modality": modality,
                             "target_text": caption, "task": family})
    manifest = root / "manifest.jsonl"
    tmp = Path(tempfile.mkstemp(dir=root, suffix=".tmp")[1])
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(manifest)
    return manifest
