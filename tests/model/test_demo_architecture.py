"""wave_rt.model.demo_architecture is the bundled demo model's architecture: a random checkpoint of it has the
trained asset's tokenizer, config and tensor layout, so `init_tiny` training starts from the shipped model's
shape and the stripped-install fallback loads like it."""

from __future__ import annotations

import json

from safetensors import safe_open

from wave_rt.model.demo import TRAINED_DEMO_DIR
from wave_rt.model.demo_architecture import random_demo_checkpoint


def _without_rope_type(config: dict) -> dict:
    # transformers writes the rope type a second time, as "type", when it saves a config
    rope = {k: v for k, v in config["text_config"]["rope_parameters"].items() if k != "type"}
    # ...and records its own version, which differs on every image that runs this (the GPU image: 5.17)
    out = {k: v for k, v in config.items() if k != "transformers_version"}
    return {**out, "text_config": {**config["text_config"], "rope_parameters": rope}}


def test_random_demo_checkpoint_has_the_bundled_models_architecture(tmp_path):
    out = random_demo_checkpoint(tmp_path / "init", seed=1234)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (TRAINED_DEMO_DIR / name).read_bytes(), name
    ours = json.loads((out / "config.json").read_text())
    shipped = json.loads((TRAINED_DEMO_DIR / "config.json").read_text())
    assert _without_rope_type(ours) == _without_rope_type(shipped)
    with safe_open(str(out / "model.safetensors"), "pt") as a, \
            safe_open(str(TRAINED_DEMO_DIR / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(a.get_slice(k).get_shape() == b.get_slice(k).get_shape() for k in a.keys())
        # random, not a copy of the trained weights
        key = next(k for k in a.keys() if k.startswith("classify_linear"))
        assert not bool((a.get_tensor(key) == b.get_tensor(key)).all())


def test_seeded_and_recipe_variants(tmp_path):
    a = random_demo_checkpoint(tmp_path / "a", seed=3)
    b = random_demo_checkpoint(tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    plain = random_demo_checkpoint(tmp_path / "plain", recipe="last_token", use_beats=False)
    config = json.loads((plain / "config.json").read_text())
    assert not config.get("train_classify") and config["wave_rt"]["beats"] is None
    assert config["wave_rt"]["recipe"] == "last_token"
    with safe_open(str(plain / "model.safetensors"), "pt") as f:
        assert not any(k.startswith(("beats", "classify_linear")) for k in f.keys())
