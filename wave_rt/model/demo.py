"""The bundled demo model: tiny, deterministic, UNTRAINED (random weights).

It exists so that `wave-rt embed demo ...` and the API run end to end on any machine without a
download; its embeddings carry no meaning. It is generated on first use (about a megabyte) into the
cache directory and reused afterwards; generation is atomic (temp dir + rename), so concurrent
workers never see a half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_MODEL_ID = "wave_rt-demo-untrained"
DEMO_VERSION = 1


def cache_dir() -> Path:
    root = os.environ.get("WAVE_RT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wave_rt")
    return Path(root)


def demo_checkpoint() -> Path:
    """Path of the demo checkpoint, generating it on first use."""
    from wave_rt.model.tiny import make_tiny_checkpoint

    target = cache_dir() / f"demo-model-v{DEMO_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=target.parent))
    try:
        make_tiny_checkpoint(tmp, recipe="all_layer", use_beats=True, seed=1234)
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
