"""The Ray driver reads the model's identity (id, fingerprint, dtype, width) from the checkpoint files: it
never builds the model or reads a weight tensor, and it reports exactly what a loaded encoder reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_checkpoints import make_tiny_checkpoint

from wave_rt.archive import job
from wave_rt.archive.options import JobOptions
from wave_rt.embed.encoder import WaveEncoder
from wave_rt.embed.identity import ModelIdentity, read_identity
from wave_rt.model import beats, loading
from wave_rt.model.wave_model import WaveModel

CHECKPOINTS = {
    "beats_in_safetensors": dict(recipe="all_layer", use_beats=True),
    "beats_as_released_pt": dict(recipe="all_layer", use_beats=True, beats_in_safetensors=False),
    "plain_thinker": dict(recipe="last_token", use_beats=False),
}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), seed=3, **CHECKPOINTS[request.param])


def _no_weights(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every way of materializing weights fail loudly (and record the attempt)."""
    calls: list[str] = []

    def forbid(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"the driver materialized weights through {name}")
        return fail

    monkeypatch.setattr(WaveModel, "build", classmethod(lambda cls, *a, **k: forbid("WaveModel.build")()))
    monkeypatch.setattr(loading, "load_wave_model", forbid("load_wave_model"))
    monkeypatch.setattr(loading._TensorSource, "get", forbid("_TensorSource.get"))
    monkeypatch.setattr(beats, "load_beats_state_dict", forbid("load_beats_state_dict"))
    monkeypatch.setattr(WaveEncoder, "from_pretrained", classmethod(lambda cls, *a, **k: forbid("from_pretrained")()))
    return calls


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_identity_from_files_equals_the_loaded_encoder(checkpoint, dtype, monkeypatch):
    enc = WaveEncoder.from_pretrained(checkpoint, device="cpu", dtype=dtype)
    expected = ModelIdentity(enc.model_id, enc.fingerprint, enc.dtype, enc.dim)
    calls = _no_weights(monkeypatch)
    got = job.load_encoder(str(checkpoint), JobOptions(dtype=dtype, engine="ray"))
    assert got == expected
    assert calls == []


def test_demo_model_identity(monkeypatch):
    enc = WaveEncoder.from_pretrained(None, device="cpu", dtype=torch.float32)
    calls = _no_weights(monkeypatch)
    got = read_identity(None, torch.float32)
    assert (got.model_id, got.fingerprint, got.dim) == (enc.model_id, enc.fingerprint, enc.dim)
    assert calls == []


def test_identity_changes_with_what_changes_embeddings(checkpoint):
    a = read_identity(checkpoint, "fp32")
    assert read_identity(checkpoint, "fp32") == a
    assert read_identity(checkpoint, "bf16").fingerprint != a.fingerprint
    other = make_tiny_checkpoint(checkpoint.parent / "other", seed=4, **CHECKPOINTS["beats_in_safetensors"])
    assert read_identity(other, "fp32").fingerprint != a.fingerprint


def test_the_forbidding_works(checkpoint, monkeypatch):
    """The guard above is not vacuous: loading the encoder under it fails."""
    calls = _no_weights(monkeypatch)
    with pytest.raises(AssertionError, match="materialized weights"):
        job.load_encoder(str(checkpoint), JobOptions(device="cpu", dtype="fp32"))
    assert calls
