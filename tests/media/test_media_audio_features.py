"""Whisper log-mel against transformers' WhisperFeatureExtractor (Qwen2.5-Omni's configuration), and BEATs'
Kaldi fbank against an independent float64 numpy implementation, kaldi-native-fbank (Kaldi's C++ fbank)
and torchaudio where it installs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from wave_rt.media import beats_fbank, load_audio, whisper_log_mel
from wave_rt.media.features_audio import (
    FBANK_MEAN,
    FBANK_STD,
    kaldi_fbank_rows,
    kaldi_frames,
    kaldi_mel_banks,
    whisper_mel_filters,
)

N_SAMPLES = 300 * 16000


@pytest.fixture(scope="module")
def extractor():
    from transformers import WhisperFeatureExtractor

    # Qwen2.5-Omni's preprocessor_config.json for the feature extractor
    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=300,
                                   padding_value=0.0, return_attention_mask=True)


def reference(extractor, waves):
    out = extractor(waves, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="np")
    return out["input_features"], out["attention_mask"]


def test_mel_filters_equal_transformers(extractor):
    np.testing.assert_allclose(whisper_mel_filters(), extractor.mel_filters, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [16000, 16001, 16159, 16160, 37_123, 160 * 250 + 1])
def test_log_mel_matches_extractor(extractor, n):
    rng = np.random.default_rng(n)
    x = (0.1 * rng.standard_normal(n)).astype(np.float32)
    x[-40:] *= 25.0  # a loud tail: the global max lives in a frame past the last valid one
    ref, ref_mask = reference(extractor, x)
    feats, mask = whisper_log_mel(torch.from_numpy(x))
    t = math.ceil(n / 160)
    assert feats.shape == (128, t) and feats.dtype == torch.float32
    assert mask.shape == (t,) and int(mask.sum()) == int(ref_mask.sum()) == t
    np.testing.assert_allclose(feats.numpy(), ref[0, :, :t], rtol=0, atol=1e-4)


def test_global_max_comes_from_a_frame_past_the_valid_ones(extractor):
    """Silence except a click in the last 30 samples: the loudest frames are the ones the mask drops, and
    the clamp at max - 8 must still use them."""
    x = np.zeros(16000 + 100, dtype=np.float32)
    x[-30:] = 0.9
    ref, _ = reference(extractor, x)
    feats, mask = whisper_log_mel(x)
    t = int(mask.sum())
    valid_max = feats.max().item()
    padded_max = ref[0].max()
    assert padded_max > valid_max + 1e-3  # the case is real: a dropped frame holds the maximum
    np.testing.assert_allclose(feats.numpy(), ref[0, :, :t], rtol=0, atol=1e-4)


@pytest.mark.parametrize("n", [N_SAMPLES - 700, N_SAMPLES - 200, N_SAMPLES, N_SAMPLES + 3210])
def test_log_mel_at_the_300s_boundary(extractor, n):
    """Near 300 s the last frames see the extractor's reflect padding, and longer input is truncated."""
    rng = np.random.default_rng(7)
    x = (0.05 * rng.standard_normal(n)).astype(np.float32)
    x[N_SAMPLES - 150: N_SAMPLES - 100] = 0.8 if n >= N_SAMPLES - 100 else 0.0
    ref, ref_mask = reference(extractor, x)
    feats, mask = whisper_log_mel(torch.from_numpy(x))
    t = int(ref_mask.sum())
    assert feats.shape[1] == t == min(math.ceil(n / 160), 30000)
    np.testing.assert_allclose(feats.numpy(), ref[0, :, :t], rtol=0, atol=1e-4)


def test_batched_list_and_2d(extractor):
    rng = np.random.default_rng(3)
    waves = [(0.2 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 23456, 17001)]
    ref, ref_mask = reference(extractor, waves)
    feats, mask = whisper_log_mel(waves)
    t = max(math.ceil(len(w) / 160) for w in waves)
    assert feats.shape == (3, 128, t) and mask.shape == (3, t)
    np.testing.assert_array_equal(mask.numpy(), ref_mask[:, :t])
    # every frame up to the batch's longest equals the padded computation, valid or not
    np.testing.assert_allclose(feats.numpy(), ref[:, :, :t], rtol=0, atol=1e-4)
    stacked = np.stack([w[:16000] for w in waves])
    f2, m2 = whisper_log_mel(torch.from_numpy(stacked))
    r2, _ = reference(extractor, list(stacked))
    np.testing.assert_allclose(f2.numpy(), r2[:, :, :100], rtol=0, atol=1e-4)
    assert m2.dtype == torch.int32 and bool(m2.all())


