"""Every recipe's heads through the exported decoder: last_layer (its last_layer head), eos_projection (ALM2Vec),
last_token (no head) as decoder-only bundles on ONNX Runtime CPU and AOTInductor CPU, text targets and
text queries at three batch sizes (all_layer is covered with every stage in test_export_parity.py)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_checkpoints import make_tiny_checkpoint
from wave_rt.export.bundle import export_bundle

import wave_rt
from wave_rt.embed.encoder import WaveEncoder
from wave_rt.errors import CheckpointError

BATCHES = (["a dog barks"], [wave_rt.Text("find rain", side="query"), "rain on a roof at night"],
           ["x", wave_rt.Text("q", side="query"), "a violin solo in a large hall", wave_rt.Text("more words here", side="query")])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["last_layer", "eos_projection", "last_token"])
def test_recipe_heads_match_pytorch(tmp_path, recipe):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", recipe=recipe, use_beats=False, seed=21, layers=2)
    bundle = export_bundle(ckpt, tmp_path / "bundle", formats=("onnx", "aoti"), stages=("decoder",))
    reference = WaveEncoder.from_pretrained(ckpt, device="cpu")
    for backend in ("onnxruntime", "aoti"):
        engine = WaveEncoder.from_pretrained(bundle, backend=backend, device="cpu")
        for items in BATCHES:
            want = reference.encode(items, normalize=False, batch_size=len(items))
            got = engine.encode(items, normalize=False, batch_size=len(items))
            rel = np.abs(want - got).max(axis=1) / np.abs(want).max(axis=1)
            assert rel.max() <= 1e-4, (recipe, backend, rel)
        # A decoder-only bundle refuses media with the stage it lacks named.
        with pytest.raises(CheckpointError, match="audio_tower"):
            engine.encode(wave_rt.Audio(np.zeros(16000, dtype=np.float32), sample_rate=16000))
