"""Triton kernels, installed as wave_rt.kernels (one file per op; float64 references in reference.py).

Every public function dispatches per call (see _dispatch.py): CUDA tensors run compiled Triton kernels,
CPU tensors run the same kernels in Triton's interpreter when TRITON_INTERPRET=1, and a streamed torch
fallback otherwise.
"""

try:
    from .contrastive import info_nce, info_nce_distributed
except ImportError:  # contrastive.py is still being written; the lead removes this guard when it lands
    pass
from .layer_fusion import layer_fusion_mlp, scalar_mix
from .similarity import similarity_topk

__all__ = ["layer_fusion_mlp", "scalar_mix", "similarity_topk", "info_nce", "info_nce_distributed"]
