"""Our Dasheng encoder == the `dasheng` package's encoder on the same weights and the same log-mel input,
for a padded batch spanning several chunks (one item with an all-padding chunk), and batch invariance."""

from __future__ import annotations

import dasheng_reference as dref
import torch

from wave_rt.media.features_dasheng import dasheng_log_mel
from wave_rt.model.dasheng import DashengConfig, DashengEncoder

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mels = [dasheng_log_mel(0.3 * torch.randn(n, generator=gen)) for n in lengths]
    t_max = max(m.shape[-1] for m in mels)
    batch = torch.full((len(mels), 64, t_max), -100.0)  # padding value is irrelevant: those keys are masked
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[-1]] = m
    return batch, torch.tensor([m.shape[-1] for m in mels])


def test_equals_dasheng_package_on_padded_multichunk_batch():
    cfg = DashengConfig.tiny()  # 10 patches per chunk
    ref = dref.reference_encoder(cfg, seed=1)
    ours = dref.ours_from_reference(ref, cfg)
    samples = [13000, 7777, 4500, 6719]  # 82 / 49 / 29 / 42 frames: 2 chunks; 4500 has an all-padding chunk
    mel, frames = _batch(samples)
    valid = DashengEncoder.valid_patches(frames)
    assert valid.tolist() == [n // 640 for n in samples]  # the reference's (x_length / (hop * 4)).long()
    expected = dref.reference_tokens(ref, mel, torch.tensor(samples))
    with torch.no_grad():
        got = ours(mel, valid)
    assert got.shape == expected.shape == (4, mel.shape[-1] // 4, cfg.embed_dim)
    assert torch.isfinite(got).all()
    assert rel(got, expected) <= TOL, rel(got, expected)
    # per item too, so a large item cannot hide a wrong small one
    for i in range(len(samples)):
        assert rel(got[i], expected[i]) <= TOL, (i, rel(got[i], expected[i]))


def test_unpadded_single_item_equals_reference_without_lengths():
    cfg = DashengConfig.tiny()
    ref = dref.reference_encoder(cfg, seed=2)
    ours = dref.ours_from_reference(ref, cfg)
    n = 640 * 23 + 480  # (n // 160) % 4 == 3: the last patch is a masked key when lengths are given
    mel, frames = _batch([n], seed=3)
    with torch.no_grad():
        assert rel(ours(mel, None), dref.reference_tokens(ref, mel, None)) <= TOL
        assert rel(ours(mel, DashengEncoder.valid_patches(frames)), dref.reference_tokens(ref, mel, torch.tensor([n]))) <= TOL


def test_batch_invariance_of_valid_tokens():
    cfg = DashengConfig.tiny()
    torch.manual_seed(0)
    enc = DashengEncoder(cfg).eval()
    samples = [13000, 4500, 9001]
    mel, frames = _batch(samples, seed=4)
    valid = DashengEncoder.valid_patches(frames)
    with torch.no_grad():
        together = enc(mel, valid)
        for i, f in enumerate(frames.tolist()):
            alone = enc(mel[i: i + 1, :, :f], valid[i: i + 1])
            n_valid = int(valid[i])
            assert rel(together[i, :n_valid], alone[0, :n_valid]) <= TOL, i


def test_reference_is_the_pinned_dasheng_wheel():
    """The reference class comes from the released dasheng 0.0.9 wheel (sha256-pinned), not a copy in this repo."""
    import importlib.metadata
    import sys

    Dasheng = dref.import_dasheng()
    unpacked = dref._unpacked_wheel()
    assert sys.modules[Dasheng.__module__].__file__.startswith(unpacked)
    assert dref._sha256(dref.dasheng_wheel()) == dref.DASHENG_WHEEL_SHA256
    dist = next(d for d in importlib.metadata.distributions(path=[unpacked]) if d.metadata["Name"] == "dasheng")
    assert dist.version == dref.DASHENG_VERSION


def test_torchaudio_shim_fails_loudly():
    """Where torchaudio is missing, dasheng's front end (the only part that would use it) raises instead of running,
    so every comparison above, which passes, never went through the fake torchaudio."""
    import pytest

    ref = dref.reference_encoder(DashengConfig.tiny(), seed=5)
    if not dref.torchaudio_is_shimmed():
        pytest.skip("the real torchaudio is installed here: dasheng's front end runs (test_dasheng_golden covers it)")
    wav = 0.3 * torch.randn(1, 16000)
    with pytest.raises(RuntimeError, match="torchaudio shim"):
        ref.front_end(wav)
    with pytest.raises(RuntimeError, match="torchaudio shim"):
        ref(wav)  # dasheng's waveform entry point goes through the front end
    models = __import__(type(ref).__mro__[1].__module__, fromlist=["audio_transforms"])
    with pytest.raises(RuntimeError, match="torchaudio shim"):
        _ = models.audio_transforms.Spectrogram  # any other torchaudio use is loud too
