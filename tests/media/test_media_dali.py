"""The DALI backend: its CPU operators must give what the PyAV path gives (WAV/FLAC/OGG audio, VP9 video),
codecs it lacks fall back to PyAV, and a missing DALI fails with the pip command."""

from __future__ import annotations

import importlib.util
import sys
import warnings

import numpy as np
import pytest
import torch

from wave_rt.errors import MissingDependencyError
from wave_rt.media import load_audio, load_av, load_video, resolve_backend
from wave_rt.media.backends import _dali_usable

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali-cuda130 is not installed")


@needs_dali
@pytest.mark.parametrize("name,atol", [("tone16k.wav", 0.0), ("stereo44k.wav", 0.0), ("noise22k.flac", 0.0),
                                       ("stereo44k.ogg", 1e-6), ("stereo44k.opus", 1e-6)])
def test_dali_audio_equals_pyav(media, name, atol):
    """Both decode to float at the native rate (WAV/FLAC bit-exact; Vorbis/Opus by two different decoders,
    libvorbis/libopus in DALI's libsndfile vs FFmpeg's, within float rounding), then share the resampler."""
    from wave_rt.media.backends import cpu, dali
    from wave_rt.media.limits import DEFAULT_LIMITS
    from wave_rt.media.source import as_source

    src = as_source(str(media / name), DEFAULT_LIMITS)
    native, rate = dali.decode_audio(src, DEFAULT_LIMITS)
    ref = cpu.decode_audio(src, DEFAULT_LIMITS)
    assert rate == ref.sample_rate and native.shape == (1, ref.samples.shape[0])
    np.testing.assert_allclose(native[0].numpy(), ref.samples, rtol=0, atol=atol)
    a = load_audio(str(media / name), backend="dali")
    b = load_audio(str(media / name), backend="cpu")
    torch.testing.assert_close(a, b, rtol=0, atol=max(atol, 1e-7) * 4)


@needs_dali
def test_dali_vp9_equals_pyav_on_luma(media):
    """Same frames chosen and decoded: on content without chroma the RGB differs by the converters' rounding
    only (DALI rounds BT.601 exactly, swscale's fast path uses 8-bit tables): at most 2 levels."""
    a = load_video(str(media / "vp9_gray.webm"), backend="dali")
    b = load_video(str(media / "vp9_gray.webm"), backend="cpu")
    assert (a.frames.int() - b.frames.int()).abs().max() <= 2
    assert torch.equal(a.timestamps, b.timestamps)
    assert (a.fps, a.duration) == (b.fps, b.duration)


def yuv420_to_rgb_bilinear(frame) -> np.ndarray:
    """BT.601 limited-range YUV -> RGB with bilinear (centre-sited) chroma upsampling, in float64."""
    h, w = frame.height, frame.width
    plane = [np.frombuffer(bytes(p), np.uint8).reshape(p.height, -1)[:, : p.width].astype(np.float64)
             for p in frame.planes]
    up = [torch.nn.functional.interpolate(torch.from_numpy(c)[None, None], size=(h, w), mode="bilinear",
                                          align_corners=False)[0, 0].numpy() for c in plane[1:]]
    y = (plane[0] - 16) * 255 / 219
    u, v = ((c - 128) * 255 / 224 for c in up)
    r, b = y + 1.402 * v, y + 1.772 * u
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return np.clip(np.round(np.stack([r, g, b], -1)), 0, 255)


@needs_dali
def test_dali_vp9_color_differs_only_in_chroma_upsampling(media):
    """With colour, DALI's CPU decoder upsamples chroma bilinearly while FFmpeg's swscale (PyAV, and decord
    which WAVE used) repeats it: the decoded YUV is the same, the RGB conversion is not. Pinned here exactly:
    DALI equals a bilinear-chroma conversion of the very YUV planes PyAV decodes, to one level."""
    import av

    a = load_video(str(media / "vp9.webm"), backend="dali", fps=10.0).frames.numpy().astype(np.int64)
    b = load_video(str(media / "vp9.webm"), backend="cpu", fps=10.0).frames.numpy().astype(np.int64)
    with av.open(str(media / "vp9.webm")) as c:
        yuv = [f for f in c.decode(video=0)]
    assert len(yuv) == a.shape[0] == b.shape[0] == 30
    for i, frame in enumerate(yuv):
        assert np.abs(a[i] - yuv420_to_rgb_bilinear(frame)).max() <= 1
    assert np.abs(a - b).mean() > 1.0  # the difference is real on this content (sharp colour edges)


