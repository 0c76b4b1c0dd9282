"""Contrastive fine-tuning: GradCache over the info_nce kernel, recipes as configs, `fit(config)`.

`wave_rt.train.fit` is imported lazily so that `import wave_rt.train.gradcache` stays light."""

from __future__ import annotations

from typing import Any


def fit(config: Any, *, resume: bool = False) -> Any:
    """Train from a TrainConfig, a dict or a TOML file path; see wave_rt.train.trainer.fit."""
    from wave_rt.train.trainer import fit as _fit

    return _fit(config, resume=resume)


__all__ = ["fit"]
