"""Triton kernels, installed as wave_rt.kernels (one file per op; float64 references in reference.py)."""