def test_speech_file(extractor, media):
    path = media / "speech.wav"
    wav = load_audio(str(path))
    ref, ref_mask = reference(extractor, wav.numpy())
    feats, mask = whisper_log_mel(wav)
    np.testing.assert_allclose(feats.numpy(), ref[0, :, : int(ref_mask.sum())], rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_log_mel_on_gpu_matches_cpu():
    x = torch.randn(16000 * 7 + 13) * 0.1
    f_cpu, _ = whisper_log_mel(x)
    f_gpu, m_gpu = whisper_log_mel(x.cuda())
    assert f_gpu.is_cuda and m_gpu.is_cuda
    torch.testing.assert_close(f_gpu.cpu(), f_cpu, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- fbank
def kaldi_fbank_numpy(x: np.ndarray) -> np.ndarray:
    """Kaldi compute-fbank-feats (torchaudio.compliance.kaldi.fbank defaults, 128 bins) in float64 numpy,
    written from Kaldi's definitions: povey window, DC removal, preemphasis 0.97, 512-point power spectrum,
    mel = 1127 ln(1 + f/700) triangles from 20 Hz to Nyquist, log floored at float32 epsilon."""
    x = x.astype(np.float64)
    size, shift, nfft, bins = 400, 160, 512, 128
    m = 1 + (len(x) - size) // shift
    frames = np.stack([x[i * shift: i * shift + size] for i in range(m)])
    frames = frames - frames.mean(axis=1, keepdims=True)
    shifted = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - 0.97 * shifted
    n = np.arange(size)
    frames = frames * (0.5 - 0.5 * np.cos(2 * np.pi * n / (size - 1))) ** 0.85
    power = np.abs(np.fft.rfft(frames, n=nfft)) ** 2

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / (bins + 1)
    fft_mel = mel(np.arange(nfft // 2) * 16000.0 / nfft)
    banks = np.zeros((bins, nfft // 2 + 1))
    for b in range(bins):
        left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        up = (fft_mel - left) / (center - left)
        down = (right - fft_mel) / (right - center)
        banks[b, : nfft // 2] = np.maximum(0.0, np.minimum(up, down))
    return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))


@pytest.mark.parametrize("n", [400, 16000, 16000 * 3 + 77])
def test_beats_fbank_matches_float64_reference(n):
    rng = np.random.default_rng(n)
    x = (0.3 * rng.standard_normal(n)).astype(np.float32)
    ref = (kaldi_fbank_numpy(x.astype(np.float64) * 2**15) - 15.41663) / (2 * 6.55582)
    got = beats_fbank(torch.from_numpy(x))
    assert got.dtype == torch.float32 and got.shape == (1 + (n - 400) // 160, 128)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-4)


def test_beats_fbank_on_a_file_and_batches(media):
    wav, sr = sf.read(media / "tone16k.wav", dtype="float32")
    ref = (kaldi_fbank_numpy(wav.astype(np.float64) * 2**15) - 15.41663) / (2 * 6.55582)
    np.testing.assert_allclose(beats_fbank(wav).numpy(), ref, rtol=0, atol=1e-4)
    batch = beats_fbank(np.stack([wav, wav[::-1].copy()]))
    assert batch.shape == (2, *ref.shape)
    np.testing.assert_array_equal(batch[0].numpy(), beats_fbank(wav).numpy())
    listed = beats_fbank([wav[:8000], wav])
    assert [t.shape[0] for t in listed] == [1 + (8000 - 400) // 160, ref.shape[0]]
    assert beats_fbank(wav[:399]).shape == (0, 128)


# BEATs' own call at its own 128 bins (kaldi-native-fbank refuses 128 at a 512-point FFT), from golden outputs of
# torchaudio 2.11 made by bench/make_fbank_fixtures.py in a torch 2.11 + torchaudio 2.11 environment and committed.
FBANK_FIXTURES = Path(__file__).parent / "fixtures"


def test_beats_fbank_matches_torchaudio_golden():
    from safetensors.torch import load_file

    meta = json.loads((FBANK_FIXTURES / "beats_fbank_torchaudio.json").read_text())
    golden = load_file(str(FBANK_FIXTURES / meta["file"]))
    for i, n in enumerate(meta["lengths"]):
        wav, ref = golden[f"wav.{i}"], golden[f"fbank.{i}"].double()
        assert wav.shape == (n,) and ref.shape == (kaldi_frames(n), 128)
        got = beats_fbank(wav).double()
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-4, (n, (got - ref).abs().max())


# BEATs' own call, where torchaudio installs (it has no build for the torch we pin, so a fresh test venv does not
# collect this test rather than skip it: kaldi-native-fbank above is the reference that always runs).
if importlib.util.find_spec("torchaudio") is not None:

    def test_beats_fbank_matches_torchaudio():
        import torchaudio.compliance.kaldi as kaldi

        x = torch.randn(16000 * 2, dtype=torch.float64) * 0.2
        ref = kaldi.fbank(x[None] * 2**15, num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10)
        ref = (ref - 15.41663) / (2 * 6.55582)
        torch.testing.assert_close(beats_fbank(x.float()).double(), ref, rtol=0, atol=1e-4)


# BEATs calls torchaudio.compliance.kaldi.fbank(waveform * 2**15, num_mel_bins=128, sample_frequency=16000,
# frame_length=25, frame_shift=10) and leaves every other option at torchaudio's default. The same options
# in kaldi-native-fbank (k2-fsa's implementation of Kaldi's compute-fbank-feats), one for one:
KNF_BEATS_OPTIONS = {
    "frame_opts.samp_freq": 16000.0,  # sample_frequency=16000
    "frame_opts.frame_length_ms": 25.0,  # frame_length=25
    "frame_opts.frame_shift_ms": 10.0,  # frame_shift=10
    "frame_opts.dither": 0.0,  # torchaudio's default dither is 0 (Kaldi's is 1: set it)
    "frame_opts.preemph_coeff": 0.97,  # preemphasis_coefficient
    "frame_opts.remove_dc_offset": True,  # remove_dc_offset
    "frame_opts.window_type": "povey",  # window_type
    "frame_opts.round_to_power_of_two": True,  # round_to_power_of_two: a 512-point FFT
    "frame_opts.snip_edges": True,  # snip_edges: whole frames only
    "frame_opts.blackman_coeff": 0.42,  # unused by povey
    "mel_opts.num_bins": 128,  # num_mel_bins=128
    "mel_opts.low_freq": 20.0,  # low_freq
    "mel_opts.high_freq": 0.0,  # high_freq: 0 = Nyquist
    "mel_opts.is_librosa": False,  # Kaldi's bins, not librosa's
    "use_energy": False,  # use_energy: no energy column
    "energy_floor": 1.0,  # energy_floor (only read with use_energy)
    "raw_energy": True,  # raw_energy (only read with use_energy)
    "htk_compat": False,  # htk_compat
    "use_log_fbank": True,  # use_log_fbank
    "use_power": True,  # use_power: power, not magnitude, spectrum
    "use_log_floor": True,  # torchaudio floors the mel energies at float32 epsilon before the log ...
}
KNF_MAX_BINS = 126  # the most mel bins Kaldi's check accepts at 16 kHz with a 512-point FFT (see below)


def _knf_options(num_bins: int):
    import kaldi_native_fbank as knf  # in the test extra (not a skip: it installs everywhere the suite runs)

    opts = knf.FbankOptions()
    for key, value in {**KNF_BEATS_OPTIONS, "mel_opts.num_bins": num_bins}.items():
        target = opts
        *path, name = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, name, value)
    return knf, opts


def _knf_fbank(x: np.ndarray, num_bins: int) -> np.ndarray:
    """kaldi-native-fbank's log mel fbank of a 16 kHz waveform in [-1, 1], scaled by 2**15 as BEATs scales it."""
    knf, opts = _knf_options(num_bins)
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000.0, (x.astype(np.float64) * 2**15).astype(np.float32))
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


def test_kaldi_native_fbank_options_are_beats_options():
    _, opts = _knf_options(128)
    for key, value in KNF_BEATS_OPTIONS.items():
        target = opts
        for part in key.split("."):
            target = getattr(target, part)
        assert target == pytest.approx(value) if isinstance(value, float) else target == value, key
    # ... the same floor: float32 epsilon
    assert opts.eps == pytest.approx(float(np.finfo(np.float32).eps))


def test_kaldi_refuses_beats_128_bins_because_one_bin_is_empty():
    """Kaldi (and kaldi-native-fbank) refuse 128 bins at 16 kHz: below ~50 Hz a triangle is narrower than the
    31.25 Hz FFT bin spacing and bin 3 holds no FFT bin. torchaudio does not check: BEATs was trained with that
    bin at the log floor. Ours matches torchaudio there (the comparison at 126 bins below covers the rest)."""
    knf, opts = _knf_options(128)
    with pytest.raises(ValueError, match="num_mel_bins too large"):
        knf.OnlineFbank(opts).accept_waveform(16000.0, np.zeros(800, np.float32))
    _, opts = _knf_options(KNF_MAX_BINS + 1)
    with pytest.raises(ValueError, match="num_mel_bins too large"):
        knf.OnlineFbank(opts).accept_waveform(16000.0, np.zeros(800, np.float32))
    banks = kaldi_mel_banks(torch.device("cpu"))
    assert (banks.sum(dim=1) == 0).nonzero().flatten().tolist() == [3]
    x = torch.from_numpy((0.3 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32))
    floor = (math.log(float(np.finfo(np.float32).eps)) - FBANK_MEAN) / (2 * FBANK_STD)
    torch.testing.assert_close(beats_fbank(x)[:, 3], torch.full((98,), floor), rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_bins", [80, KNF_MAX_BINS])
def test_mel_banks_equal_kaldi_native_fbank(num_bins):
    knf, opts = _knf_options(num_bins)
    theirs = knf.MelBanks(opts.mel_opts, opts.frame_opts).get_matrix()  # float32 weights
    ours = kaldi_mel_banks(torch.device("cpu"), num_bins).numpy()
    assert ours.shape == theirs.shape == (num_bins, 257)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=5e-5)  # float32 rounding of the mel edges


@pytest.mark.parametrize("num_bins", [80, KNF_MAX_BINS])
@pytest.mark.parametrize("n", [400, 16000, 16000 * 3 + 77])
def test_beats_fbank_matches_kaldi_native_fbank(num_bins, n):
    """Every step but the bin count at BEATs' options against kaldi-native-fbank, normalized as BEATs
    normalizes. kaldi-native-fbank works in float32: its own error against our float64 is what the tolerance
    allows (measured <= 3.3e-4 on the log energies, <= 2.5e-5 after BEATs' division by 2 * 6.55582)."""
    rng = np.random.default_rng(n + num_bins)
    x = (0.3 * rng.standard_normal(n)).astype(np.float32)
    x[n // 4: n // 2] *= 1e-4  # a quiet stretch next to loud ones
    theirs = (_knf_fbank(x, num_bins) - FBANK_MEAN) / (2 * FBANK_STD)
    x64 = torch.from_numpy(x).to(torch.float64)[None]
    ours = ((kaldi_fbank_rows(x64 * 2**15, num_bins)[0] - FBANK_MEAN) / (2 * FBANK_STD)).numpy()
    assert ours.shape == theirs.shape == (1 + (n - 400) // 160, num_bins)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_beats_fbank_batch_of_odd_lengths_equals_each_row_and_the_reference():
    # One padded batch, one FFT: every row must still equal its own float64 Kaldi reference, frames of the
    # padding must not leak into a shorter row, and rows too short for one frame give [0, 128].
    rng = np.random.default_rng(16)
    lengths = [16000 * 2 + 77, 401, 399, 5000, 400, 16000 * 2 + 77]
    rows = [(0.3 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    rows[3][1000:3000] *= 1e-4  # a quiet stretch next to loud ones: float32 FFTs would lose it
    rows[-1] = rows[0].copy()
    got = beats_fbank(rows)
    assert [tuple(g.shape) for g in got] == [(1 + (n - 400) // 160 if n >= 400 else 0, 128) for n in lengths]
    for g, r in zip(got, rows):
        assert g.dtype == torch.float32 and g.is_contiguous()
        if r.shape[0] >= 400:
            ref = (kaldi_fbank_numpy(r.astype(np.float64) * 2**15) - 15.41663) / (2 * 6.55582)
            np.testing.assert_allclose(g.numpy(), ref, rtol=0, atol=1e-4)
        np.testing.assert_allclose(g.numpy(), beats_fbank(r).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[0].numpy(), got[-1].numpy())  # same input, same row, wherever it sits
    assert beats_fbank([rows[2]])[0].shape == (0, 128)


@pytest.mark.gpu
def test_beats_fbank_batch_on_gpu_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rng = np.random.default_rng(5)
    rows = [torch.from_numpy((0.3 * rng.standard_normal(n)).astype(np.float32)) for n in (16000 * 10, 16000 * 3 + 5)]
    cpu = beats_fbank(rows)
    gpu = beats_fbank([r.cuda() for r in rows])
    for c, g in zip(cpu, gpu):
        assert g.is_cuda
        torch.testing.assert_close(g.cpu(), c, rtol=0, atol=1e-4)
