"""One tiny WAVE checkpoint exported once per session (ONNX + AOTInductor CPU compiles take tens of seconds
each on a shared 2-core machine); tests that tamper with a bundle work on copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tiny_checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="session")
def wave_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("export-ckpt"), recipe="all_layer", use_beats=True, seed=11)


@pytest.fixture(scope="session")
def wave_bundle(tmp_path_factory, wave_checkpoint) -> Path:
    """The all_layer WAVE model (audio tower, BEATs, vision, decoder with both heads) as ONNX + AOTInductor."""
    from wave_rt.export.bundle import export_bundle

    return export_bundle(wave_checkpoint, tmp_path_factory.mktemp("export") / "bundle", formats=("onnx", "aoti"))


@pytest.fixture
def bundle_copy(tmp_path, wave_bundle) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(wave_bundle, dst)
    return dst
