"""Triton kernels, installed as wave_rt.kernels (one file per op; float64 references in reference.py).

Every public function dispatches per call (see _dispatch.py): CUDA tensors run compiled Triton kernels,
CPU tensors run the same kernels in Triton's interpreter when TRITON_INTERPRET=1, and a streamed torch
fallback otherwise. layer_fusion_mlp on CUDA takes cuBLAS's single GEMM when hidden is a free [B, L*D] view
(measured faster on an H100; bench/results/kernels_h100.json).
"""

from .contrastive import info_nce, info_nce_distributed
from .layer_fusion import layer_fusion_mlp, scalar_mix
from .similarity import similarity_topk

__all__ = ["layer_fusion_mlp", "scalar_mix", "similarity_topk", "info_nce", "info_nce_distributed"]
