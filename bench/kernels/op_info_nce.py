"""Benchmark of info_nce (forward+backward) against the naive full-matrix loss, eager and compiled."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (bench/kernels/common.py: the shared harness)
    GIB,
    Ctx,
    cleanup,
    compare_to_reference,
    compiled,
    error_floor,
    make_rows,
    measure,
    ours,
    poisoned,
    seeded,
)
from wave_rt.kernels.reference import info_nce_reference  # noqa: E402


# ---------------------------------------------------------------------------------------------- info_nce
def nce_inputs(ctx: Ctx, b: int, m: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm queries and documents whose first b rows are noisy copies of the queries (positives at
    cosine ~0.7), the rest random: loss values of a trained-ish model, not of pure noise."""
    g = seeded(ctx, seed)
    qf = F.normalize(torch.randn(b, dim, device=ctx.device, generator=g), dim=1)
    pos = F.normalize(qf + torch.randn(b, dim, device=ctx.device, generator=g) / math.sqrt(dim), dim=1)
    extra = F.normalize(torch.randn(m - b, dim, device=ctx.device, generator=g), dim=1)
    return qf.to(ctx.dtype), torch.cat([pos, extra]).to(ctx.dtype)


def bench_info_nce(ctx: Ctx, state: dict[str, Any], b: int | None) -> None:
    """b=None: import the kernel and run the small float64 check (kept in `state`); else the case B = M = b.
    One section per B, so that the JSON is rewritten after every case."""
    if b is None:
        try:
            from wave_rt.kernels.contrastive import info_nce
        except ImportError as exc:
            ctx.skipped.append({"op": "info_nce", "reason": f"wave_rt.kernels.contrastive not importable: {exc}"})
            print(f"info_nce: skipped ({exc})", flush=True)
            return
        t0 = time.perf_counter()
        state["info_nce"], state["small"] = info_nce, info_nce_small_check(ctx, info_nce)
        print(f"info_nce small float64 check: {time.perf_counter() - t0:.1f} s", flush=True)
        return
    if "info_nce" not in state:
        return
    cleanup(ctx)
    bench_info_nce_case(ctx, state["info_nce"], b, state["small"])
    cleanup(ctx)


def bench_info_nce_case(ctx: Ctx, info_nce: Callable, b: int, correctness_small: dict[str, Any]) -> None:
    """Forward+backward of one B (= M): time and peak memory of ours, the eager and the compiled reference."""
    s = ctx.shapes
    temp = s.temperature
    m, dim = b, s.dim
    shape = {"B": b, "M": m, "D": dim}
    try:
        q, d = nce_inputs(ctx, b, m, dim, seed=400 + b)
    except torch.OutOfMemoryError as exc:
        ctx.skipped.append({"op": "info_nce", "B": b, "reason": f"inputs do not fit: {exc}"})
        return
    q.requires_grad_()
    d.requires_grad_()

    def step(loss_fn: Callable, scope: Callable[[], contextlib.AbstractContextManager]) -> tuple:
        q.grad = None
        d.grad = None
        with scope():
            loss = loss_fn(q, d, temp, symmetric=True)
            loss.backward()
        return loss.detach(), q.grad, d.grad

    results: dict[str, dict[str, Any]] = {}
    # one line per variant as it ends: a run cut off by its cap still tells which variant took the time
    t0 = time.perf_counter()
    results["wave_rt"] = measure(ctx, lambda: step(info_nce, lambda: ours(ctx)))
    _say_variant("info_nce", b, "wave_rt", results["wave_rt"], t0)
    t0 = time.perf_counter()
    results["eager"] = measure(ctx, lambda: step(info_nce_reference, contextlib.nullcontext))
    _say_variant("info_nce", b, "eager", results["eager"], t0)
    if not ctx.no_compile:
        logits_bytes = 2.0 * b * m * ctx.elt
        free = torch.cuda.mem_get_info(ctx.device)[0] if ctx.cuda else float("inf")
        if results["eager"]["status"] == "OOM" and logits_bytes > free:
            results["compile"] = {"status": "not run",
                                  "error": f"predicted OOM: eager ran out of memory and two B x M score "
                                           f"matrices ({logits_bytes / GIB:.0f} GiB) exceed the free "
                                           f"{free / GIB:.0f} GiB"}
        else:
            ref_compiled = compiled(ctx, info_nce_reference)
            t0 = time.perf_counter()
            results["compile"] = measure(ctx, lambda: step(ref_compiled, contextlib.nullcontext))
            _say_variant("info_nce", b, "compile", results["compile"], t0)
    q.grad = None
    d.grad = None
    outputs = {v: r.pop("output") for v, r in results.items() if r.get("status") == "ok"}
    t0 = time.perf_counter()
    try:
        exact = nce_loss_exact(ctx, q.detach(), d.detach(), temp)
        print(f"info_nce B={b} exact loss: {time.perf_counter() - t0:.1f} s", flush=True)
    except torch.OutOfMemoryError as exc:
        exact = None
        ctx.skipped.append({"op": "info_nce", "B": b, "reason": f"exact loss check ran out of memory: {exc}"})
    cleanup(ctx)
    correctness: dict[str, Any] = {}
    for variant in results:
        entry: dict[str, Any] = {}
        if variant in correctness_small:
            entry["small_shape_vs_float64"] = correctness_small[variant]
        if variant in outputs and exact is not None:
            err = abs(float(outputs[variant][0]) - exact) / abs(exact)
            entry["loss_vs_exact"] = {
                "check": "loss value vs a chunked fp32 evaluation with exact products (TF32 holds bf16/fp16 "
                         "inputs exactly) and float64 sums",
                "exact_loss": exact, "relative_error": err, "bound": error_floor(ctx.dtype),
                "passed": err <= error_floor(ctx.dtype)}
        if variant != "eager" and variant in outputs and "eager" in outputs:
            # Information only: the bf16 eager loss is itself far from exact (see its loss_vs_exact).
            entry["diff_vs_eager"] = {n: _rel(a, r) for n, a, r in
                                      zip(("loss", "dq", "dd"), outputs[variant], outputs["eager"])}
        flags = [e["passed"] for e in entry.values() if isinstance(e, dict) and "passed" in e]
        entry["passed"] = False if False in flags else (True if flags and all(flags) else None)
        correctness[variant] = entry
    outputs.clear()
    target = (b + m) * dim * ctx.elt
    per_variant = {}
    for v, r in results.items():
        peak = r.get("peak_mem_bytes")
        per_variant[v] = {"memory_target_bytes": target,
                          "memory_vs_target": (peak / target) if peak else None,
                          "peak_mem": "OOM" if r.get("status") == "OOM" else peak}
    make_rows(ctx, "info_nce", "forward+backward", shape, results, 6.0 * b * m * dim,
              2.0 * (b + m) * dim * ctx.elt, correctness,
              extra={"symmetric": True, "temperature": temp, "false_negative_margin": None},
              per_variant=per_variant)


