"""Audio loading as WAVE reads it: first channel, 16 kHz, zero-padded to at least 1 s, split in 300 s pieces."""

from __future__ import annotations

import functools
import math

import torch

from wave_rt.media.backends import resolve_backend
from wave_rt.media.limits import MediaLimits, resolve
from wave_rt.media.source import MediaSource, as_source

# Windowed-sinc resampler: 6 zero crossings each side, Hann window, cutoff just under the lower Nyquist.
LOWPASS_WIDTH = 6
ROLLOFF = 0.99


@functools.lru_cache(maxsize=32)
def _resample_kernel(orig: int, new: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Polyphase kernels [new, 1, 2*width + orig] (rates already divided by their gcd) and the half-width.

    Output phase p (time p*orig/new in input samples) reads input taps q*orig - width + j; its kernel holds the
    band-limited interpolator sampled at those taps."""
    cutoff = min(orig, new) * ROLLOFF  # in units where the input rate is `orig`
    width = math.ceil(LOWPASS_WIDTH * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)  # tap offset from the group start
    phase = torch.arange(new, dtype=torch.float64)[:, None] * orig / new
    x = (taps[None, :] - phase) * (cutoff / orig)  # distance in units of the cutoff's sinc period
    x = x.clamp(-LOWPASS_WIDTH, LOWPASS_WIDTH)
    window = torch.cos(x * (math.pi / (2 * LOWPASS_WIDTH))) ** 2
    sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(math.pi * x) / (math.pi * x))
    kernel = sinc * window * (cutoff / orig)
    return kernel.to(dtype)[:, None, :], width


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling of [..., samples] float audio from orig_sr to new_sr (any device).

    Length ceil(n * new / orig); the same algorithm as torchaudio.functional.resample's default (Hann-windowed
    sinc, 6 zero crossings, rolloff 0.99), so results agree with it to float rounding."""
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return waveform
    if not waveform.is_floating_point():
        raise TypeError(f"resample needs a float waveform, got {waveform.dtype}")
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _resample_kernel(orig, new, waveform.dtype)
    kernel = kernel.to(waveform.device)
    shape = waveform.shape
    n = shape[-1]
    flat = waveform.reshape(-1, 1, n)
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    out = torch.nn.functional.conv1d(padded, kernel, stride=orig)  # [B, new, groups]
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    length = math.ceil(new * n / orig)
    return out[:, :length].reshape(*shape[:-1], length)


def pad_to_min(waveform: torch.Tensor, min_samples: int) -> torch.Tensor:
    short = min_samples - waveform.shape[-1]
    return torch.nn.functional.pad(waveform, (0, short)) if short > 0 else waveform


def load_audio(src: MediaSource, sample_rate: int = 16000, *, backend: str = "auto",
               limits: MediaLimits | None = None) -> torch.Tensor:
    """Decode `src` (path or encoded bytes) -> float32 [samples] mono (first channel) at `sample_rate`,
    zero-padded to at least one second. Works on audio files and on the audio track of video files."""
    waveform, native_sr = load_audio_native(src, backend=backend, limits=limits)
    return finish_audio(waveform[0], native_sr, sample_rate)


def finish_audio(samples: torch.Tensor, native_sr: int, sample_rate: int) -> torch.Tensor:
    wav = resample(samples, native_sr, sample_rate)
    return pad_to_min(wav, int(sample_rate)).contiguous()


def load_audio_native(src: MediaSource, *, backend: str = "auto",
                      limits: MediaLimits | None = None) -> tuple[torch.Tensor, int]:
    """First channel at the file's own rate as [1, samples] float32, and that rate."""
    lim = resolve(limits)
    source = as_source(src, lim)
    name = resolve_backend(backend)
    if name == "dali":
        from wave_rt.media.backends import dali

        decoded = dali.decode_audio(source, lim)
        if decoded is not None:
            return decoded
    from wave_rt.media.backends.cpu import decode_audio

    d = decode_audio(source, lim)
    return torch.from_numpy(d.samples)[None], d.sample_rate


def audio_segments(waveform: torch.Tensor, sample_rate: int = 16000, seconds: float = 300.0) -> list[torch.Tensor]:
    """Consecutive `seconds`-long pieces of a 1-D waveform, as WAVE feeds the Whisper tower; a piece shorter
    than one second is zero-padded to one second."""
    if waveform.ndim != 1:
        raise ValueError(f"audio_segments takes a 1-D waveform, got shape {tuple(waveform.shape)}")
    step = int(seconds * sample_rate)
    if step <= 0:
        raise ValueError(f"segment length must be positive, got {seconds} s at {sample_rate} Hz")
    return [pad_to_min(waveform[k: k + step], int(sample_rate)) for k in range(0, waveform.shape[0], step)]


__all__ = ["load_audio", "audio_segments", "resample", "load_audio_native", "finish_audio"]
