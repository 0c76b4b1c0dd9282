"""The bundled trained demo model on the held-out synthetic corpus (seed 1, two clips per caption class, as
bench/results/demo_eval.json): text->media and media->text R@1 >= 0.9 for every modality."""

from __future__ import annotations

import pytest

from wave_rt.eval import evaluate
from wave_rt.model.demo import TRAINED_DEMO_DIR, demo_checkpoint
from wave_rt.train.demo_corpus import espeak_available, generate_corpus


def test_bundled_demo_model_is_the_trained_one():
    assert (TRAINED_DEMO_DIR / "model.safetensors").exists()
    assert demo_checkpoint() == TRAINED_DEMO_DIR


def test_trained_demo_model_heldout_recall(tmp_path):
    manifest = generate_corpus(tmp_path, seed=1, n_per_class=2)
    report = evaluate(manifest, "demo", device="cpu")
    modalities = ["modality=audio", "modality=video", "modality=av"]
    assert set(modalities) <= set(report.groups)
    if espeak_available():
        assert report.groups["task=speech"]["n"] == 24
    for group in modalities:
        g = report.groups[group]
        assert g["q2t_R@1"] >= 0.9 and g["t2q_R@1"] >= 0.9, (group, g)
    if not espeak_available():
        pytest.skip("espeak-ng not installed: the spoken-word family was not checked (apt-get install espeak-ng)")
