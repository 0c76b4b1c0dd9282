"""The `dasheng` package (PyPI 0.0.9, the Dasheng encoder's reference implementation) as a test reference.

Why not a test extra: dasheng 0.0.9 declares torchaudio as a hard dependency, and torchaudio has no build for the
CPU torch we pin, so pip cannot resolve `dasheng` beside it. Instead the tests run the real package code from its
released wheel, pinned by sha256 here: `pip download --no-deps dasheng==0.0.9` fetches it once into the wave_rt
cache ($WAVE_RT_CACHE or ~/.cache/wave_rt; network needed on that first run, as for the install itself), the
digest is checked, and the wheel (pure Python) is unpacked into a temporary folder that is on sys.path for
the import only. Nothing is installed into the environment and no dasheng code is vendored. Offline: set WAVE_RT_DASHENG_WHEEL to a copy of
that wheel (the digest is checked all the same). When the wheel cannot be had the tests fail, they do not skip.

dasheng imports `torchaudio.transforms` at import time and builds a MelSpectrogram front end in its constructor.
When torchaudio is missing, a TEST-ONLY shim stands in under that module name for the duration of the import:
its MelSpectrogram/AmplitudeToDB are empty modules whose forward raises, and any other attribute raises on
access, so dasheng's code cannot use torchaudio without the test failing. The reference is fed log-mel features
directly (`init_bn` + `forward_spectrogram`, never `front_end`); the front end is compared separately
(test_dasheng_frontend.py: transformers' audio_utils and a float64 numpy restatement; test_dasheng_golden.py:
the real torchaudio, fixtures made on the GPU image by bench/make_dasheng_fixtures.py).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import pytest
import torch
from dasheng_random import randomize_constants
from torch import nn

DASHENG_VERSION = "0.0.9"
DASHENG_WHEEL = f"dasheng-{DASHENG_VERSION}-py3-none-any.whl"
# sha256 of the PyPI file (https://pypi.org/project/dasheng/0.0.9/#files)
DASHENG_WHEEL_SHA256 = "2c6fd5f8e48360ebf38937efeca340c45590105ab91b24e88d1b2265642e5de6"
SHIM_MESSAGE = "torchaudio shim: the real torchaudio is not installed; dasheng's reference must be fed log-mel features"


class _Unavailable(nn.Module):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError(SHIM_MESSAGE)


class _ShimModule(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{SHIM_MESSAGE} (dasheng asked for torchaudio attribute {self.__name__}.{name})")


def _shim() -> dict[str, types.ModuleType]:
    root = _ShimModule("torchaudio")
    transforms = _ShimModule("torchaudio.transforms")
    transforms.MelSpectrogram = _Unavailable
    transforms.AmplitudeToDB = _Unavailable
    root.transforms = transforms
    root.__wave_rt_test_shim__ = True
    return {"torchaudio": root, "torchaudio.transforms": transforms}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dasheng_wheel() -> Path:
    """The pinned dasheng wheel: $WAVE_RT_DASHENG_WHEEL, else the wave_rt cache, downloaded there on first use."""
    given = os.environ.get("WAVE_RT_DASHENG_WHEEL")
    if given:
        wheel = Path(given)
        if not wheel.is_file():
            pytest.fail(f"WAVE_RT_DASHENG_WHEEL={given}: no such file")
    else:
        from wave_rt.model.demo import cache_dir

        folder = cache_dir() / "test-references"
        wheel = folder / DASHENG_WHEEL
        if not wheel.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       f"dasheng=={DASHENG_VERSION}", "-d", tmp]
                got = subprocess.run(cmd, capture_output=True, text=True)
                fetched = Path(tmp) / DASHENG_WHEEL
                if got.returncode != 0 or not fetched.is_file():
                    pytest.fail(f"could not fetch the dasheng reference wheel ({' '.join(cmd[2:])}); the Dasheng "
                                f"reference tests need network on first run, or WAVE_RT_DASHENG_WHEEL=<path to "
                                f"{DASHENG_WHEEL}>:\n{got.stderr[-2000:]}")
                if _sha256(fetched) != DASHENG_WHEEL_SHA256:
                    pytest.fail(f"downloaded {DASHENG_WHEEL} has sha256 {_sha256(fetched)}, pinned {DASHENG_WHEEL_SHA256}")
                os.replace(fetched, wheel)
    digest = _sha256(wheel)
    if digest != DASHENG_WHEEL_SHA256:
        pytest.fail(f"{wheel}: sha256 {digest} is not the pinned dasheng {DASHENG_VERSION} wheel's {DASHENG_WHEEL_SHA256}")
    return wheel


@functools.cache
def _unpacked_wheel() -> str:
    """The verified wheel unpacked into a fresh temporary folder for this process (removed at exit). Unpacked
    because dasheng's subpackages have no __init__.py, and zipimport cannot import namespace packages."""
    wheel = dasheng_wheel()
    folder = tempfile.mkdtemp(prefix="wave_rt-dasheng-ref-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(folder)
    return folder


@functools.cache
def _dasheng_module() -> types.ModuleType:
    wheel = _unpacked_wheel()
    try:
        importlib.import_module("torchaudio")
        shimmed: dict[str, types.ModuleType] = {}
    except ImportError:
        shimmed = _shim()
    for name in [m for m in sys.modules if m == "dasheng" or m.startswith("dasheng.")]:
        del sys.modules[name]  # an installed copy imported earlier must not stand in for the pinned wheel
    saved = {k: sys.modules.get(k) for k in shimmed}
    sys.modules.update(shimmed)
    sys.path.insert(0, wheel)
    try:
        mod = importlib.import_module("dasheng.pretrained.pretrained")
    finally:
        sys.path.remove(wheel)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    if not str(mod.__file__).startswith(wheel):
        pytest.fail(f"dasheng was imported from {mod.__file__}, not from the pinned wheel unpacked in {wheel}")
    return mod


def torchaudio_is_shimmed() -> bool:
    """True when dasheng's `torchaudio` is the test shim (no real torchaudio in this environment)."""
    models = sys.modules[_dasheng_module().AudioTransformerMAE_Encoder.__module__]
    return isinstance(models.audio_transforms, _ShimModule)


def import_dasheng() -> type:
    """The `Dasheng` encoder class from the pinned dasheng wheel (needs einops, a test dependency)."""
    return _dasheng_module().Dasheng


def reference_encoder(cfg, seed: int = 0):
    """A dasheng-package encoder with `cfg`'s shape and random weights, BatchNorm statistics and LayerScales."""
    Dasheng = import_dasheng()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = Dasheng(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                      qkv_bias=cfg.qkv_bias, init_values=cfg.init_values, patch_size=tuple(cfg.patch_size),
                      patch_stride=tuple(cfg.patch_stride), target_length=cfg.target_length, n_mels=cfg.n_mels,
                      hop_size=cfg.hop_length)
        randomize_constants(ref)
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
