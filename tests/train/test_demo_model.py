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


@pytest.fixture(scope="module")
def heldout_report(tmp_path_factory):  # noqa: ANN001, ANN201
    manifest = generate_corpus(tmp_path_factory.mktemp("heldout"), seed=1, n_per_class=2)
    return evaluate(manifest, "demo", device="cpu")


def test_trained_demo_model_heldout_recall(heldout_report):
    modalities = ["modality=audio", "modality=video", "modality=av"]
    assert set(modalities) <= set(heldout_report.groups)
    for group in modalities:
        g = heldout_report.groups[group]
        assert g["q2t_R@1"] >= 0.9 and g["t2q_R@1"] >= 0.9, (group, g)


# The spoken-word family needs espeak-ng (a system tool, `apt-get install espeak-ng`): where it is missing the
# corpus has no speech items, and this check is not collected rather than skipped (the rest above still runs).
if espeak_available():

    def test_spoken_words_are_in_the_heldout_corpus(heldout_report):
        assert heldout_report.groups["task=speech"]["n"] == 24
