"""Model-ready audio features.

whisper_log_mel: Qwen2.5-Omni's WhisperFeatureExtractor (128 mel bins, n_fft 400, hop 160, 300 s chunk,
padding="max_length") restricted to the frames that matter, without computing the padding. Two details of
the padded computation must survive: frames near the end of the signal see the zero padding (not a reflection
of the signal), and the clamp at `max - 8` uses the maximum over *all* frames, including the few past the valid
ones whose window still overlaps the signal. Frames wholly inside the padding give log10(1e-10) = -10, the floor,
so they never change that maximum and need not be computed.

beats_fbank: BEATs' input, Kaldi fbank (torchaudio.compliance.kaldi.fbank defaults) of waveform * 2**15, 128
bins, 25 ms / 10 ms, in float64, normalized with BEATs' fixed mean and std."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------- Whisper
N_FFT = 400
HOP = 160
N_MELS = 128
SAMPLE_RATE = 16000
CHUNK_SECONDS = 300
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # the feature extractor's max_length
MAX_FRAMES = N_SAMPLES // HOP


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = 3.0 * hz / 200.0
    logstep = 27.0 / np.log(6.4)
    above = hz >= 1000.0
    return np.where(above, 15.0 + np.log(np.maximum(hz, 1e-300) / 1000.0) * logstep, mel)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = 200.0 * mel / 3.0
    logstep = np.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(logstep * (mel - 15.0)), hz)


@functools.lru_cache(maxsize=4)
def whisper_mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-scale, Slaney-normalized triangular filters [n_fft//2 + 1, n_mels], float64 (librosa's / Whisper's)."""
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    edges = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sample_rate / 2), n_mels + 2))
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (fft_freqs[:, None] - lower[None, :]) / (center - lower)[None, :]
    falling = (upper[None, :] - fft_freqs[:, None]) / (upper - center)[None, :]
    tri = np.maximum(0.0, np.minimum(rising, falling))
    return tri * (2.0 / (upper - lower))[None, :]


@functools.lru_cache(maxsize=8)
def _whisper_consts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    window = torch.hann_window(N_FFT, device=device)
    filters = torch.from_numpy(whisper_mel_filters()).to(device=device, dtype=torch.float32)
    return window, filters.T.contiguous()  # [n_mels, n_freq]


def _as_batch(waveform: object) -> tuple[list[torch.Tensor], bool]:
    """Normalize the accepted inputs to a list of 1-D float32 tensors; the flag says whether it was batched."""
    if isinstance(waveform, np.ndarray):
        waveform = torch.from_numpy(np.ascontiguousarray(waveform))
    if isinstance(waveform, torch.Tensor):
        if waveform.ndim == 1:
            return [waveform.to(torch.float32)], False
        if waveform.ndim == 2:
            return [w.to(torch.float32) for w in waveform], True
        raise ValueError(f"expected a 1-D waveform or a [batch, samples] tensor, got shape {tuple(waveform.shape)}")
    if isinstance(waveform, Sequence) and not isinstance(waveform, (str, bytes)):
        items = []
        for w in waveform:
            t = torch.from_numpy(np.ascontiguousarray(w)) if isinstance(w, np.ndarray) else torch.as_tensor(w)
            if t.ndim != 1:
                raise ValueError(f"each waveform in a list must be 1-D, got shape {tuple(t.shape)}")
            items.append(t.to(torch.float32))
        if not items:
            raise ValueError("empty batch")
        return items, True
    raise TypeError(f"waveform must be a tensor, array or a list of them, got {type(waveform).__name__}")


def whisper_frames(num_samples: int) -> int:
    """Valid log-mel frames of a waveform of `num_samples` (truncated to 300 s): what whisper_log_mel's mask
    counts, known from the sample count alone (token counts never wait for the features)."""
    return math.ceil(min(int(num_samples), N_SAMPLES) / HOP)


