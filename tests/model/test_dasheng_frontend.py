"""Dasheng's log-mel front end (ours, float32 torch) == two float64 references of the same definition (torchaudio
MelSpectrogram(sr 16000, n_fft 512, win 512, hop 160, f 0..8000, 64 HTK mels, no norm, power 2, center reflect) +
AmplitudeToDB(power, top_db 120)): transformers' public numpy `audio_utils` (mel_filter_bank with mel_scale="htk",
documented as torchaudio's melscale_fbanks default, and spectrogram with log_mel="dB", db_range=120), and a numpy
restatement written independently here. The real torchaudio is compared on the GPU image (test_dasheng_golden)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wave_rt.media.features_dasheng import dasheng_frames, dasheng_log_mel, dasheng_tokens


def _htk_filters_f64(n_mels=64, n_fft=512, sr=16000, fmin=0.0, fmax=8000.0) -> np.ndarray:
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    centers = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    bins = np.linspace(0, sr / 2, n_fft // 2 + 1)
    fb = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        lo, c, hi = centers[m], centers[m + 1], centers[m + 2]
        fb[:, m] = np.clip(np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)), 0.0, None)
    return fb


def reference_log_mel(wav: np.ndarray, bf16_buffers: bool) -> np.ndarray:
    x = np.pad(wav.astype(np.float64), 256, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)  # periodic Hann (torch.hann_window's default)
    fb = _htk_filters_f64()
    if bf16_buffers:  # the released checkpoint's buffers are bfloat16
        window = torch.from_numpy(window).to(torch.bfloat16).double().numpy()
        fb = torch.from_numpy(fb).to(torch.bfloat16).double().numpy()
    n_frames = 1 + (x.size - 512) // 160
    frames = np.stack([x[i * 160: i * 160 + 512] * window for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2  # [frames, 257]
    db = 10.0 * np.log10(np.maximum(power @ fb, 1e-10)).T  # [64, frames]
    return np.maximum(db, db.max() - 120.0)


def transformers_log_mel(wav: np.ndarray, bf16_buffers: bool) -> np.ndarray:
    """The same features from transformers.audio_utils (float64 signal, window and filters; its FFT output buffer
    is complex64, so it agrees with a full float64 computation to ~1e-6 dB)."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    fb = mel_filter_bank(num_frequency_bins=257, num_mel_filters=64, min_frequency=0.0, max_frequency=8000.0,
                         sampling_rate=16000, norm=None, mel_scale="htk")
    window = window_function(512, "hann", periodic=True)
    if bf16_buffers:  # the released checkpoint's buffers are bfloat16
        window = torch.from_numpy(window).to(torch.bfloat16).double().numpy()
        fb = torch.from_numpy(fb).to(torch.bfloat16).double().numpy()
    return spectrogram(wav.astype(np.float64), window, frame_length=512, hop_length=160, fft_length=512, power=2.0,
                       center=True, pad_mode="reflect", mel_filters=fb, mel_floor=1e-10, log_mel="dB",
                       reference=1.0, min_value=1e-10, db_range=120.0, dtype=np.float64)


def _signal(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.4 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("bf16_buffers", [False, True])
@pytest.mark.parametrize("n", [16000, 23457, 3200])
def test_log_mel_equals_float64_reference(n, bf16_buffers):
    wav = _signal(n, seed=n)
    ours = dasheng_log_mel(torch.from_numpy(wav), bf16_buffers=bf16_buffers).double().numpy()
    ref = reference_log_mel(wav, bf16_buffers)
    assert ours.shape == ref.shape == (64, dasheng_frames(n))
    # float32 rounding of the power is ~1e-6 relative, i.e. ~3e-5 dB seen; the bf16-vs-float64 buffer choice
    # alone moves values by ~0.16 dB, so 1e-4 dB separates a right definition from a near miss.
    assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("bf16_buffers", [False, True])
@pytest.mark.parametrize("n", [16000, 23457, 3200])
def test_log_mel_equals_transformers_audio_utils(n, bf16_buffers):
    wav = _signal(n, seed=n + 1)
    ours = dasheng_log_mel(torch.from_numpy(wav), bf16_buffers=bf16_buffers).double().numpy()
    ref = transformers_log_mel(wav, bf16_buffers)
    assert ours.shape == ref.shape == (64, dasheng_frames(n))
    assert np.abs(ours - ref).max() < 1e-4  # see test_log_mel_equals_float64_reference for the scale
    # and the two references agree with each other (to the complex64 rounding of transformers' FFT buffer)
    assert np.abs(ref - reference_log_mel(wav, bf16_buffers)).max() < 1e-5


def test_top_db_floor_and_silence():
    wav = np.zeros(8000, dtype=np.float32)
    wav[4000:4100] = 1.0  # a click in silence: most bins sit on the 120 dB floor
    ours = dasheng_log_mel(torch.from_numpy(wav)).numpy()
    assert ours.min() >= ours.max() - 120.0 - 1e-4
    assert np.isclose(ours.min(), ours.max() - 120.0, atol=1e-3)


def test_bf16_buffers_change_the_numbers():
    wav = torch.from_numpy(_signal(16000, 1))
    assert not torch.equal(dasheng_log_mel(wav, bf16_buffers=True), dasheng_log_mel(wav, bf16_buffers=False))


def test_token_count_is_midashenglm_processor_rule():
    # vLLM/SGLang calculate_mel_frames_dasheng: int(1 + (n + 512 - 512) / 160) // 4 // 5, and at least 1
    for n in (3200, 16000, 16159, 160000, 480001):
        assert dasheng_tokens(n) == max(1, int(1 + n / 160) // 4 // 5)


def test_bad_waveforms_raise():
    with pytest.raises(ValueError):
        dasheng_log_mel(torch.zeros(2, 100))
    with pytest.raises(ValueError):
        dasheng_log_mel(torch.zeros(100))