def _say_variant(op: str, b: int, variant: str, res: dict[str, Any], t0: float) -> None:
    print(f"{op} B={b} {variant}: {res.get('status')} in {time.perf_counter() - t0:.1f} s "
          f"(first call {res.get('first_call_s', float('nan')):.1f} s, median {res.get('median_ms', float('nan')):.2f} ms, "
          f"peak {res.get('peak_mem_bytes', 0) / GIB:.2f} GiB) {res.get('error', '')}", flush=True)


def nce_loss_exact(ctx: Ctx, q: torch.Tensor, d: torch.Tensor, temperature: float) -> float:
    """The symmetric InfoNCE value (no margin) without the B x M matrix: fp32 scores of a block of query rows
    at a time (bf16/fp16 values are exact in TF32, so with TF32 on the products are exact and the sums fp32;
    fp32 inputs, used by smoke runs only, are scored in float64 instead), log-sum-exps in float64, the column
    ones merged across blocks with logaddexp."""
    b, m = q.shape[0], d.shape[0]
    score_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32
    rows = max(1, min(b, (1 << 27) // max(1, m)))
    d32 = d.to(score_dtype)
    col_lse = torch.full((b,), float("-inf"), dtype=torch.float64, device=q.device)
    row_total = torch.zeros((), dtype=torch.float64, device=q.device)
    diag = torch.empty(b, dtype=score_dtype, device=q.device)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for r0 in range(0, b, rows):
            qc = q[r0:r0 + rows].to(score_dtype)
            s = qc @ d32.T
            diag[r0:r0 + rows] = (qc * d32[r0:r0 + rows]).sum(dim=1)
            logits = s.double().div_(temperature)  # float64 from here: lse - s_ii / t cancels
            del s
            row_total += (torch.logsumexp(logits, dim=1) - diag[r0:r0 + rows].double() / temperature).sum()
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits[:, :b], dim=0))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    col_total = (col_lse - diag.double() / temperature).sum()
    return float(0.5 * (row_total + col_total) / b)


def _rel(a: torch.Tensor, r: torch.Tensor) -> float:
    a64, r64 = a.detach().double(), r.detach().double()
    if not torch.isfinite(a64).all():
        return float("nan")
    return float((a64 - r64).norm() / r64.norm().clamp_min(1e-300))


def info_nce_small_check(ctx: Ctx, info_nce: Callable) -> dict[str, Any]:
    """Loss and both gradients at B = M = nce_check_b against float64, ours and the naive loss in ctx.dtype."""
    s = ctx.shapes
    b = s.nce_check_b
    q, d = nce_inputs(ctx, b, b, s.dim, seed=499)
    outs = {}
    # The compiled reference is checked against eager at the benchmark sizes instead.
    for variant, fn in (("wave_rt", info_nce), ("eager", info_nce_reference)):
        qq, dd = q.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()
        scope = ours(ctx) if variant == "wave_rt" else contextlib.nullcontext()
        try:
            with scope, poisoned():
                loss = fn(qq, dd, s.temperature, symmetric=True)
                loss.backward()
            outs[variant] = (loss.detach(), qq.grad, dd.grad)
        except Exception as exc:  # recorded in the rows; the run goes on
            outs[variant] = exc
    q64, d64 = q.detach().double().requires_grad_(), d.detach().double().requires_grad_()
    loss64 = info_nce_reference(q64, d64, s.temperature, symmetric=True)
    loss64.backward()
    ref = [loss64.detach(), q64.grad, d64.grad]
    ok_outs = {v: o for v, o in outs.items() if not isinstance(o, Exception)}
    # absolute: the naive bf16 loss is so far from exact that 2x its error would bound nothing.
    res = compare_to_reference(ctx, ["loss", "dq", "dd"], ok_outs, ref, absolute=True)
    for v, o in outs.items():
        if isinstance(o, Exception):
            res[v] = {"passed": False, "error": f"{type(o).__name__}: {o}"}
    for v in res:
        res[v]["check"] = f"B = M = {b}, D = {s.dim}: relative error vs the float64 reference"
    cleanup(ctx)
    return res