def whisper_full_chunk(num_samples: int) -> bool:
    """Whether a waveform's last relevant frame reaches the end of the 300 s chunk, where whisper_log_mel has to
    compute the whole padded chunk (a batch holding such a row computes every row that way)."""
    needed = min(MAX_FRAMES, (min(int(num_samples), N_SAMPLES) + N_FFT // 2 - 1) // HOP + 1)
    return (needed - 1) * HOP + N_FFT // 2 >= N_SAMPLES


def _log_mel_rows(x: torch.Tensor, window: torch.Tensor, filters: torch.Tensor, center: bool) -> torch.Tensor:
    stft = torch.stft(x, N_FFT, HOP, window=window, center=center, return_complex=True)
    power = stft.abs() ** 2
    if center:
        power = power[..., :-1]  # the extractor drops the last frame
    return torch.clamp(filters @ power, min=1e-10).log10()


def whisper_log_mel(waveform: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper log-mel features of 16 kHz audio, as Qwen2.5-Omni's feature extractor computes them.

    1-D input: (features float32 [128, T], mask int32 [T]) with T = ceil(samples / 160) valid frames (the
    waveform is truncated to 300 s like the extractor does). A [B, samples] tensor or a list of 1-D waveforms:
    ([B, 128, T_max], [B, T_max]), where frames past a row's own length equal the extractor's values for that
    row's zero padding and the mask marks them 0. Runs on the input's device."""
    rows, batched = _as_batch(waveform)
    device = rows[0].device
    rows = [r.to(device)[:N_SAMPLES] for r in rows]
    lengths = [int(r.shape[0]) for r in rows]
    valid = [whisper_frames(n) for n in lengths]
    t_out = max(valid)
    window, filters = _whisper_consts(device)
    # Frames whose window (center +- 200 samples) overlaps the signal: they can hold the global maximum.
    needed = max(t_out, max(min(MAX_FRAMES, (n + N_FFT // 2 - 1) // HOP + 1) for n in lengths))
    if any(whisper_full_chunk(n) for n in lengths):
        # The last frames reach the end of the 300 s chunk, where the extractor's reflect padding applies:
        # compute exactly what it computes.
        x = torch.stack([torch.nn.functional.pad(r, (0, N_SAMPLES - r.shape[0])) for r in rows])
        logmel = _log_mel_rows(x, window, filters, center=True)
    else:
        # Zero-pad to just the samples the needed frames read, mirror the start like center=True would.
        length = (needed - 1) * HOP + N_FFT // 2
        x = torch.stack([torch.nn.functional.pad(r, (0, length - r.shape[0])) for r in rows])
        x = torch.cat([x[:, 1: N_FFT // 2 + 1].flip(-1), x], dim=1)
        logmel = _log_mel_rows(x, window, filters, center=False)
    peak = logmel.amax(dim=(1, 2), keepdim=True)
    feats = (torch.maximum(logmel, peak - 8.0) + 4.0) / 4.0
    feats = feats[..., :t_out].contiguous()
    mask = (torch.arange(t_out, device=device)[None, :] < torch.tensor(valid, device=device)[:, None]).to(torch.int32)
    if batched:
        return feats, mask
    return feats[0], mask[0]


# ---------------------------------------------------------------------------------------------- BEATs / Kaldi
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
KALDI_FRAME = 400  # 25 ms at 16 kHz
KALDI_SHIFT = 160  # 10 ms
KALDI_FFT = 512  # frame length rounded up to a power of two
KALDI_PREEMPH = 0.97
KALDI_LOW_HZ = 20.0
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # Kaldi's log floor, as torchaudio applies it


def _kaldi_mel(hz: torch.Tensor) -> torch.Tensor:
    return 1127.0 * (1.0 + hz / 700.0).log()  # log(1 + x), not log1p: Kaldi's and torchaudio's rounding


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(device: torch.device, n_mels: int = N_MELS) -> torch.Tensor:
    """Kaldi's triangular mel filters [n_mels, KALDI_FFT // 2 + 1], triangles in the mel domain.

    Computed in float32 and widened, as torchaudio does, so the float64 fbank matches it to rounding."""
    nyquist = SAMPLE_RATE / 2.0
    mel_low = 1127.0 * math.log(1.0 + KALDI_LOW_HZ / 700.0)
    mel_high = 1127.0 * math.log(1.0 + nyquist / 700.0)
    delta = (mel_high - mel_low) / (n_mels + 1)
    k = torch.arange(n_mels, dtype=torch.float32)[:, None]
    left = mel_low + k * delta
    center = mel_low + (k + 1.0) * delta
    right = mel_low + (k + 2.0) * delta
    bin_mel = _kaldi_mel((SAMPLE_RATE / KALDI_FFT) * torch.arange(KALDI_FFT / 2, dtype=torch.float32))[None, :]
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    banks = torch.nn.functional.pad(banks, (0, 1))  # the Nyquist bin gets no weight
    return banks.to(device=device, dtype=torch.float64)


@functools.lru_cache(maxsize=8)
def _povey_window(device: torch.device) -> torch.Tensor:
    return torch.hann_window(KALDI_FRAME, periodic=False, dtype=torch.float64, device=device).pow(0.85)


def kaldi_frames(n: int) -> int:
    """Frames Kaldi's fbank gives `n` samples with snip_edges (whole 25 ms frames only)."""
    return 0 if n < KALDI_FRAME else 1 + (n - KALDI_FRAME) // KALDI_SHIFT


def kaldi_fbank_rows(x: torch.Tensor, n_mels: int = N_MELS) -> torch.Tensor:
    """Kaldi fbank of [B, samples] float64 signals already scaled to int16 range -> [B, frames, n_mels] float64,
    one unfold and one FFT for the whole batch. Every step is per frame, so a frame of a zero-padded row
    equals that row's own frame as long as it lies inside the row: callers cut each row to kaldi_frames."""
    frames = x.unfold(1, KALDI_FRAME, KALDI_SHIFT)  # [B, T, 400]
    frames = frames - frames.mean(dim=2, keepdim=True)  # remove_dc_offset
    prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=2)  # preemphasis replicates the first sample
    frames = (frames - KALDI_PREEMPH * prev) * _povey_window(x.device)
    spec = torch.fft.rfft(frames, n=KALDI_FFT).abs().pow(2.0)
    energies = spec @ kaldi_mel_banks(x.device, n_mels).T
    return torch.clamp(energies, min=FLOAT32_EPS).log()


def beats_fbank(waveform: object) -> torch.Tensor | list[torch.Tensor]:
    """BEATs' normalized Kaldi fbank of 16 kHz audio in [-1, 1]: float32 [frames, 128] for a 1-D waveform,
    [B, frames, 128] for a [B, samples] tensor, a list for a list. Frames = 1 + (samples - 400) // 160.

    Computed in float64 (Kaldi's and the reference's precision: float32 FFTs lose quiet mel bands next to loud
    ones), on the input's device, the whole batch at once (rows of a list zero-padded to the longest)."""
    rows, batched = _as_batch(waveform)
    device = rows[0].device
    counts = [kaldi_frames(int(r.shape[0])) for r in rows]
    longest = max(int(r.shape[0]) for r in rows)
    if max(counts) == 0:
        feats = torch.zeros(len(rows), 0, N_MELS, dtype=torch.float32, device=device)
    else:
        x = torch.zeros(len(rows), longest, dtype=torch.float64, device=device)
        for i, r in enumerate(rows):
            x[i, : r.shape[0]] = r.to(device=device, dtype=torch.float64)
        feats = ((kaldi_fbank_rows(x * 32768.0) - FBANK_MEAN) / (2.0 * FBANK_STD)).to(torch.float32)
    outs = [feats[i, :c] for i, c in enumerate(counts)]
    if not batched:
        return outs[0].contiguous()
    if isinstance(waveform, (torch.Tensor, np.ndarray)):
        return feats  # equal lengths: every row has the same frame count
    return [o.contiguous() for o in outs]
