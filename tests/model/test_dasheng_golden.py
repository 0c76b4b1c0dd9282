"""Our whole Dasheng path (front end + encoder) == golden outputs of the real dasheng package with its torchaudio
front end, made by bench/make_dasheng_fixtures.py in a torch 2.11 + torchaudio 2.11 environment (a fresh PyPI venv on a
CPU; the GPU image's `fixtures` stage regenerates them) and committed under tests/model/fixtures/
(WAVE_RT_DASHENG_FIXTURES overrides the folder).

What only these fixtures add: the real torchaudio. The encoder already runs against the real dasheng code on every
CPU run (test_dasheng_encoder, test_dasheng_midashenglm: the pinned dasheng wheel on the same log-mel input), and the
front end against transformers' audio_utils and a float64 restatement (test_dasheng_frontend); here the front end
is torchaudio's own MelSpectrogram + AmplitudeToDB, and the encoder is fed from the waveform by dasheng itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from wave_rt.media.features_dasheng import dasheng_log_mel
from wave_rt.model.dasheng import DashengConfig, DashengEncoder

FIXTURES = Path(os.environ.get("WAVE_RT_DASHENG_FIXTURES", Path(__file__).parent / "fixtures"))
TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def golden():
    manifest = FIXTURES / "dasheng_golden.json"
    assert manifest.exists(), f"no golden Dasheng fixtures in {FIXTURES}: bench/make_dasheng_fixtures.py makes them"
    meta = json.loads(manifest.read_text())
    assert not meta["partial"], "fixtures are partial: the generating run did not finish"
    from safetensors.torch import load_file

    return meta, load_file(str(FIXTURES / meta["file"]))


def test_front_end_equals_torchaudio(golden):
    meta, t = golden
    for i, _ in enumerate(meta["lengths"]):
        assert (dasheng_log_mel(t[f"wav.{i}"], bf16_buffers=False) - t[f"mel.{i}"]).abs().max() < 1e-3
        assert (dasheng_log_mel(t[f"wav.{i}"], bf16_buffers=True) - t[f"mel_bf16.{i}"]).abs().max() < 1e-3


def test_encoder_equals_dasheng_from_waveform(golden):
    meta, t = golden
    c = meta["config"]
    cfg = DashengConfig(embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
                        qkv_bias=c["qkv_bias"], init_values=c["init_values"], patch_size=list(c["patch_size"]),
                        patch_stride=list(c["patch_stride"]), target_length=c["target_length"])
    ours = DashengEncoder(cfg).eval()
    sd = {k[len("weights."):].replace("init_bn.1.", "init_bn."): v for k, v in t.items() if k.startswith("weights.")}
    ours.load_state_dict(sd, strict=True)
    for i, _ in enumerate(meta["lengths"]):
        mel = dasheng_log_mel(t[f"wav.{i}"], bf16_buffers=False)
        with torch.no_grad():
            got = ours(mel[None], DashengEncoder.valid_patches(torch.tensor([mel.shape[-1]])))[0]
        assert got.shape == t[f"tokens.{i}"].shape
        assert rel(got, t[f"tokens.{i}"]) <= TOL, (i, rel(got, t[f"tokens.{i}"]))
