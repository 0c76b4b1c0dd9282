"""Loaders: WAVE's audio conventions (first channel, 16 kHz, >= 1 s, 300 s pieces), WAVE's frame sampling
(decord-style frame count and np.linspace), the seeking decoder against a plain sequential decode, probe."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch

from wave_rt.media import audio_segments, load_audio, load_av, load_video, probe, resample, sample_frame_ids


def sine(seconds: float, freq: float, sr: int, amp: float = 0.4) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(round(seconds * sr))) / sr)


def decode_all(path) -> tuple[np.ndarray, float]:
    """Every frame in presentation order, decoded front to back (what decord's index addresses)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = sorted(((f.pts, f.to_ndarray(format="rgb24")) for f in c.decode(s)), key=lambda p: p[0])
        return np.stack([f for _, f in frames]), float(s.average_rate)


# ------------------------------------------------------------------------------------------------ audio
def resample_reference(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Direct float64 evaluation of the Hann-windowed sinc interpolator (6 zero crossings, rolloff 0.99)."""
    cut = 0.99 * min(orig, new) / orig  # cutoff in cycles per input sample * 2
    n_out = math.ceil(len(x) * new / orig)
    out = np.zeros(n_out)
    k = np.arange(len(x))
    for n in range(n_out):
        u = (k - n * orig / new) * cut
        inside = np.abs(u) <= 6
        h = np.where(inside, np.sinc(u) * np.cos(np.pi * u / 12) ** 2, 0.0) * cut
        out[n] = x @ h
    return out


@pytest.mark.parametrize("orig,new", [(44100, 16000), (22050, 16000), (8000, 16000), (48000, 16000)])
def test_resample_matches_float64_reference(orig, new):
    x = np.random.default_rng(orig).standard_normal(orig // 20)
    got = resample(torch.from_numpy(x), orig, new).numpy()
    want = resample_reference(x, orig, new)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    got32 = resample(torch.from_numpy(x).float(), orig, new)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), want, rtol=0, atol=2e-5)


def test_resample_keeps_a_tone_and_batches():
    x = torch.from_numpy(sine(1.0, 1000.0, 44100))
    y = resample(x, 44100, 16000)
    want = sine(1.0, 1000.0, 16000)
    np.testing.assert_allclose(y.numpy()[200:-200], want[200:-200], atol=2e-3)
    both = resample(torch.stack([x, 2 * x]), 44100, 16000)
    torch.testing.assert_close(both[1], 2 * y)
    assert resample(x, 16000, 16000) is x


def test_load_audio_first_channel_resampled(media):
    wav = load_audio(str(media / "stereo44k.wav"))
    assert wav.dtype == torch.float32 and wav.ndim == 1
    assert wav.shape[0] == math.ceil(1.7 * 44100 * 16000 / 44100)
    want = sine(1.7, 300.0, 16000)  # the first channel's tone, not the second's 2 kHz
    np.testing.assert_allclose(wav.numpy()[400:-400], want[400:-400], atol=3e-3)


def test_load_audio_pads_to_one_second_and_accepts_bytes(media):
    wav = load_audio(str(media / "short.wav"))
    assert wav.shape == (16000,)
    assert torch.count_nonzero(wav[4800:]) == 0 and torch.count_nonzero(wav[:4800]) > 4000
    from_bytes = load_audio((media / "short.wav").read_bytes())
    assert torch.equal(wav, from_bytes)


@pytest.mark.parametrize("name", ["tone16k.wav", "tone.mp3", "stereo44k.ogg", "stereo44k.opus", "noise22k.flac", "av.mp4"])
def test_load_audio_formats(media, name):
    wav = load_audio(str(media / name))
    info = probe(str(media / name))
    assert wav.dtype == torch.float32 and torch.isfinite(wav).all()
    assert abs(wav.shape[0] / 16000 - info.duration) < 0.1
    assert 0.05 < wav.abs().max() <= 1.0


def test_audio_segments_follow_wave():
    wav = torch.ones(16000 * 600 + 8000)
    pieces = audio_segments(wav, 16000, 300.0)
    assert [p.shape[0] for p in pieces] == [4_800_000, 4_800_000, 16000]
    assert pieces[2][:8000].eq(1).all() and pieces[2][8000:].eq(0).all()
    assert [p.shape[0] for p in audio_segments(torch.ones(16000 * 300), 16000)] == [4_800_000]
    assert audio_segments(torch.zeros(0)) == []
    with pytest.raises(ValueError):
        audio_segments(torch.zeros(2, 10))


# ------------------------------------------------------------------------------------------------ video
def test_sample_frame_ids_is_wave_formula():
    # 3 s at 10 fps: round(3 / 0.5) = 6 frames spread over 0..29
    assert sample_frame_ids(30, 10.0).tolist() == [0, 5, 11, 17, 23, 29]
    # 70 s: capped at 128 frames, uniform over the whole clip
    ids = sample_frame_ids(280, 4.0)
    assert len(ids) == 128 and ids[0] == 0 and ids[-1] == 279
    # a very short clip still gives one frame; a low-rate clip repeats frames like decord's get_batch would
    assert sample_frame_ids(1, 25.0).tolist() == [0]
    assert sample_frame_ids(3, 1.0, fps=2.0).tolist() == [0, 0, 0, 1, 1, 2]  # linspace(0, 2, 6) truncated


@pytest.mark.parametrize("name", ["vp9.webm", "silent.mp4", "long70s.mp4", "gop25.mp4"])
def test_load_video_frames_equal_sequential_decode(media, name):
    everything, avg_fps = decode_all(media / name)
    clip = load_video(str(media / name))
    ids = sample_frame_ids(len(everything), avg_fps)
    assert clip.frames.dtype == torch.uint8 and clip.frames.shape == (len(ids), *everything.shape[1:])
    np.testing.assert_array_equal(clip.frames.numpy(), everything[ids])
    assert clip.duration == pytest.approx(len(everything) / avg_fps)
    assert clip.fps == pytest.approx(len(ids) / clip.duration)
    np.testing.assert_allclose(clip.timestamps.numpy(), ids / avg_fps, atol=1e-6)


@pytest.mark.parametrize("name", ["vp9.webm", "av.mp4", "long70s.mp4", "gop25.mp4"])
def test_load_video_equals_wave_decord_pipeline(media, name):
    """WAVE's reference loader (decord VideoReader, round(len/0.5) frames, np.linspace, len/duration fps)."""
    decord = pytest.importorskip("decord")
    vr = decord.VideoReader(str(media / name), num_threads=1)
    total, length = len(vr), len(vr) / vr.get_avg_fps()
    idx = np.linspace(0, total - 1, min(max(round(length / 0.5), 1), 128), dtype=int)
    ref = vr.get_batch(idx).asnumpy()
    clip = load_video(str(media / name))
    np.testing.assert_array_equal(clip.frames.numpy(), ref)
    assert clip.fps == pytest.approx(len(idx) / length) and clip.duration == pytest.approx(length)


def test_long_video_is_sampled_uniformly_to_max_frames(media):
    clip = load_video(str(media / "long70s.mp4"))
    assert clip.frames.shape[0] == 128
    assert clip.duration == pytest.approx(70.0)
    steps = np.diff(clip.timestamps.numpy())
    assert steps.min() > 0.25 and steps.max() < 0.8  # 70 s / 127 gaps, no clustering
    few = load_video(str(media / "long70s.mp4"), max_frames=5)
    assert few.frames.shape[0] == 5 and few.timestamps[-1] == pytest.approx(69.75)


def test_bytes_and_path_give_the_same_clip(media):
    a = load_video(str(media / "vp9.webm"))
    b = load_video((media / "vp9.webm").read_bytes())
    assert torch.equal(a.frames, b.frames) and torch.equal(a.timestamps, b.timestamps)


def test_load_av_both_tracks(media):
    clip = load_av(str(media / "av.mp4"))
    assert clip.has_audio and clip.audio.dtype == torch.float32
    assert abs(clip.audio.shape[0] / 16000 - 3.0) < 0.1
    assert torch.equal(clip.video.frames, load_video(str(media / "av.mp4")).frames)
    assert torch.equal(clip.audio, load_audio(str(media / "av.mp4")))
    silent = load_av(str(media / "silent.mp4"))
    assert not silent.has_audio and silent.video.frames.shape[0] == 6


# ------------------------------------------------------------------------------------------------ probe
def test_probe_reports_streams_and_modality(media):
    av_info = probe(str(media / "av.mp4"))
    assert av_info.has_audio and av_info.has_video and av_info.modality == "av"
    assert av_info.codecs == {"video": "h264", "audio": "aac"}
    assert (av_info.width, av_info.height, av_info.fps) == (96, 64, 10.0)
    assert av_info.duration == pytest.approx(3.0, abs=0.1)
    silent = probe(str(media / "vp9.webm"))
    assert silent.modality == "video" and silent.codecs == {"video": "vp9"}
    audio = probe(str(media / "stereo44k.wav"))
    assert audio.modality == "audio" and audio.sample_rate == 44100 and audio.channels == 2
    covered = probe(str(media / "with_cover.mp3"))
    assert covered.modality == "audio" and not covered.has_video  # cover art is not a video
    assert probe((media / "av.mp4").read_bytes()).modality == "av"
