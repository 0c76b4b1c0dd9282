"""wave_rt: a compiled-kernel embedding runtime for WAVE-style omni models.

Public names are imported lazily so that `import wave_rt` stays cheap (no torch/transformers
import until a model or item type is used), in the manner of vLLM's lazy registry.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "WaveEncoder": "wave_rt.embed.encoder",
    "similarity": "wave_rt.embed.encoder",
    "WaveConfig": "wave_rt.config",
    "WaveModel": "wave_rt.model.wave_model",
    "Text": "wave_rt.items",
    "Audio": "wave_rt.items",
    "Video": "wave_rt.items",
    "AudioVisual": "wave_rt.items",
    "embed_archive": "wave_rt.archive.job",
    "JobOptions": "wave_rt.archive.options",
    "JobOptionsError": "wave_rt.archive.errors",
    "Index": "wave_rt.archive.index",
    "WaveRTError": "wave_rt.errors",
    "CheckpointError": "wave_rt.errors",
    "InputError": "wave_rt.errors",
    "UnsupportedItemError": "wave_rt.errors",
    "MediaError": "wave_rt.errors",
    "MissingDependencyError": "wave_rt.errors",
    "DeviceError": "wave_rt.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wave_rt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from wave_rt.archive.errors import JobOptionsError
    from wave_rt.archive.index import Index
    from wave_rt.archive.job import embed_archive
    from wave_rt.archive.options import JobOptions
    from wave_rt.config import WaveConfig
    from wave_rt.embed.encoder import WaveEncoder, similarity
    from wave_rt.errors import (
        CheckpointError,
        DeviceError,
        InputError,
        MediaError,
        MissingDependencyError,
        UnsupportedItemError,
        WaveRTError,
    )
    from wave_rt.items import Audio, AudioVisual, Text, Video
    from wave_rt.model.wave_model import WaveModel
