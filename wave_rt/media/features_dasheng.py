"""Dasheng's input features (MiDashengLM's audio front end): 64-bin log-mel at 16 kHz.

The definition is the `dasheng` package's front end (torchaudio `MelSpectrogram` + `AmplitudeToDB`), with
the parameters MiDashengLM's audio encoder config carries: n_fft 512, win 512 (periodic Hann), hop 160,
center=True with reflect padding, power 2, 64 HTK-scale triangular filters (no area normalisation) from
0 to 8 kHz, then 10 * log10(max(x, 1e-10)) clamped from below at (max - 120 dB). Written here in torch so
the runtime does not need torchaudio (which has no build for the CPU torch we pin).

Two choices, both stated because they change numbers:
- `bf16_buffers=True` (default) rounds the Hann window and the filterbank to bfloat16 and back, as the
  released MiDashengLM checkpoint stores them (vLLM's midashenglm.py does the same rounding to match it).
- The 120 dB floor is taken per item. torchaudio's AmplitudeToDB on a [batch, mels, time] tensor takes the
  maximum over the whole batch (vLLM's path), which makes an item's features depend on its batch; SGLang's
  path unsqueezes to per-item. Per item is the batch-invariant choice; the floor only binds on near-silent
  stretches 120 dB below the loudest bin.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 512
WIN = 512
HOP = 160
N_MELS = 64
F_MIN = 0.0
F_MAX = 8000.0
TOP_DB = 120.0
AMIN = 1e-10
PATCH_FRAMES = 4  # Dasheng's time patch stride: one token per 4 mel frames (40 ms)


def _hz_to_mel_htk(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=4)
def dasheng_mel_filters(
    n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, f_min: float = F_MIN, f_max: float = F_MAX
) -> np.ndarray:
    """HTK triangular filters [n_fft//2 + 1, n_mels] in float64 (torchaudio.functional.melscale_fbanks, norm=None)."""
    freqs = np.linspace(0.0, sample_rate // 2, n_fft // 2 + 1)
    pts = _mel_to_hz_htk(np.linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), n_mels + 2))
    diff = pts[1:] - pts[:-1]
    slopes = pts[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return np.maximum(0.0, np.minimum(down, up))


def dasheng_frontend_buffers(bf16_buffers: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(window [512], filterbank [257, 64]) in float32, as the released checkpoint holds them when bf16_buffers."""
    window = torch.hann_window(WIN, dtype=torch.float64)
    fb = torch.from_numpy(dasheng_mel_filters())
    if bf16_buffers:
        window, fb = window.to(torch.bfloat16), fb.to(torch.bfloat16)
    return window.to(torch.float32), fb.to(torch.float32)


@functools.lru_cache(maxsize=4)
def _consts(bf16_buffers: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return dasheng_frontend_buffers(bf16_buffers)


def dasheng_frames(num_samples: int) -> int:
    """Mel frames of a waveform of `num_samples` (center=True): 1 + num_samples // hop."""
    return 1 + int(num_samples) // HOP


def dasheng_tokens(num_samples: int, subsample: int = 5) -> int:
    """LLM audio tokens MiDashengLM gives a waveform: frames // 4 // subsample, at least 1 (as its processor)."""
    return max(1, dasheng_frames(num_samples) // PATCH_FRAMES // subsample)


def dasheng_log_mel(
    waveform: torch.Tensor | np.ndarray,
    *,
    bf16_buffers: bool = True,
    window: torch.Tensor | None = None,
    filters: torch.Tensor | None = None,
) -> torch.Tensor:
    """One mono waveform (16 kHz, float) -> log-mel [64, 1 + n // 160] float32, in dB.

    `window`/`filters` override the built-in buffers (e.g. with the ones stored in a checkpoint)."""
    wav = torch.as_tensor(np.asarray(waveform) if isinstance(waveform, np.ndarray) else waveform)
    if wav.ndim != 1 or wav.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D waveform, got shape {tuple(wav.shape)}")
    if wav.numel() <= N_FFT // 2:
        # reflect padding needs more samples than half a window
        raise ValueError(f"waveform of {wav.numel()} samples is too short for Dasheng's front end (> {N_FFT // 2})")
    wav = wav.to(torch.float32)
    win_default, fb_default = _consts(bf16_buffers)
    win = (window if window is not None else win_default).to(torch.float32)
    fb = (filters if filters is not None else fb_default).to(torch.float32)
    spec = torch.stft(wav, N_FFT, hop_length=HOP, win_length=WIN, window=win, center=True, pad_mode="reflect",
                      normalized=False, onesided=True, return_complex=True)
    power = spec.real.square() + spec.imag.square()  # [257, frames]
    mel = fb.T @ power  # [64, frames]
    db = 10.0 * torch.log10(torch.clamp(mel, min=AMIN))
    return torch.maximum(db, db.max() - TOP_DB)
