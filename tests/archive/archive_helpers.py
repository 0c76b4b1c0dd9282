"""Shared helpers of the archive tests: a generated media archive (numpy, soundfile, PyAV), a fake fast
encoder that satisfies the WaveEncoder contract, and shard readers."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from media_factory import (
    pattern_frames,
    pink_noise,
    square,
    tone,
    voice,
    write_audio,
    write_encoded_audio,
    write_video,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# file -> (expected modality, or None for a bad file that must land in errors.jsonl)
GOOD_MEDIA = {
    "speech/hello.wav": "audio",  # a synthetic voice, 22.05 kHz
    "tones/tone.flac": "audio",
    "tones/noise.ogg": "audio",  # Vorbis
    "tones/deep/beep.wav": "audio",  # nested folder, 8 kHz stereo
    "tones/sine.m4a": "audio",  # AAC in MP4
    "video/clip.mp4": "av",  # H.264 + AAC
    "video/silent.webm": "video",  # VP9, no audio
}
BAD_MEDIA = {
    "bad/broken.mp4": "random bytes",
    "bad/truncated.wav": "header of a longer file",
    "bad/empty.flac": "0 bytes",
    "bad/notaudio.ogg": "text content",
}


def make_media_archive(root: Path) -> Path:
    """A small archive of real files: the formats of the issue plus corrupt and empty ones."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("speech", "tones/deep", "video", "bad", ".hidden"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_audio(root / "speech/hello.wav", voice(1.6, 22050), 22050, subtype="PCM_16")
    write_audio(root / "tones/tone.flac", tone(1.5, 440, 16000), 16000)
    write_audio(root / "tones/noise.ogg", pink_noise(1.2, 44100), 44100, fmt="OGG", subtype="VORBIS")
    beep = square(0.7, 1000, 8000)
    write_audio(root / "tones/deep/beep.wav", np.stack([beep, beep], 1), 8000, subtype="PCM_16")
    write_encoded_audio(root / "tones/sine.m4a", tone(1.3, 330, 44100), 44100, "aac")
    write_video(root / "video/clip.mp4", pattern_frames(20, 120, 160), 10, "libx264", audio=tone(2.0, 500, 44100))
    write_video(root / "video/silent.webm", pattern_frames(16, 96, 128, seed=1), 8, "libvpx-vp9")
    rng = np.random.default_rng(7)
    (root / "bad/broken.mp4").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "bad/truncated.wav").write_bytes((root / "speech/hello.wav").read_bytes()[:300])
    (root / "bad/empty.flac").write_bytes(b"")
    (root / "bad/notaudio.ogg").write_text("this is not an ogg file\n" * 20)
    (root / ".hidden/skip.wav").write_bytes((root / "tones/deep/beep.wav").read_bytes())
    (root / "notes.txt").write_text("not media: ignored by the directory walk\n")
    return root


TEXTS = [
    "a dog barks twice",
    "rain falling on a tin roof",
    "a violin plays a slow melody",
    "a crowd cheers in a stadium",
    "  leading and trailing spaces  ",
    "ünïcödé and emoji 🎵 are fine",
    "a car engine starts and idles",
    "birds singing at dawn",
]


def write_text_manifest(path: Path, media_root: Path | None = None) -> dict[str, Any]:
    """JSONL manifest: text rows (with and without ids), a duplicate id, malformed rows, and (with
    media_root) media rows with a forced modality and a per-row instruction. Returns what to expect."""
    rows: list[Any] = []
    for i, t in enumerate(TEXTS):
        rows.append({"id": f"t{i}", "text": t} if i % 2 == 0 else {"text": t})
    expect_good = {f"t{i}" if i % 2 == 0 else f"text:{i}" for i in range(len(TEXTS))}
    rows.append({"id": "t0", "text": "a duplicate id"})  # duplicate: reported, not embedded
    rows.append({"id": "nothing"})  # neither path nor text
    rows.append({"id": "badmod", "text": "x", "modality": "smell"})
    expect_bad = {"nothing", "badmod"}
    if media_root is not None:
        rows.append({"id": "clip-video-only", "path": str(media_root / "video/clip.mp4"), "modality": "video"})
        rows.append({"id": "speech-steered", "path": str(media_root / "speech/hello.wav"),
                     "instruction": "What is being said?", "text": "caption kept as metadata"})
        rows.append({"id": "missing-file", "path": str(media_root / "no/such/file.wav")})
        expect_good |= {"clip-video-only", "speech-steered"}
        expect_bad |= {"missing-file"}
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.append("{not json")  # a malformed line: reported under its row number
    expect_bad.add(f"row:{len(rows)}")
    lines.insert(2, "   ")  # blank lines are skipped and not numbered
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"good": expect_good, "bad": expect_bad, "duplicates": {"t0"}}


