"""Benchmark of scalar_mix (forward, forward+backward) against eager and torch.compile of the reference."""

from __future__ import annotations

import contextlib
import itertools
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
from wave_rt.kernels import scalar_mix  # noqa: E402
from wave_rt.kernels.reference import scalar_mix_reference  # noqa: E402


def bench_scalar_mix(ctx: Ctx, batch: int) -> None:
    s = ctx.shapes
    L, D = s.layers, s.dim
    g = seeded(ctx, 200 + batch)
    set_bytes = batch * L * D * ctx.elt
    # Inputs that fit in the L2 cache are rotated among copies so that repeats read device memory.
    # (GPU only: the CPU smoke run has nothing to learn from it.)
    n_sets = 1 if not ctx.cuda or set_bytes >= 4 * ctx.l2_bytes() else min(
        1024, math.ceil(4 * ctx.l2_bytes() / set_bytes))
    sets = [torch.randn(batch, L, D, device=ctx.device, dtype=ctx.dtype, generator=g) for _ in range(n_sets)]
    weights = torch.randn(L, device=ctx.device, dtype=torch.float32, generator=g)
    dy = torch.randn(batch, D, device=ctx.device, dtype=ctx.dtype, generator=g)
    shape = {"B": batch, "L": L, "D": D}
    elt = ctx.elt

    variants: dict[str, Callable] = {"wave_rt": scalar_mix}
    if ctx.ours_label != "torch":
        variants["wave_rt_torch_fallback"] = scalar_mix
    variants["eager"] = scalar_mix_reference
    if not ctx.no_compile:
        variants["compile"] = scalar_mix_reference

    def scope(variant: str) -> contextlib.AbstractContextManager:
        if variant == "wave_rt":
            return ours(ctx)
        if variant == "wave_rt_torch_fallback":
            return kdispatch.force_backend("torch")
        return contextlib.nullcontext()

    extra = {"input_sets": n_sets}
    # Timed calls cycle through the input sets; the checked call uses sets[0].
    results: dict[str, dict[str, Any]] = {}
    for variant, f in variants.items():
        fn = compiled(ctx, f) if variant == "compile" else f

        def fwd(i: int, fn: Callable = fn, variant: str = variant) -> torch.Tensor:
            with torch.no_grad(), scope(variant):
                return fn(sets[i], weights)

        order = itertools.cycle(range(n_sets))
        results[variant] = measure(ctx, lambda fwd=fwd, order=order: fwd(next(order)), lambda fwd=fwd: fwd(0),
                                   rotate=n_sets)
    outputs = {v: r.pop("output") for v, r in results.items() if r.get("status") == "ok"}
    ref = scalar_mix_reference(sets[0].double(), weights.double())
    correctness = compare_to_reference(ctx, ["y"], outputs, [ref])
    flops = 2.0 * batch * L * D
    n_bytes = float(batch * L * D + batch * D) * elt
    make_rows(ctx, "scalar_mix", "forward", shape, results, flops, n_bytes, correctness, extra=extra)
    outputs.clear()
    cleanup(ctx)

    leaf_sets = [t.requires_grad_() for t in sets]
    w_leaf = weights.detach().requires_grad_()
    results = {}
    for variant, f in variants.items():
        fn = compiled(ctx, f) if variant == "compile" else f

        def fwd_bwd(i: int, fn: Callable = fn, variant: str = variant) -> tuple:
            h = leaf_sets[i]
            h.grad = None
            w_leaf.grad = None
            with scope(variant):
                y = fn(h, w_leaf)
                y.backward(dy)
            return y.detach(), h.grad, w_leaf.grad

        order = itertools.cycle(range(n_sets))
        results[variant] = measure(ctx, lambda fb=fwd_bwd, order=order: fb(next(order)), lambda fb=fwd_bwd: fb(0),
                                   rotate=n_sets)
    outputs = {v: r.pop("output") for v, r in results.items() if r.get("status") == "ok"}
    ref_h = leaf_sets[0].detach().double().requires_grad_()
    ref_w = weights.detach().double().requires_grad_()
    ref_y = scalar_mix_reference(ref_h, ref_w)
    ref_y.backward(dy.double())
    correctness = compare_to_reference(ctx, ["y", "d_hidden", "d_weights"], outputs,
                                       [ref_y.detach(), ref_h.grad, ref_w.grad])
    flops = 5.0 * batch * L * D
    n_bytes += float(batch * D + 2 * batch * L * D) * elt
    make_rows(ctx, "scalar_mix", "forward+backward", shape, results, flops, n_bytes, correctness, extra=extra)
