"""Deferred features (WaveProcessor defer_features + wave_rt.embed.batch_features) against the eager per-item path,
the reference: same token ids, positions, grids and counts before any feature exists; log-mel and fbank within
1e-4, pixel values within 1e-5; the same collated tensors (padded and packed); the same embeddings of a tiny model.
The CPU tests run the deferred path with device=cpu; the gpu-marked test repeats the parity with device=cuda."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from media_factory import pattern_frames, write_video
from tiny_checkpoints import make_tiny_checkpoint

import wave_rt
from wave_rt.config import MediaConfig
from wave_rt.embed.batch_features import featurize_batch
from wave_rt.embed.encoder import WaveEncoder
from wave_rt.media import features_audio as fa
from wave_rt.model.batch import AudioSegmentInputs, ItemInputs, collate, collate_packed

AUDIO_TOL = 1e-4
PIXEL_TOL = 1e-5
EMBED_TOL = 1e-5


def noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * 16000))
    t = np.arange(n) / 16000
    # a tone under noise with a loud burst: quiet mel bands next to loud ones, a real peak for the -8 clamp
    x = 0.05 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t)
    x[n // 3: n // 3 + n // 10] *= 3.0
    return x.astype(np.float32)


def frames(t: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def wave_encoder(tmp_path_factory) -> WaveEncoder:
    enc = WaveEncoder.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("wave"), use_beats=True, seed=4),
                                      device="cpu", dtype=torch.float32)
    # 30 s segments (Whisper's own window) so that a 31 s clip gives two segments, one of them padded to 1 s
    media = dataclasses.replace(MediaConfig(), audio_segment_seconds=30.0)
    enc.config.media = media
    enc.processor.config.media = media
    return enc


@pytest.fixture(scope="module")
def qwen2_audio_encoder(tmp_path_factory) -> WaveEncoder:
    return WaveEncoder.from_pretrained(
        make_tiny_checkpoint(tmp_path_factory.mktemp("q2a"), recipe="last_token", use_beats=False,
                             backbone="qwen2_audio", seed=6), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def av_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media")
    clip = np.stack([pattern_frames(9, 46, 62, seed=s)[0] for s in range(9)])
    write_video(d / "av.mp4", clip, 3, "libx264", audio=noise(3.0, 7), audio_rate=16000)
    sf.write(d / "clip.wav", noise(2.2, 8), 16000)
    return d


def audio_items() -> list:
    return [wave_rt.Audio(noise(s, k), sample_rate=16000) for k, s in enumerate((0.3, 7.1, 31.0))]


def video_items() -> list:
    # sizes that resize differently (one grows to the minimum, one shrinks under max_pixels, two share a decoded
    # size, two decoded sizes share a target size), odd frame counts (temporal padding with the last frame)
    return [wave_rt.Video(frames(5, 50, 70, 1), fps=2.0), wave_rt.Video(frames(4, 50, 70, 2), fps=2.0),
            wave_rt.Video(frames(3, 52, 66, 3), fps=1.0), wave_rt.Video(frames(3, 90, 40, 4), fps=2.0),
            wave_rt.Video(frames(1, 20, 24, 5), fps=2.0), wave_rt.Video(frames(3, 300, 700, 6), fps=2.0),
            wave_rt.Video(frames(2, 2000, 100, 7), fps=2.0)]  # tall and shrinking: Pillow's pass order matters


def assert_same_tokens(eager: ItemInputs, deferred: ItemInputs) -> None:
    assert torch.equal(eager.input_ids, deferred.input_ids)
    assert torch.equal(eager.position_ids, deferred.position_ids)
    assert eager.grid_thw == deferred.grid_thw and eager.second_per_grid == deferred.second_per_grid
    assert [(s.mel_len, s.tokens) for s in eager.audio] == [(s.mel_len, s.tokens) for s in deferred.audio]


def assert_same_features(eager: ItemInputs, done: ItemInputs) -> None:
    assert not done.deferred and done.frames is None
    for e, d in zip(eager.audio, done.audio, strict=True):
        assert d.waveform is None and d.mel.shape == e.mel.shape
        assert (d.mel - e.mel).abs().max().item() <= AUDIO_TOL
        if e.fbank is None:
            assert d.fbank is None
        else:
            assert d.fbank.shape == e.fbank.shape
            assert (d.fbank - e.fbank).abs().max().item() <= AUDIO_TOL
    if eager.pixel_values is None:
        assert done.pixel_values is None
    else:
        assert done.pixel_values.shape == eager.pixel_values.shape
        assert (done.pixel_values - eager.pixel_values).abs().max().item() <= PIXEL_TOL


def assert_batches_equal(a, b) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            y = y.cpu()
            assert x.shape == y.shape and x.dtype == y.dtype, f.name
            if x.is_floating_point():
                assert (x - y).abs().max().item() <= AUDIO_TOL if x.numel() else True, f.name
            else:
                assert torch.equal(x, y), f.name
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), f.name
            assert_batches_equal_dict(x, y)
        else:
            assert x == y, f.name


def assert_batches_equal_dict(x: dict, y: dict) -> None:
    for k in x:
        if isinstance(x[k], torch.Tensor):
            assert x[k].shape == y[k].shape, k
            assert torch.allclose(x[k].float(), y[k].float().cpu(), atol=AUDIO_TOL, rtol=0), k
        else:
            assert x[k] == y[k], k


def check_parity(enc: WaveEncoder, items: list, device: str) -> None:
    eager = [enc.prepare(it, defer_features=False).inputs for it in items]
    deferred = [enc.prepare(it, defer_features=True).inputs for it in items]
    assert all(d.deferred for d in deferred if d.audio or d.grid_thw)
    for e, d in zip(eager, deferred):
        assert_same_tokens(e, d)
    done = featurize_batch(deferred, enc.config, device)
    assert all(d.deferred for d in deferred if d.audio or d.grid_thw), "featurize_batch must not modify its input"
    for e, d in zip(eager, done):
        assert_same_features(e, d)
    if device == "cpu":  # the batched torch video path too (what the GPU runs), not only the native kernel
        for e, d in zip(eager, featurize_batch(deferred, enc.config, device, cpu_native=False)):
            assert_same_features(e, d)
    cfg = enc.config
    stack = cfg.backbone == "qwen2_audio"
    assert_batches_equal(collate(eager, enc.pad_token_id, stack_mel=stack), collate(done, enc.pad_token_id, stack_mel=stack))
    kw = {"audio_token_id": cfg.token_id("audio"), "video_token_id": cfg.token_id("video"), "stack_mel": stack}
    assert_batches_equal(collate_packed(eager, **kw, tower_inputs=enc.model.tower_inputs),
                         collate_packed(done, **kw, tower_inputs=enc.model.tower_inputs))


# ------------------------------------------------------------------------------------------------ features
def test_cpu_default_keeps_the_eager_path(wave_encoder):
    assert wave_encoder.defer_features is False  # a CPU model: numbers stay exactly those of the eager path
    p = wave_encoder.prepare(audio_items()[0])
    assert not p.inputs.deferred and p.inputs.audio[0].mel is not None


def test_audio_parity_odd_lengths_and_segments(wave_encoder):
    items = audio_items()
    deferred = wave_encoder.prepare(items[2], defer_features=True).inputs
    assert [s.waveform.numel() for s in deferred.audio] == [30 * 16000, 16000]  # 31 s: 30 s + 1 s padded to 1 s
    check_parity(wave_encoder, items, "cpu")


def test_video_parity_mixed_sizes(wave_encoder):
    items = video_items()
    deferred = [wave_encoder.prepare(it, defer_features=True).inputs for it in items]
    assert len({d.frame_size for d in deferred}) >= 4 and deferred[0].frame_size == deferred[2].frame_size
    assert all(d.frames.dtype == torch.uint8 for d in deferred)
    check_parity(wave_encoder, items, "cpu")


def test_av_and_mixed_batch_parity(wave_encoder, av_file):
    items = [wave_rt.AudioVisual(str(av_file / "av.mp4")), wave_rt.Audio(str(av_file / "clip.wav")),
             "a text target", *audio_items()[:2], *video_items()[:3]]
    check_parity(wave_encoder, items, "cpu")


def test_qwen2_audio_window_parity(qwen2_audio_encoder):
    # Qwen2-Audio: one zero-padded 30 s window; 31 s is truncated to it
    check_parity(qwen2_audio_encoder, audio_items(), "cpu")


def test_whisper_full_window_rows_batched_with_short_rows(wave_encoder):
    # rows reaching the end of the 300 s window go to their own whisper_log_mel call; the result is unchanged
    lengths = [300 * 16000, 16000 * 4 + 37, 299 * 16000 + 200 * 160]
    assert [fa.whisper_full_chunk(n) for n in lengths] == [True, False, True]
    waves = [torch.from_numpy(noise(n / 16000, k)) for k, n in enumerate(lengths)]
    segs = [AudioSegmentInputs(None, fa.whisper_frames(n), 1, waveform=w) for n, w in zip(lengths, waves)]
    item = ItemInputs(torch.zeros(1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long), True, audio=segs)
    (done,) = featurize_batch([item], wave_encoder.config, "cpu")
    for w, seg in zip(waves, done.audio):
        mel, mask = fa.whisper_log_mel(w)
        assert seg.mel.shape == mel.shape and int(mask.sum()) == seg.mel_len
        assert (seg.mel - mel).abs().max().item() <= AUDIO_TOL
        assert (seg.fbank - fa.beats_fbank(w)).abs().max().item() <= AUDIO_TOL


def test_collate_refuses_deferred_items(wave_encoder):
    deferred = wave_encoder.prepare(audio_items()[0], defer_features=True).inputs
    with pytest.raises(ValueError, match="featurize_batch"):
        collate([deferred], wave_encoder.pad_token_id)


def test_deferred_items_hold_fewer_bytes(wave_encoder):
    """Raw float32 audio against log-mel + fbank (WAVE), uint8 frames at their target size against float patches."""
    def nbytes(it: ItemInputs) -> int:
        ts = [t for s in it.audio for t in (s.mel, s.fbank, s.waveform) if t is not None]
        ts += [t for t in (it.pixel_values, it.frames) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    audio = wave_rt.Audio(noise(10.0, 1), sample_rate=16000)
    video = wave_rt.Video(frames(60, 308, 420, 2), fps=2.0)  # already at its 308x420 target size
    for item, most in ((audio, 0.7), (video, 0.3)):
        eager = nbytes(wave_encoder.prepare(item, defer_features=False).inputs)
        deferred = nbytes(wave_encoder.prepare(item, defer_features=True).inputs)
        assert deferred <= most * eager, (item, deferred, eager)


# ------------------------------------------------------------------------------------------------ embeddings
@pytest.mark.parametrize("packed", [True, False])
def test_embeddings_equal_through_encode(wave_encoder, av_file, packed):
    enc = wave_encoder if packed else WaveEncoder(wave_encoder.model, wave_encoder.processor, packed=False)
    groups = {
        "audio": audio_items(),
        "video": video_items(),
        "av": [wave_rt.AudioVisual(str(av_file / "av.mp4"))],
        "mixed": [wave_rt.AudioVisual(str(av_file / "av.mp4")), "text", *audio_items(), *video_items()[:4]],
    }
    calls = []
    real = enc.stage

    def spy(batch):
        calls.append(any(p.inputs.deferred for p in batch))
        return real(batch)

    enc.stage = spy
    try:
        for name, items in groups.items():
            calls.clear()
            ref = enc.encode(items, gpu_features=False, max_batch_tokens=1 << 20)
            assert calls and not any(calls), name
            calls.clear()
            got = enc.encode(items, gpu_features=True, max_batch_tokens=1 << 20)
            assert calls and all(calls), name  # the deferred path really ran
            assert np.isfinite(got).all()
            assert np.abs(got - ref).max() <= EMBED_TOL, name
    finally:
        del enc.stage


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_parity(tmp_path, av_file):
    enc = WaveEncoder.from_pretrained(make_tiny_checkpoint(tmp_path / "m", use_beats=True, seed=4),
                                      device="cuda", dtype=torch.float32)
    assert enc.defer_features is True  # auto: CUDA defers
    items = [wave_rt.AudioVisual(str(av_file / "av.mp4")), "text", *audio_items(), *video_items()]
    check_parity(enc, items, "cuda")
    done = featurize_batch([enc.prepare(it, defer_features=True).inputs for it in items], enc.config, "cuda")
    assert all(s.mel.is_cuda and s.fbank.is_cuda for it in done for s in it.audio)
    assert all(it.pixel_values.is_cuda for it in done if it.pixel_values is not None)
    ref = enc.encode(items, gpu_features=False, max_batch_tokens=1 << 20)
    got = enc.encode(items, max_batch_tokens=1 << 20)
    # cuFFT and the CPU FFT round differently (features within 1e-4), so the embeddings get the same allowance
    assert np.abs(got - ref).max() <= AUDIO_TOL
