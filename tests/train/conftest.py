"""Tiny trainable models for the training tests: one checkpoint per pooling recipe, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny_checkpoints import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("train-ckpts")
    return {pooling: make_tiny_checkpoint(root / pooling, recipe=pooling, use_beats=False, seed=3, layers=2)
            for pooling in ("all_layer", "last_token", "eos_projection")}

