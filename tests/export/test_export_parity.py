"""ONNX Runtime CPU and AOTInductor CPU behind WaveEncoder.encode() equal the PyTorch path (fp32, <= 1e-4
relative per row) for every modality, text targets and queries, at three shapes per dynamic axis, most of
them not seen when the graphs were traced (the trace used 1.3 s / 2.7 s audio, 4 / 6 frame 56x84 videos)."""

from __future__ import annotations

import numpy as np
import pytest

import wave_rt
from wave_rt.embed.encoder import WaveEncoder

REL = 1e-4


def _audio(seconds: float, seed: int) -> wave_rt.Audio:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wav = 0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return wave_rt.Audio(wav.astype(np.float32), sample_rate=16000)


def _video(frames: int, h: int, w: int, seed: int) -> wave_rt.Video:
    rng = np.random.default_rng(seed)
    return wave_rt.Video(rng.integers(0, 255, (frames, h, w, 3), dtype=np.uint8), fps=2.0)


TEXTS = ["a dog barks", "rain on a tin roof at night, far away thunder", "x"]
QUERIES = [wave_rt.Text("find the sound of rain", side="query"), wave_rt.Text("q", side="query")]
# Batches: (items, batch_size) -> three sizes on the batch axis, three sequence lengths, three chunk /
# segment / patch counts per media stage.
CASES = {
    "audio": ([_audio(0.4, 1)], [_audio(3.9, 2), _audio(1.0, 3)], [_audio(12.2, 4), _audio(2.2, 5), _audio(6.0, 6)]),
    "video": ([_video(2, 56, 56, 1)], [_video(8, 84, 112, 2), _video(3, 56, 84, 3)],
              [_video(5, 112, 84, 4), _video(2, 28, 56, 5), _video(7, 56, 56, 6)]),
    "text": ([TEXTS[0]], [QUERIES[0], TEXTS[1]], TEXTS + QUERIES),
}


@pytest.fixture(scope="module")
def reference(wave_checkpoint) -> WaveEncoder:
    return WaveEncoder.from_pretrained(wave_checkpoint, device="cpu", dtype="fp32")


def _rel_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).max(axis=1) / np.abs(a).max(axis=1)


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
@pytest.mark.parametrize("modality", sorted(CASES))
def test_backend_matches_pytorch(wave_bundle, reference, backend, modality):
    engine = WaveEncoder.from_pretrained(wave_bundle, backend=backend, device="cpu")
    assert engine.dim == reference.dim
    for items in CASES[modality]:
        want = reference.encode(items, normalize=False, batch_size=len(items))
        got = engine.encode(items, normalize=False, batch_size=len(items))
        assert got.shape == want.shape and np.isfinite(got).all()
        assert _rel_rows(want, got).max() <= REL, (modality, backend, len(items), _rel_rows(want, got))


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_mixed_batch_with_instruction(wave_bundle, reference, backend):
    """Media queries with a user instruction and text targets in one encode() call (token-budget batching
    mixes rows of both heads in a batch)."""
    engine = WaveEncoder.from_pretrained(wave_bundle, backend=backend, device="cpu")
    items = [_audio(1.7, 7), TEXTS[1], _video(4, 56, 112, 8), QUERIES[1], TEXTS[2]]
    want = reference.encode(items, instruction="Is anyone speaking?", max_batch_tokens=100000)
    got = engine.encode(items, instruction="Is anyone speaking?", max_batch_tokens=100000)
    assert _rel_rows(want, got).max() <= REL
    # The heads differ, so a wrong use_head routing could not pass the comparison above unnoticed.
    assert not np.allclose(reference.encode(wave_rt.Text("a dog barks", side="query")), reference.encode("a dog barks"))


@pytest.fixture(scope="module")
def av_clips(tmp_path_factory) -> list[wave_rt.AudioVisual]:
    import subprocess

    d = tmp_path_factory.mktemp("av")
    clips = []
    for seconds, size in ((2.5, "64x48"), (4.5, "96x64")):
        path = d / f"av{seconds}.mp4"
        subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"testsrc=size={size}:rate=8:duration={seconds}", "-f", "lavfi", "-i",
                        f"sine=frequency=330:duration={seconds}", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                        "-c:a", "aac", "-shortest", str(path)], check=True)
        clips.append(wave_rt.AudioVisual(str(path)))
    return clips


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_audio_visual_matches_pytorch(wave_bundle, reference, av_clips, backend):
    engine = WaveEncoder.from_pretrained(wave_bundle, backend=backend, device="cpu")
    for items in ([av_clips[0]], av_clips):
        want = reference.encode(items, normalize=False, batch_size=len(items))
        got = engine.encode(items, normalize=False, batch_size=len(items))
        assert _rel_rows(want, got).max() <= REL
