"""The demo model's recipe, shortened: the committed generator and config (wave_rt/assets/demo_model/train.toml)
retrain deterministically (bit-identical losses and weights from two runs) and the weights move."""

from __future__ import annotations

import json

import torch

from wave_rt.train.demo import ASSET_DIR, CONFIG_NAME, demo_config
from wave_rt.train.demo_corpus import classes, generate_corpus
from wave_rt.train.trainer import fit


def test_demo_corpus_classes_and_manifest(tmp_path):
    manifest = generate_corpus(tmp_path, seed=5, n_per_class=1, speech=False)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 36 and {r["task"] for r in rows} == {"tones", "shapes", "av"}
    assert "a red circle moving to the left" in {r["target_text"] for r in rows}
    assert len(classes(speech=True)["speech"]) == 12
    again = generate_corpus(tmp_path / "again", seed=5, n_per_class=1, speech=False)
    assert again.read_text() == manifest.read_text()


def test_demo_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    manifest = generate_corpus(tmp_path / "corpus", seed=0, n_per_class=1, speech=False)
    assert (ASSET_DIR / CONFIG_NAME).exists()
    results = []
    for tag in ("a", "b"):
        cfg = demo_config(tmp_path / tag, manifest, overrides={"optim": {"max_steps": 3, "warmup_steps": 1}})
        results.append(fit(cfg))
    a, b = results
    assert a.steps == b.steps == 3 and a.losses == b.losses
    assert all(torch.isfinite(torch.tensor(a.losses)))
    wa = load_file(str(a.final_model / "model.safetensors"))
    wb = load_file(str(b.final_model / "model.safetensors"))
    init = load_file(str(tmp_path / "a" / "run" / "init" / "model.safetensors"))
    assert wa.keys() == wb.keys() == init.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], init[k]) for k in wa)