@needs_dali
def test_dali_batch_decoding(media):
    from wave_rt.media.backends import dali
    from wave_rt.media.backends.cpu import video_index
    from wave_rt.media.limits import DEFAULT_LIMITS
    from wave_rt.media.source import as_source

    src = as_source(str(media / "vp9.webm"), DEFAULT_LIMITS)
    index = video_index(src, DEFAULT_LIMITS)
    ids = [np.array([0, 29]), np.array([3, 3, 10]), np.arange(0, 30, 3)]
    frames = dali.decode_video_batch([(src, i) for i in ids], device="cpu")
    full = dali.decode_video_batch([(src, np.arange(30))], device="cpu")[0]  # every frame, alone
    for got, i in zip(frames, ids):
        assert torch.equal(got, full[torch.from_numpy(i)])
    assert index.num_frames == 30


@needs_dali
def test_dali_falls_back_to_pyav_for_codecs_it_lacks(media):
    with pytest.warns(RuntimeWarning, match="h264"):
        clip = load_video(str(media / "silent.mp4"), backend="dali")
    assert torch.equal(clip.frames, load_video(str(media / "silent.mp4"), backend="cpu").frames)
    with pytest.warns(RuntimeWarning, match="mp3"):
        wav = load_audio(str(media / "tone.mp3"), backend="dali")
    assert torch.equal(wav, load_audio(str(media / "tone.mp3"), backend="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # AAC's fallback notice, once per process
        both = load_av(str(media / "av.mp4"), backend="dali")  # H.264 + AAC: all PyAV on a CPU-only machine
    assert both.has_audio


def test_missing_dali_names_the_pip_command(media, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # the import now fails as if not installed
    with pytest.raises(MissingDependencyError, match="pip install nvidia-dali-cuda130"):
        load_video(str(media / "vp9.webm"), backend="dali")
    with pytest.raises(MissingDependencyError, match="pip install nvidia-dali-cuda130"):
        load_audio(str(media / "tone16k.wav"), backend="dali")


def test_auto_backend_choice(monkeypatch):
    _dali_usable.cache_clear()
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert resolve_backend("auto") == "cpu"
        _dali_usable.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert resolve_backend("auto") == ("dali" if HAS_DALI else "cpu")
        assert resolve_backend("cpu") == "cpu" and resolve_backend("dali") == "dali"
        with pytest.raises(ValueError, match="backend"):
            resolve_backend("gpu")
    finally:
        _dali_usable.cache_clear()


@pytest.mark.gpu
@needs_dali
def test_dali_gpu_decodes_h264_onto_the_gpu(media):
    clip = load_video(str(media / "silent.mp4"), backend="dali")
    assert clip.frames.is_cuda
    ref = load_video(str(media / "silent.mp4"), backend="cpu").frames
    # NVDEC and FFmpeg convert YUV to RGB with their own rounding: close, not bit-equal
    assert (clip.frames.cpu().int() - ref.int()).abs().float().mean() < 2.0


def _rotated(tmp_path, codec: str, ext: str) -> str:
    from media_factory import write_video

    frames = np.zeros((20, 96, 160, 3), np.uint8)
    frames[:, :32, :64] = 255  # a marked top-left corner: a turn the other way, or twice, moves it
    path = tmp_path / f"rot90_{codec}.{ext}"
    write_video(path, frames, 10, codec, options={"crf": "10"} if codec == "libx264" else None, rotation=90)
    return str(path)


@needs_dali
def test_dali_rotated_clip_is_turned_once_like_pyav(tmp_path):
    # The display matrix is applied after either backend decodes: DALI's decoder must not turn it as well.
    path = _rotated(tmp_path, "libvpx-vp9", "mp4")
    a, b = load_video(path, backend="dali").frames, load_video(path, backend="cpu").frames
    assert a.shape == b.shape == (4, 160, 96, 3)
    assert (a.int() - b.int()).abs().float().mean() < 2.0


@pytest.mark.gpu
@needs_dali
def test_dali_gpu_rotated_h264_is_turned_once_like_pyav(tmp_path):
    path = _rotated(tmp_path, "libx264", "mp4")
    a, b = load_video(path, backend="dali").frames, load_video(path, backend="cpu").frames
    assert a.is_cuda and a.shape == b.shape == (4, 160, 96, 3)
    assert (a.cpu().int() - b.int()).abs().float().mean() < 2.0
