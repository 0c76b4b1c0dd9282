"""The archive job with deferred features (what a CUDA encoder does by default, forced here on the CPU): decode
threads and spawn workers prepare raw samples and frames, the model stage computes the features in batch; the
archive equals the one the eager per-item features give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from archive_helpers import make_media_archive, read_archive
from tiny_checkpoints import make_tiny_checkpoint

from wave_rt.archive.job import embed_archive
from wave_rt.embed.encoder import WaveEncoder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("wave"), use_beats=True, seed=4)


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_deferred_archive_equals_eager(tmp_path: Path, checkpoint: Path, decode: str) -> None:
    media = make_media_archive(tmp_path / "media")
    out = {}
    for gpu_features in (False, True):
        enc = WaveEncoder.from_pretrained(checkpoint, device="cpu", dtype=torch.float32, gpu_features=gpu_features)
        staged: list[bool] = []
        real = enc.stage

        def spy(batch, real=real, staged=staged):
            staged.extend(p.inputs.deferred for p in batch if p.modality != "text")
            return real(batch)

        enc.stage = spy
        dest = tmp_path / f"{decode}-{gpu_features}"
        embed_archive(media, dest, model=enc, workers=2, decode=decode, progress=False)
        assert staged and all(s == gpu_features for s in staged)  # the path under test really ran
        out[gpu_features] = read_archive(dest)
    eager, deferred = out[False], out[True]
    assert eager.keys() == deferred.keys() and len(eager) >= 6
    for key, row in eager.items():
        assert np.abs(row["embedding"] - deferred[key]["embedding"]).max() <= 1e-5, key  # float32 shards
        assert row["modality"] == deferred[key]["modality"] and row["duration"] == deferred[key]["duration"]