# ---------------------------------------------------------------------------------------------- shards
def read_archive(out_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """id -> row (with the embedding as float32 numpy) over every committed shard; asserts ids are unique."""
    import pyarrow.parquet as pq

    rows: dict[str, dict[str, Any]] = {}
    for p in sorted(Path(out_dir).glob("part-*.parquet")):
        table = pq.read_table(p)
        dim = table.schema.field("embedding").type.list_size
        emb = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        for i, r in enumerate(table.drop(["embedding"]).to_pylist()):
            assert r["id"] not in rows, f"id {r['id']} written twice"
            r["embedding"] = np.asarray(emb[i], dtype=np.float32)
            rows[r["id"]] = r
    return rows


def read_error_ids(out_dir: str | os.PathLike[str]) -> list[str]:
    path = Path(out_dir) / "errors.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- fake encoder
@dataclass
class FakePrepared:
    modality: str
    num_tokens: int
    duration: float | None
    vector: np.ndarray
    poison: bool = False


class FakeEncoder:
    """The WaveEncoder contract with a deterministic hash embedding: fast enough for 100k items on 2 cores.

    oom_above: raise torch.OutOfMemoryError when a batch's padded tokens exceed it (to test splitting).
    fail_on: texts whose forward raises RuntimeError (to test isolation of a poisoned item)."""

    model_id = "fake-encoder"
    fingerprint = "fake0000fake0000"
    dtype = torch.float32
    device = torch.device("cpu")
    default_max_batch_tokens = 512

    def __init__(self, dim: int = 16, oom_above: int | None = None, fail_on: set[str] | None = None,
                 prepare_delay: float = 0.0) -> None:
        self.dim = dim
        self.oom_above = oom_above
        self.fail_on = fail_on or set()
        self.prepare_delay = prepare_delay
        self.calls: list[int] = []  # batch sizes seen by embed_prepared

    def _vector(self, key: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def prepare(self, item: Any, instruction: str | None = None, index: int | None = None) -> FakePrepared:
        from wave_rt.errors import InputError

        if self.prepare_delay:
            import time

            time.sleep(self.prepare_delay)
        if isinstance(item, str):
            if not item.strip():
                raise InputError(item, "empty text")
            return FakePrepared("text", 2 + len(item) // 4, None, self._vector("text|" + item), item in self.fail_on)
        src = os.fspath(item.source)
        modality = {"Audio": "audio", "Video": "video", "AudioVisual": "av"}[type(item).__name__]
        size = os.path.getsize(src)
        return FakePrepared(modality, 8 + size % 50, 1.0, self._vector(f"{modality}|{src}|{instruction}"))

    def embed_prepared(self, batch: list[FakePrepared], normalize: bool = True) -> torch.Tensor:
        padded = len(batch) * max(p.num_tokens for p in batch)
        if self.oom_above is not None and padded > self.oom_above:
            raise torch.OutOfMemoryError("fake CUDA out of memory")
        if any(p.poison for p in batch):
            raise RuntimeError("poisoned item")
        self.calls.append(len(batch))
        return torch.from_numpy(np.stack([p.vector for p in batch]))

    def encode(self, items: list[Any], instruction: str | None = None, **_: Any) -> np.ndarray:
        return self.embed_prepared([self.prepare(i, instruction) for i in items]).numpy()


class CrashingEncoder(FakeEncoder):
    """FakeEncoder whose prepare SIGKILLs its own process on files named *kill* (once per file when
    `once`, using a marker file next to it, so the retry on a fresh worker succeeds) and blocks for an hour
    on files named *block* (a decoder that never returns). Only meant for decode worker processes."""

    def __init__(self, once: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.once = once

    def prepare(self, item: Any, instruction: str | None = None, index: int | None = None) -> FakePrepared:
        import signal
        import time

        if not isinstance(item, str):
            src = os.fspath(item.source)
            name = os.path.basename(src)
            if "kill" in name:
                marker = Path(src + ".killed")
                if not (self.once and marker.exists()):
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
            if "block" in name:
                time.sleep(3600)
        return super().prepare(item, instruction, index)


def write_wavs(root: Path, names: list[str], seconds: float = 0.5) -> list[Path]:
    """Small distinct WAV files (soundfile only: no external tools)."""
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        t = np.arange(int(seconds * 16000)) / 16000
        p = root / name
        sf.write(p, (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 16000, subtype="PCM_16")
        paths.append(p)
    return paths


class UnbuildableSpec:
    """A preparer spec whose worker-side build fails, as a broken install would: the worker exits at start."""

    def build(self) -> Any:
        raise ImportError("simulated: the decoder library cannot be loaded in the worker")


class EnvEncoder(FakeEncoder):
    """FakeEncoder whose prepared items carry the worker's thread-pool environment variables."""

    def prepare(self, item: Any, instruction: str | None = None, index: int | None = None) -> Any:
        from wave_rt.archive.prepare_pool import _SINGLE_THREAD_ENV

        out = super().prepare(item, instruction, index)
        out.env = {k: os.environ.get(k) for k in _SINGLE_THREAD_ENV}
        return out
