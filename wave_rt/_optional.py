"""Lazy imports for heavy optional dependencies, each failing with the pip command that fixes it."""

from __future__ import annotations

import importlib
from types import ModuleType

from wave_rt.errors import MissingDependencyError

# module name -> the install line a user copies. Keep in step with pyproject's extras.
PIP_INSTALL: dict[str, str] = {
    "nvidia.dali": "pip install nvidia-dali-cuda130",
    # TensorRT 11 dropped the FP16/BF16 builder flags our weakly typed builds use
    "tensorrt": "pip install --extra-index-url https://pypi.nvidia.com 'tensorrt-cu13>=10,<11'",
    "onnxruntime": "pip install onnxruntime  (or onnxruntime-gpu on a CUDA machine)",
    "onnx": "pip install onnx",
    "faiss": "pip install faiss-cpu  (or faiss-gpu-cu12 on a CUDA machine)",
    "ray": "pip install 'ray[data]'",
    "triton": "pip install triton==3.7.1",
    "av": "pip install av",
    "torchcodec": "pip install torchcodec",
    "soundfile": "pip install soundfile",
    "pyarrow": "pip install pyarrow",
}


def require(module: str, feature: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming the pip command and the feature that needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        hint = PIP_INSTALL.get(module) or PIP_INSTALL.get(top) or f"pip install {top}"
        raise MissingDependencyError(module, hint, feature) from exc


def available(module: str) -> bool:
    """True when `module` imports; never raises."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
