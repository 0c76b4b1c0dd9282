"""The `dasheng` package (PyPI 0.0.9, the Dasheng encoder's reference implementation) as a test reference.

`dasheng` imports `torchaudio.transforms` at import time and builds a MelSpectrogram front end in its
constructor; torchaudio has no build for the CPU torch we pin. When torchaudio is missing, a TEST-ONLY shim is
installed under that module name for the duration of the import: its MelSpectrogram/AmplitudeToDB are empty
modules whose forward raises, so any attempt to actually use torchaudio fails loudly. The reference is then fed
log-mel features directly (`init_bn` + `forward_spectrogram`, bypassing `front_end`); the front end itself is
tested against a float64 numpy implementation (test_dasheng_frontend.py), and golden outputs with the real
torchaudio front end come from bench/make_dasheng_fixtures.py on the GPU image.

Install for these tests: pip install --no-deps dasheng==0.0.9 einops
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
from torch import nn


class _Unavailable(nn.Module):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("torchaudio shim: the real torchaudio is not installed; feed log-mel features instead")


def _shim() -> dict[str, types.ModuleType]:
    root = types.ModuleType("torchaudio")
    transforms = types.ModuleType("torchaudio.transforms")
    transforms.MelSpectrogram = _Unavailable
    transforms.AmplitudeToDB = _Unavailable
    root.transforms = transforms
    root.__wave_rt_test_shim__ = True
    return {"torchaudio": root, "torchaudio.transforms": transforms}


def import_dasheng():
    """The `Dasheng` encoder class from the dasheng package (skips the test when the package is absent)."""
    pytest.importorskip("einops", reason="dasheng reference needs einops: pip install einops")
    try:
        importlib.import_module("torchaudio")
        shimmed: dict[str, types.ModuleType] = {}
    except ImportError:
        shimmed = _shim()
    saved = {k: sys.modules.get(k) for k in shimmed}
    sys.modules.update(shimmed)
    try:
        mod = pytest.importorskip("dasheng.pretrained.pretrained",
                                  reason="reference package missing: pip install --no-deps dasheng==0.0.9 einops")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod.Dasheng


def reference_encoder(cfg, seed: int = 0):
    """A dasheng-package encoder with `cfg`'s shape and random weights, BatchNorm statistics and LayerScales."""
    Dasheng = import_dasheng()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = Dasheng(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                      qkv_bias=cfg.qkv_bias, init_values=cfg.init_values, patch_size=tuple(cfg.patch_size),
                      patch_stride=tuple(cfg.patch_stride), target_length=cfg.target_length, n_mels=cfg.n_mels,
                      hop_size=cfg.hop_length)
        with torch.no_grad():
            # Non-trivial values everywhere the constructor leaves constants (BN stats, LN affine, biases, gammas).
            for name, p in ref.named_parameters():
                if p.ndim == 1:
                    p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith(("weight", "gamma")) else 0.1 * torch.randn_like(p))
            bn = ref.init_bn[1]
            bn.running_mean.copy_(-40 + 10 * torch.randn_like(bn.running_mean))
            bn.running_var.copy_(50 + 20 * torch.rand_like(bn.running_var))
    return ref.eval()


def ours_from_reference(ref, cfg):
    """Our DashengEncoder holding `ref`'s weights (dasheng's `init_bn.1.*` is MiDashengLM's `init_bn.*`)."""
    from wave_rt.model.dasheng import DashengEncoder

    ours = DashengEncoder(cfg).eval()
    sd = {k.replace("init_bn.1.", "init_bn."): v for k, v in ref.state_dict().items()}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert sorted(missing) == ["front_end.0.mel_scale.fb", "front_end.0.spectrogram.window"], missing
    return ours


def reference_tokens(ref, mel: torch.Tensor, num_samples: torch.Tensor) -> torch.Tensor:
    """dasheng's own path from log-mel [B, 64, T] and waveform lengths: init_bn, then forward_spectrogram."""
    with torch.no_grad():
        return ref.forward_spectrogram(ref.init_bn(mel.unsqueeze(1)), x_length=num_samples)
