"""The bundled demo model: the tiny architecture TRAINED on a synthetic captioned corpus.

The weights ship in the package (wave_rt/assets/demo_model, about 1.4 MB; `python -m wave_rt.train.demo`
reproduces them from wave_rt/train/demo_corpus.py and assets/demo_model/train.toml). It knows tones and
chords ("a high chord"), a dozen spoken words, coloured circles and squares moving left or right, and their
audio-visual combinations; held-out metrics in bench/results/demo_eval.json. Anything else it embeds
without meaning: load a real WAVE checkpoint with WaveEncoder.from_pretrained(path).

Without the bundled weights (a stripped install) it falls back to the untrained random model, generated
on first use into the cache directory, atomically (temp dir + rename).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_MODEL_ID = "wave_rt-demo"
DEMO_VERSION = 1
TRAINED_DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"


def cache_dir() -> Path:
    root = os.environ.get("WAVE_RT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wave_rt")
    return Path(root)


def demo_checkpoint() -> Path:
    """Path of the demo checkpoint: the bundled trained model, else the untrained one (generated on first use)."""
    if (TRAINED_DEMO_DIR / "model.safetensors").exists():
        return TRAINED_DEMO_DIR
    from wave_rt.model.demo_architecture import random_demo_checkpoint

    target = cache_dir() / f"demo-model-v{DEMO_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=target.parent))
    try:
        random_demo_checkpoint(tmp, recipe="all_layer", use_beats=True, seed=1234)
        (tmp / "README.txt").write_text(
            "wave_rt demo model: tiny random weights, UNTRAINED. Its embeddings carry no meaning; it exists to run\n"
            "the pipeline end to end. Load a real WAVE checkpoint with WaveEncoder.from_pretrained(path).\n"
        )
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race: use its copy.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
