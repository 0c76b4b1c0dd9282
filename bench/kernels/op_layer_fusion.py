"""Benchmark of layer_fusion_mlp (forward, forward+backward) against eager and torch.compile of the reference."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (bench/kernels/common.py: the shared harness)
    Ctx,
    cleanup,
    compare_to_reference,
    compiled,
    make_rows,
    measure,
    ours,
    seeded,
)
from wave_rt.kernels import _dispatch as kdispatch  # noqa: E402
from wave_rt.kernels import layer_fusion_mlp  # noqa: E402
from wave_rt.kernels.reference import layer_fusion_mlp_reference  # noqa: E402


# ------------------------------------------------------------------------------------- layer_fusion_mlp
def bench_layer_fusion(ctx: Ctx, batch: int) -> None:
    s = ctx.shapes
    L, D, H = s.layers, s.dim, s.hidden_out
    K = L * D
    g = seeded(ctx, 100 + batch)
    hidden = torch.randn(batch, L, D, device=ctx.device, dtype=ctx.dtype, generator=g)
    # z ~ N(0, 1): the GELU sees both of its regimes.
    w1 = (torch.randn(H, K, device=ctx.device, dtype=torch.float32, generator=g) / math.sqrt(K)).to(ctx.dtype)
    b1 = (0.1 * torch.randn(H, device=ctx.device, dtype=torch.float32, generator=g)).to(ctx.dtype)
    dy = torch.randn(batch, H, device=ctx.device, dtype=ctx.dtype, generator=g)
    shape = {"B": batch, "L": L, "D": D, "H": H}
    elt = ctx.elt

    variants: dict[str, Callable] = {"wave_rt": layer_fusion_mlp}
    if ctx.ours_label != "torch":
        variants["wave_rt_torch_fallback"] = layer_fusion_mlp
    variants["eager"] = layer_fusion_mlp_reference
    if not ctx.no_compile:
        variants["compile"] = layer_fusion_mlp_reference  # wrapped by compiled() per pass below

    def scope(variant: str) -> contextlib.AbstractContextManager:
        if variant == "wave_rt":
            return ours(ctx)
        if variant == "wave_rt_torch_fallback":
            return kdispatch.force_backend("torch")
        return contextlib.nullcontext()

    # ---- forward
    results: dict[str, dict[str, Any]] = {}
    for variant, f in variants.items():
        fn = compiled(ctx, f) if variant == "compile" else f

        def fwd(fn: Callable = fn, variant: str = variant) -> torch.Tensor:
            with torch.no_grad(), scope(variant):
                return fn(hidden, w1, b1)

        results[variant] = measure(ctx, fwd)
    outputs = {v: r.pop("output") for v, r in results.items() if r.get("status") == "ok"}
    ref = layer_fusion_mlp_reference(hidden.double(), w1.double(), b1.double())
    correctness = compare_to_reference(ctx, ["y"], outputs, [ref])
    del outputs, ref
    flops = 2.0 * batch * K * H
    n_bytes = float(H * K + batch * K + batch * H + H) * elt
    make_rows(ctx, "layer_fusion_mlp", "forward", shape, results, flops, n_bytes, correctness)
    cleanup(ctx)

    # ---- forward + backward: dW1, db1 and d hidden
    leaves = [t.detach().requires_grad_() for t in (hidden, w1, b1)]
    results = {}
    for variant, f in variants.items():
        fn = compiled(ctx, f) if variant == "compile" else f

        def fwd_bwd(fn: Callable = fn, variant: str = variant) -> tuple[torch.Tensor, ...]:
            for t in leaves:
                t.grad = None
            with scope(variant):
                y = fn(*leaves)
                y.backward(dy)
            return (y.detach(), *(t.grad for t in leaves))

        results[variant] = measure(ctx, fwd_bwd)
    for t in leaves:
        t.grad = None
    outputs = {v: r.pop("output") for v, r in results.items() if r.get("status") == "ok"}
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_y = layer_fusion_mlp_reference(*ref_leaves)
    ref_y.backward(dy.double())
    correctness = compare_to_reference(ctx, ["y", "d_hidden", "d_w1", "d_b1"], outputs,
                                       [ref_y.detach(), *(t.grad for t in ref_leaves)])
    del outputs, ref_y, ref_leaves
    flops = 6.0 * batch * K * H
    n_bytes += float((batch * H + H * K + batch * K) + (H * K + batch * K + H)) * elt
    make_rows(ctx, "layer_fusion_mlp", "forward+backward", shape, results, flops, n_bytes, correctness)
    cleanup(ctx)


# ------------------------------------------------------------------------------------------ scalar_mix
