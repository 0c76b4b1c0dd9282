"""Kernel benchmark (issue 3): wave_rt.kernels against PyTorch eager and torch.compile of the references.

Ops and shapes (GPU run, bf16):
  layer_fusion_mlp  B in {1, 64, 512}, L=28, D=3584, H=3584; forward and forward+backward (dW1, db1, dH)
  scalar_mix        the same B, L, D; forward and forward+backward (d hidden, d weights)
  similarity_topk   q=1024, N=10M (fewer if the corpus does not fit, see below), D=3584, k=100, normalize=True
  info_nce          B = M in {16k, 64k, 256k}, D=3584, symmetric, temperature 0.05; forward+backward

Variants per case: `wave_rt` (our kernels, backend --backend), `eager` (the reference in kernels/reference.py
run by PyTorch eager), `compile` (torch.compile of that same reference, static shapes, compiled once per case
after torch._dynamo.reset()), and for layer_fusion_mlp / scalar_mix also `wave_rt_torch_fallback` (our torch
fallback path). similarity_topk cannot run its reference eagerly on the full q x N score matrix, so its
baselines are `eager_chunked` (normalize a corpus chunk, scores = q @ chunk.T, torch.topk, merge with the
running top-k) and `compile_chunked` (the same loop with the per-chunk step torch.compile'd); the plain
reference is attempted once as `naive_reference` and recorded as OOM when it runs out of memory.

Method (the device tool's METHOD.md): every timing is the median of repeated CUDA-event timings
(bench/harness.py time_it, torch.cuda.synchronize before reading), after untimed warm-up calls; the first call
(compile, autotune) is reported separately as first_call_s. Inputs are fresh random data (never zeros);
inputs smaller than 4x the L2 cache are rotated among several copies so repeats do not time the cache.
The ceilings are measured in the same run: device copy bandwidth (a 2 GiB device-to-device copy, bytes read +
written) and bf16 matmul TFLOP/s (8192^3 on random data); DESIGN.md section 4's nominal numbers are recorded
beside them. Each row reports achieved TFLOP/s and GB/s; `bound` is the roof (compute or memory) whose floor
time is larger, and fraction_of_ceiling is the achieved rate on that roof over its measured ceiling.

FLOP and byte counts (bytes = the fewest a pass can move: every input read once, every output written once):
  layer_fusion_mlp  K = L*D; forward 2*B*K*H FLOPs, (H*K + B*K + B*H + H) elements;
                    forward+backward 6*B*K*H FLOPs (dW1 and dH each cost a forward), forward elements plus
                    (B*H + H*K + B*K) read + (H*K + B*K + H) written.
  scalar_mix        forward 2*B*L*D FLOPs, (B*L*D + B*D) elements; forward+backward 5*B*L*D FLOPs,
                    forward elements plus (B*D + B*L*D) read + B*L*D written.
  similarity_topk   2*q*N*D FLOPs (normalisation not counted); N*D + q*D elements + q*k*(4+8) bytes. The
                    issue's target compares against the bandwidth floor = corpus bytes / measured copy
                    bandwidth; the compute floor (FLOPs / measured bf16 rate) is recorded too, since at q=1024
                    the compute floor is the larger one.
  info_nce          6*B*M*D FLOPs (the forward product and the two gradient products; a kernel that
                    recomputes the scores in its backward does more work than counted); 2*(B+M)*D elements.
                    Peak memory = torch.cuda.max_memory_allocated during one forward+backward minus the memory
                    allocated before it (q, d already resident, their grads not): it includes dq and dd.
                    memory_vs_target = peak / ((B+M)*D*bytes).

Correctness, recorded per case ("correctness" in every row): layer_fusion_mlp and scalar_mix compare every
variant's output and gradients with the float64 reference at the benchmark shape (relative Frobenius error;
ours passes at <= 2x the eager bf16 error, or under a small absolute floor); similarity_topk checks ours on
a slice (64 queries x 65,536 corpus rows) against the float64 reference, and ours against eager_chunked on the
full run (sorted top-k values within one bf16 ulp, since eager's scores are bf16); info_nce checks loss, dq
and dd of ours and of the naive loss against float64 at B = M = 1024 (ours against a fixed bf16 bound: the
naive bf16 loss is too far off for "2x its error" to bound anything), and at every benchmark size the loss value
of every variant against a chunked exact evaluation (fp32 scores with exact products, float64 log-sum-exps);
the difference between ours and the naive loss and gradients is recorded as information. Kernel outputs are
poisoned (NaN) during the checked calls, so an unwritten element fails the check. A failed check of a wave_rt
variant, or a variant that errors (not OOM), makes the script exit with status 1; a baseline's own failed check
is only recorded.

similarity_topk corpus: --topk-corpus device (default) allocates the corpus on the GPU and uses the largest
N <= 10M (a multiple of the eager chunk) that leaves --topk-headroom-gib free; N_used, N_requested and the
location are recorded. --topk-corpus host keeps the corpus in page-locked host memory (cudaHostRegister) and
streams it (ours: its own ~1 GiB chunks; eager: its chunk loop); then the floor is corpus bytes over the
measured host-to-device bandwidth. `device,host` runs both.

Running on the device tool (one command runs at most 10 minutes; `--plan` prints a rough estimate, about
13 minutes for everything on an H100, most of it torch.compile; --budget-s, default 420 s, stops starting new
cases and the JSON is rewritten after every case, so a run cut short keeps what it finished):

    pip install --no-deps --no-build-isolation -e . && python bench/kernels/bench_kernels.py

writes bench/results/kernels_<device>.json on that machine; files come back only from $OUT, so add
`--out $OUT/kernels_h100.json` and copy the file into bench/results/ here. Split over calls and merge (each call
reads the previous call's rows, copied into bench/results/ here in between, and keeps the ops it does not rerun):

    ... python bench/kernels/bench_kernels.py --only layer_fusion_mlp --out $OUT/kernels_h100.json
    ... python bench/kernels/bench_kernels.py --only scalar_mix,similarity_topk \
            --merge bench/results/kernels_h100.json --out $OUT/kernels_h100.json
    ... python bench/kernels/bench_kernels.py --only info_nce \
            --merge bench/results/kernels_h100.json --out $OUT/kernels_h100.json

The device machine's copy of the repository may have no .git: pass --commit <hash> to record the commit.

Smoke run (CPU, tiny shapes, every code path; results are labelled smoke and are not performance claims; nothing
is written unless --out is given):

    python bench/kernels/bench_kernels.py --smoke
    TRITON_INTERPRET=1 python bench/kernels/bench_kernels.py --smoke --backend interpret
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness  # noqa: E402
from wave_rt.kernels import _dispatch as kdispatch  # noqa: E402
from wave_rt.kernels import layer_fusion_mlp, scalar_mix, similarity_topk  # noqa: E402
from wave_rt.kernels.reference import (  # noqa: E402
    info_nce_reference,
    layer_fusion_mlp_reference,
    scalar_mix_reference,
    similarity_topk_reference,
)

OPS = ("layer_fusion_mlp", "scalar_mix", "similarity_topk", "info_nce")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 1 << 30


# ------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shapes:
    fusion_batches: tuple[int, ...]
    layers: int
    dim: int
    hidden_out: int
    topk_q: int
    topk_n: int
    topk_k: int
    topk_chunk: int  # corpus rows per step of the chunked eager / compiled baselines
    topk_check_q: int
    topk_check_n: int
    nce_batches: tuple[int, ...]
    nce_check_b: int
    temperature: float = 0.05


FULL = Shapes(fusion_batches=(1, 64, 512), layers=28, dim=3584, hidden_out=3584,
              topk_q=1024, topk_n=10_000_000, topk_k=100, topk_chunk=125_000, topk_check_q=64,
              topk_check_n=65_536, nce_batches=(16_384, 65_536, 262_144), nce_check_b=1024)
# Odd sizes on purpose: partial tiles in every kernel.
SMOKE = Shapes(fusion_batches=(1, 5), layers=3, dim=40, hidden_out=24,
               topk_q=7, topk_n=1024, topk_k=10, topk_chunk=256, topk_check_q=5, topk_check_n=700,
               nce_batches=(16, 40), nce_check_b=24)


# ----------------------------------------------------------------------------------------------- context
@dataclass
class Ctx:
    device: torch.device
    dtype: torch.dtype
    backend: str | None  # forced backend for our kernels, None = wave_rt's automatic choice
    smoke: bool
    shapes: Shapes
    compile_backend: str
    compile_mode: str | None
    no_compile: bool
    target_s: float  # timed seconds aimed at per variant (repeats = target / one call, clamped)
    min_repeats: int
    max_repeats: int
    budget_s: float | None
    topk_locations: tuple[str, ...]
    topk_headroom: int
    t0: float = field(default_factory=time.perf_counter)
    ceilings: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def elt(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def ours_label(self) -> str:
        if self.backend is not None:
            return self.backend
        if self.cuda:
            return "triton" if kdispatch.HAS_TRITON else "torch"
        return "interpret" if (kdispatch.HAS_TRITON and kdispatch.interpret_requested()) else "torch"

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.budget_s is not None and self.elapsed() > self.budget_s

    def l2_bytes(self) -> int:
        if self.cuda:
            return int(getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 50 * 2**20))
        return 32 * 2**20


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)


def cleanup(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def ours(ctx: Ctx) -> Iterator[None]:
    with kdispatch.force_backend(ctx.backend):
        yield


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Kernel outputs start as NaN: an element a kernel forgets to write fails the correctness check."""
    saved = kdispatch.poison_outputs
    kdispatch.poison_outputs = True
    try:
        yield
    finally:
        kdispatch.poison_outputs = saved


def seeded(ctx: Ctx, seed: int) -> torch.Generator:
    return torch.Generator(device=ctx.device).manual_seed(seed)


def compiled(ctx: Ctx, fn: Callable) -> Callable:
    """torch.compile of `fn` with a clean dynamo cache: one static-shape compile per case, never a dynamic
    recompile and never the recompile limit (compiled variants of different cases share `fn`'s code object)."""
    torch._dynamo.reset()
    kwargs: dict[str, Any] = {"dynamic": False, "backend": ctx.compile_backend}
    if ctx.compile_mode:
        kwargs["mode"] = ctx.compile_mode
    return torch.compile(fn, **kwargs)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ------------------------------------------------------------------------------------------------ timing
def measure(ctx: Ctx, fn: Callable[[], Any], check_fn: Callable[[], Any] | None = None,
            rotate: int = 1) -> dict[str, Any]:
    """Time `fn` (median of CUDA-event timings, harness.time_it), then make one more call (`check_fn`, default
    `fn`) under poisoned kernel outputs and harness.PeakMemory; its result is returned for the correctness
    checks. Never raises for OOM or a failing variant: the result says {"status": "OOM" | "error"} instead.
    `rotate` = number of input sets `fn` cycles through (each is warmed up)."""
    res: dict[str, Any] = {"status": "ok"}
    try:
        t = time.perf_counter()
        fn()
        sync(ctx)
        res["first_call_s"] = time.perf_counter() - t  # includes compilation and autotuning
        untimed = 1
        if ctx.smoke and res["first_call_s"] > 1.0:
            one = res["first_call_s"]  # interpreted kernels: no compile in the first call, and every call is slow
        else:
            t = time.perf_counter()
            fn()
            sync(ctx)
            one = max(time.perf_counter() - t, 1e-6)
            untimed = 2
        lo = ctx.min_repeats if one < 1.0 else min(ctx.min_repeats, 1 if ctx.smoke else 3)
        repeats = max(lo, min(ctx.max_repeats, int(ctx.target_s / one)))
        warmup = max(1, rotate) if one < 0.05 else 1
        stats = harness.time_it(fn, warmup=warmup, repeats=repeats)
        res.update(median_ms=stats["median"] * 1e3, min_ms=stats["min"] * 1e3, max_ms=stats["max"] * 1e3,
                   repeats=stats["n"], warmup_calls=warmup + untimed)
        with poisoned(), harness.PeakMemory() as pm:
            res["output"] = (check_fn or fn)()
        res["peak_mem_bytes"] = pm.peak_bytes
    except Exception as exc:  # a failing variant must not end the run: it becomes a row with its error
        res = {"status": "OOM" if is_oom(exc) else "error",
               "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
        if res["status"] == "error":
            res["traceback"] = traceback.format_exc(limit=8)
    cleanup(ctx)
    return res


# -------------------------------------------------------------------------------------------- ceilings
def measure_ceilings(ctx: Ctx, host_bandwidth: bool) -> dict[str, Any]:
    """Device copy bandwidth (bytes read + written) and matmul TFLOP/s in ctx.dtype on random data."""
    out: dict[str, Any] = {}
    n_bytes = 16 * 2**20 if ctx.smoke else 2 * GIB
    out["copy_bandwidth_GBps"] = _copy_rate(ctx, n_bytes, host=False)
    out["copy_bytes"] = n_bytes
    n = 256 if ctx.smoke else 8192
    out["matmul_TFLOPs"] = _matmul_rate(ctx, n)
    out["matmul_n"] = n
    if host_bandwidth and ctx.cuda:
        out["h2d_bandwidth_GBps"] = _copy_rate(ctx, GIB, host=True)
    cleanup(ctx)
    return out


def _copy_rate(ctx: Ctx, n_bytes: int, host: bool) -> float:
    """GB/s of a device-to-device copy counting bytes read + written, or of a pinned host-to-device copy."""
    if host:
        src = torch.empty(n_bytes // ctx.elt, dtype=ctx.dtype, pin_memory=True).normal_()
        dst = torch.empty_like(src, device=ctx.device)
        st = harness.time_it(lambda: dst.copy_(src, non_blocking=True), warmup=2, repeats=10)
        return n_bytes / st["median"] / 1e9
    src = torch.empty(n_bytes // ctx.elt, dtype=ctx.dtype, device=ctx.device).normal_(generator=seeded(ctx, 1))
    dst = torch.empty_like(src)
    st = harness.time_it(lambda: dst.copy_(src), warmup=3, repeats=20)
    return 2 * n_bytes / st["median"] / 1e9


def _matmul_rate(ctx: Ctx, n: int) -> float:
    a = torch.randn(n, n, dtype=ctx.dtype, device=ctx.device, generator=seeded(ctx, 2))
    b = torch.randn(n, n, dtype=ctx.dtype, device=ctx.device, generator=seeded(ctx, 3))
    c = torch.empty(n, n, dtype=ctx.dtype, device=ctx.device)
    st = harness.time_it(lambda: torch.matmul(a, b, out=c), warmup=3, repeats=20)
    return 2 * n**3 / st["median"] / 1e12


def nominal_ceilings() -> dict[str, float] | None:
    name = harness.device_name()
    for key, values in harness.CEILINGS.items():
        if key in name:
            return dict(values)
    return None


# ---------------------------------------------------------------------------------------------- rows
def make_rows(ctx: Ctx, op: str, pass_: str, shape: dict[str, int], results: dict[str, dict[str, Any]],
              flops: float, n_bytes: float, correctness: dict[str, Any], baseline: str = "eager",
              extra: dict[str, Any] | None = None, per_variant: dict[str, dict[str, Any]] | None = None) -> None:
    """One row per variant in DESIGN.md section 7's shape (value = median ms, ratio = speedup over eager)
    plus the fields this benchmark reports; ceiling / fraction_of_ceiling refer to the row's roof."""
    peak_tflops = ctx.ceilings["matmul_TFLOPs"]
    bandwidth = ctx.ceilings["copy_bandwidth_GBps"]
    compute_floor_ms = flops / (peak_tflops * 1e12) * 1e3
    memory_floor_ms = n_bytes / (bandwidth * 1e9) * 1e3
    bound = "compute" if compute_floor_ms >= memory_floor_ms else "memory"
    base = results.get(baseline, {})
    base_ms = base.get("median_ms") if base.get("status") == "ok" else None
    shape_str = ",".join(f"{k}={v}" for k, v in shape.items())
    for variant, res in results.items():
        ms = res.get("median_ms") if res.get("status") == "ok" else None
        r = harness.row(f"{op}/{pass_}/{shape_str}/{variant}", baseline, base_ms, ms, "ms", higher_is_better=False)
        tflops = flops / (ms * 1e-3) / 1e12 if ms else None
        gbps = n_bytes / (ms * 1e-3) / 1e9 if ms else None
        achieved, ceiling = (tflops, peak_tflops) if bound == "compute" else (gbps, bandwidth)
        r.update(
            ceiling=ceiling,
            fraction_of_ceiling=(achieved / ceiling) if achieved else None,
            op=op, **{"pass": pass_}, shape=shape, dtype=str(ctx.dtype).replace("torch.", ""), variant=variant,
            backend=ctx.ours_label if variant.startswith("wave_rt") and "fallback" not in variant else "torch",
            status=res.get("status"), error=res.get("error"), median_ms=ms, min_ms=res.get("min_ms"),
            max_ms=res.get("max_ms"), repeats=res.get("repeats"), first_call_s=res.get("first_call_s"),
            flops=flops, bytes=n_bytes, achieved_TFLOPs=tflops, achieved_GBps=gbps, bound=bound,
            ceiling_unit="TFLOP/s" if bound == "compute" else "GB/s",
            compute_floor_ms=compute_floor_ms, memory_floor_ms=memory_floor_ms,
            speedup_vs_eager=r["ratio"], peak_mem_bytes=res.get("peak_mem_bytes"),
            correctness=correctness.get(variant, correctness.get("*")), smoke=ctx.smoke,
        )
        if "traceback" in res:
            r["traceback"] = res["traceback"]
        if extra:
            r.update(extra)
        if per_variant and variant in per_variant:
            r.update(per_variant[variant])
        ctx.rows.append(r)
        if res.get("status") == "error":
            ctx.failures.append(f"{r['case']}: {res['error']}")
        # A baseline failing a check is information about the baseline (recorded in its row), not a failure.
        if (variant.startswith("wave_rt") and isinstance(r["correctness"], dict)
                and r["correctness"].get("passed") is False):
            ctx.failures.append(f"{r['case']}: correctness check failed: {r['correctness']}")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN (never passes) if x holds a non-finite value."""
    x64 = x.detach().to(device=ref.device, dtype=torch.float64)
    if not torch.isfinite(x64).all():
        return float("nan")
    return float((x64 - ref).norm() / ref.norm().clamp_min(1e-300))


def error_floor(dtype: torch.dtype) -> float:
    """Absolute error under which a variant passes whatever the eager error: eager's own error can be tiny
    by luck, and 2x a lucky number is no bound (METHOD.md: fp32 far under 1e-3, bf16 1e-3..1e-2)."""
    return 1e-5 if dtype == torch.float32 else 2e-3 if dtype == torch.float16 else 8e-3


def compare_to_reference(ctx: Ctx, names: list[str], outputs: dict[str, Any], ref: list[torch.Tensor],
                         baseline: str = "eager", absolute: bool = False) -> dict[str, Any]:
    """Per variant: relative errors of each output against the float64 reference; a variant passes when
    every error is <= max(2 x the eager error of that output, error_floor), or (absolute=True, for a
    baseline too imprecise to bound anything) <= error_floor alone."""
    errs: dict[str, list[float]] = {}
    for variant, out in outputs.items():
        tensors = out if isinstance(out, (tuple, list)) else [out]
        errs[variant] = [rel_err(t, r) for t, r in zip(tensors, ref)]
    base = errs.get(baseline)
    result: dict[str, Any] = {}
    for variant, e in errs.items():
        bounds = [max(2 * b, error_floor(ctx.dtype)) if not absolute and math.isfinite(b) else error_floor(ctx.dtype)
                  for b in (base or [math.nan] * len(e))]
        result[variant] = {
            "check": "relative Frobenius error vs the float64 reference at the benchmark shape",
            "errors": dict(zip(names, e)),
            "bounds": dict(zip(names, bounds)),
            "passed": all(x <= b for x, b in zip(e, bounds)),  # NaN never passes
        }
    return result


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


# ------------------------------------------------------------------------------------- similarity_topk
def _topk_chunk_step(qn: torch.Tensor, chunk: torch.Tensor, best_v: torch.Tensor, best_i: torch.Tensor,
                     base: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the chunked reference: normalise the chunk, score it, keep the running top-k.
    `base` (the chunk's first corpus row) is a tensor so that a compiled step does not recompile per chunk."""
    cn = F.normalize(chunk, dim=-1)
    scores = qn @ cn.T
    v, i = torch.topk(scores, k, dim=1)
    v = torch.cat([best_v, v], dim=1)
    i = torch.cat([best_i, i + base], dim=1)
    v, j = torch.topk(v, k, dim=1)
    return v, torch.gather(i, 1, j)


def chunked_topk(step: Callable, queries: torch.Tensor, corpus: torch.Tensor, k: int, chunk_rows: int,
                 bases: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager baseline: the similarity_topk reference evaluated one corpus chunk at a time, with a running
    merge (the full q x N scores do not fit). A host corpus is copied to the device chunk by chunk."""
    qn = F.normalize(queries, dim=-1)
    best_v = torch.full((queries.shape[0], k), float("-inf"), dtype=qn.dtype, device=queries.device)
    best_i = torch.full((queries.shape[0], k), -1, dtype=torch.int64, device=queries.device)
    for n, c0 in enumerate(range(0, corpus.shape[0], chunk_rows)):
        chunk = corpus[c0:c0 + chunk_rows].to(queries.device, non_blocking=True)
        best_v, best_i = step(qn, chunk, best_v, best_i, bases[n], k)
    return best_v, best_i


def choose_topk_rows(ctx: Ctx, location: str) -> tuple[int, str]:
    """Rows of corpus to use: the requested N, or fewer when it does not fit (device: free GPU memory minus
    the headroom; host: half the available RAM), rounded down to a multiple of the eager chunk."""
    s = ctx.shapes
    row_bytes = s.dim * ctx.elt
    if not ctx.cuda:
        return s.topk_n, "requested N (CPU smoke run)"
    if location == "device":
        free, total = torch.cuda.mem_get_info(ctx.device)
        fit = max(0, free - ctx.topk_headroom) // row_bytes
        why = f"free {free / GIB:.1f} GiB of {total / GIB:.1f} GiB, headroom {ctx.topk_headroom / GIB:.1f} GiB"
    else:
        import psutil

        avail = psutil.virtual_memory().available
        fit = (avail // 2) // row_bytes
        why = f"host RAM available {avail / GIB:.1f} GiB, at most half of it used"
    n = min(s.topk_n, fit // s.topk_chunk * s.topk_chunk)
    return n, why


def fill_corpus(ctx: Ctx, corpus: torch.Tensor, seed: int) -> None:
    """Random rows, generated on the device chunk by chunk (no full-size temporary)."""
    g = seeded(ctx, seed)
    step = max(1, (256 * 2**20) // (corpus.shape[1] * ctx.elt))
    for r0 in range(0, corpus.shape[0], step):
        part = corpus[r0:r0 + step]
        if part.device == ctx.device:
            part.normal_(generator=g)
        else:
            part.copy_(torch.empty(part.shape, dtype=ctx.dtype, device=ctx.device).normal_(generator=g))
    sync(ctx)


def alloc_corpus(ctx: Ctx, location: str, n_rows: int,
                 extra: dict[str, Any]) -> tuple[torch.Tensor | None, bool]:
    """The corpus tensor; on the device, N shrinks by 10% (whole eager chunks) per allocation that runs out of
    memory. A host corpus is page-locked through cudaHostRegister (the caching host allocator would round a
    72 GB request up to a power of two)."""
    chunk = ctx.shapes.topk_chunk
    if location == "host" and ctx.cuda:
        corpus = torch.empty(n_rows, ctx.shapes.dim, dtype=ctx.dtype)
        err = torch.cuda.cudart().cudaHostRegister(corpus.data_ptr(), corpus.numel() * ctx.elt, 0)
        extra["host_page_locked"] = int(err) == 0
        return corpus, int(err) == 0
    device = ctx.device if location == "device" else torch.device("cpu")
    while n_rows >= chunk:
        try:
            return torch.empty(n_rows, ctx.shapes.dim, dtype=ctx.dtype, device=device), False
        except torch.OutOfMemoryError:
            cleanup(ctx)
            smaller = int(n_rows * 0.9) // chunk * chunk
            extra["N_choice"] += f"; {n_rows} rows ran out of memory, trying {smaller}"
            n_rows = smaller
    return None, False


def bench_similarity(ctx: Ctx, location: str) -> None:
    s = ctx.shapes
    q, D, k, C = s.topk_q, s.dim, s.topk_k, s.topk_chunk
    n_rows, why = choose_topk_rows(ctx, location)
    base_extra = {"N_requested": s.topk_n, "corpus_location": location, "eager_chunk_rows": C,
                  "normalize": True, "N_choice": why}
    if n_rows < C:
        ctx.skipped.append({"op": "similarity_topk", "location": location,
                            "reason": f"corpus does not fit ({why})"})
        return
    cleanup(ctx)
    corpus, registered = alloc_corpus(ctx, location, n_rows, base_extra)
    if corpus is None:
        ctx.skipped.append({"op": "similarity_topk", "location": location, "reason": base_extra["N_choice"]})
        return
    n_rows = corpus.shape[0]
    try:
        fill_corpus(ctx, corpus, seed=300)
        queries = torch.randn(q, D, dtype=ctx.dtype, device=ctx.device, generator=seeded(ctx, 301))
        bases = [torch.tensor(c0, dtype=torch.int64, device=ctx.device) for c0 in range(0, n_rows, C)]
        shape = {"q": q, "N": n_rows, "D": D, "k": k}
        results: dict[str, dict[str, Any]] = {}

        def run_ours() -> tuple[torch.Tensor, torch.Tensor]:
            with ours(ctx):
                return similarity_topk(queries, corpus, k)

        results["wave_rt"] = measure(ctx, run_ours)
        results["eager_chunked"] = measure(
            ctx, lambda: chunked_topk(_topk_chunk_step, queries, corpus, k, C, bases))
        if not ctx.no_compile:
            step = compiled(ctx, _topk_chunk_step)
            results["compile_chunked"] = measure(ctx, lambda: chunked_topk(step, queries, corpus, k, C, bases))
        if location == "device":
            results["naive_reference"] = measure(ctx, lambda: similarity_topk_reference(queries, corpus, k))
        outputs = {v: r.pop("output") for v, r in results.items() if r.get("status") == "ok"}

        correctness = topk_checks(ctx, queries, corpus, outputs)
        del outputs
        elt = ctx.elt
        flops = 2.0 * q * n_rows * D
        n_bytes = float(n_rows * D + q * D) * elt + q * k * 12.0
        corpus_bytes = float(n_rows * D * elt)
        if location == "device":
            floor_bw = ctx.ceilings["copy_bandwidth_GBps"]
            floor_what = "corpus bytes / measured device copy bandwidth"
        else:
            floor_bw = ctx.ceilings.get("h2d_bandwidth_GBps") or ctx.ceilings["copy_bandwidth_GBps"]
            floor_what = "corpus bytes / measured pinned host-to-device bandwidth"
        bw_floor_ms = corpus_bytes / (floor_bw * 1e9) * 1e3
        per_variant = {}
        for v, r in results.items():
            ms = r.get("median_ms") if r.get("status") == "ok" else None
            per_variant[v] = {"bandwidth_floor_ms": bw_floor_ms, "bandwidth_floor": floor_what,
                              "fraction_of_bandwidth_floor": (bw_floor_ms / ms) if ms else None}
        make_rows(ctx, "similarity_topk", "forward", shape, results, flops, n_bytes, correctness,
                  baseline="eager_chunked", extra=base_extra, per_variant=per_variant)
    finally:
        if registered:
            torch.cuda.cudart().cudaHostUnregister(corpus.data_ptr())


def topk_checks(ctx: Ctx, queries: torch.Tensor, corpus: torch.Tensor,
                outputs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    s = ctx.shapes
    k = s.topk_k
    out: dict[str, Any] = {}
    # (1) ours on a slice against the float64 reference: same bf16 inputs, so only accumulation differs.
    qs = queries[:s.topk_check_q]
    cs = corpus[:min(s.topk_check_n, corpus.shape[0])]
    with ours(ctx), poisoned():
        v, i = similarity_topk(qs, cs, k)
    rv, ri = similarity_topk_reference(qs.double(), cs.to(ctx.device).double(), k)
    v_err = float((v.double() - rv).abs().max()) if torch.isfinite(v).all() else float("nan")
    recall = _recall(i, ri)
    slice_check = {"check": f"{qs.shape[0]} queries x {cs.shape[0]} corpus rows vs the float64 reference",
                   "max_abs_value_error": v_err, "index_recall": recall,
                   "passed": v_err <= 1e-4 and recall >= 0.99}
    del v, i, rv, ri
    # (2) full run: ours against eager_chunked. Eager's scores are rounded to bf16 (one ulp = 2^-8 relative),
    # so the i-th best values agree to within that; the index sets may differ where rounding makes ties.
    ref = outputs.get("eager_chunked")
    for variant, (vals, idx) in outputs.items():
        entry: dict[str, Any] = {}
        if variant == "wave_rt":
            entry["slice_vs_float64"] = slice_check
        if ref is not None and variant != "eager_chunked" and vals.shape == ref[0].shape:
            a, b = vals.double(), ref[0].double().to(vals.device)
            tol = b.abs() * 2.0**-7 + 1e-4
            diff = (a - b).abs()
            ok = bool(torch.isfinite(a).all()) and bool((diff <= tol).all())
            entry["full_vs_eager_chunked"] = {"check": "sorted top-k values within one bf16 ulp (+1e-4)",
                                              "max_abs_value_diff": float(diff.max()),
                                              "index_recall": _recall(idx, ref[1].to(idx.device)), "passed": ok}
        if variant == "eager_chunked":
            entry["note"] = "the baseline the other variants' full-run values are compared with"
        passed = [e["passed"] for e in entry.values() if isinstance(e, dict)]
        entry["passed"] = all(passed) if passed else None
        out[variant] = entry
    if "wave_rt" not in out:
        out["wave_rt"] = {"slice_vs_float64": slice_check, "passed": slice_check["passed"]}
    return out


def _recall(idx: torch.Tensor, ref_idx: torch.Tensor) -> float:
    hits = (idx.unsqueeze(2) == ref_idx.unsqueeze(1)).any(dim=2).float()
    return float(hits.mean())


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


# ---------------------------------------------------------------------------------------------- plan
def estimate(ctx: Ctx, ops: tuple[str, ...]) -> dict[str, float]:
    """Rough seconds per op on the target GPU: each variant ~ (4 + repeats) calls at 40% of the roofline
    (nominal ceilings), 30 s per torch.compile, 10 s of autotuning per kernel shape. A guide for --only."""
    s = ctx.shapes
    nominal = nominal_ceilings() or {"bandwidth_GBps": 3000.0, "bf16_TFLOPs": 800.0}
    bw, fl = nominal["bandwidth_GBps"] * 1e9, nominal["bf16_TFLOPs"] * 1e12
    compile_s = 0.0 if ctx.no_compile else (2.0 if ctx.smoke else 30.0)
    tune_s = 0.5 if ctx.smoke else 10.0

    def variant_s(flops: float, n_bytes: float) -> float:
        one = max(flops / fl, n_bytes / bw) / 0.4 + 20e-6
        repeats = max(ctx.min_repeats, min(ctx.max_repeats, int(ctx.target_s / one)))
        return (4 + repeats) * one

    est = {"ceilings": 3.0}
    e = 2
    K = s.layers * s.dim
    t = 0.0
    for b in s.fusion_batches:
        for mult in (1, 3):
            per = variant_s(2.0 * mult * b * K * s.hidden_out, (s.hidden_out * K * mult + b * K) * e)
            t += 4 * per + compile_s + tune_s
    est["layer_fusion_mlp"] = t
    t = 0.0
    for b in s.fusion_batches:
        for mult in (1, 3):
            t += 4 * variant_s(2.0 * b * K, mult * b * K * e) + compile_s + tune_s
    est["scalar_mix"] = t
    n = s.topk_n
    per = variant_s(2.0 * s.topk_q * n * s.dim, n * s.dim * e)
    est["similarity_topk"] = len(ctx.topk_locations) * (3 * per * 1.5 + compile_s + tune_s + 10.0)
    t = 0.0
    for b in s.nce_batches:
        per = variant_s(8.0 * b * b * s.dim, 4 * b * s.dim * e)  # ours recomputes the scores in its backward
        t += per * (3 if b <= 65_536 else 1) + compile_s + 2 * tune_s
    est["info_nce"] = t
    return {k: v for k, v in est.items() if k == "ceilings" or k in ops}


# ---------------------------------------------------------------------------------------------- output
def device_slug() -> str:
    name = harness.device_name()
    for key in ("H100", "H200", "A100", "L40S", "B200"):
        if key in name:
            return key.lower()
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def device_info(ctx: Ctx) -> dict[str, Any]:
    info: dict[str, Any] = {"name": harness.device_name()}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        info.update(multiprocessors=p.multi_processor_count, total_memory_bytes=p.total_memory,
                    l2_cache_bytes=getattr(p, "L2_cache_size", None), capability=f"{p.major}.{p.minor}")
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,"
                                "clocks.mem,power.limit", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20, check=True)
            info["nvidia_smi"] = q.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = None
    return info


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_doc(path: Path, doc: dict[str, Any], merged: dict[str, Any] | None, ops: tuple[str, ...]) -> None:
    """Write `doc`; with `merged` (an earlier result of the same device, read once at start), keep its rows of
    the ops this run did not do."""
    if merged is not None:
        kept = [r for r in merged.get("rows", []) if r.get("op") not in ops]
        doc["rows"] = kept + doc["rows"]
        doc["skipped"] = [x for x in merged.get("skipped", []) if x.get("op") not in ops] + doc["skipped"]
        runs = merged.get("merged_runs") or [{k: merged.get(k) for k in ("command", "commit", "date", "ceilings", "ops")}]
        doc["merged_runs"] = [*runs, {k: doc.get(k) for k in ("command", "commit", "date", "ceilings", "ops")}]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(doc), indent=2) + "\n")
    tmp.replace(path)  # a run killed while writing leaves the previous complete file


def print_table(ctx: Ctx) -> None:
    print()
    print(f"{'op':17s} {'pass':16s} {'shape':34s} {'variant':22s} {'median ms':>10s} {'rate':>14s} "
          f"{'frac':>6s} {'vs eager':>8s} {'peak MiB':>9s} {'check':>6s}")
    for r in ctx.rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["median_ms"] is None:
            print(f"{r['op']:17s} {r['pass']:16s} {shape:34s} {r['variant']:22s} {r['status']:>10s}  "
                  f"{(r.get('error') or '')[:60]}")
            continue
        rate = r["achieved_TFLOPs"] if r["bound"] == "compute" else r["achieved_GBps"]
        unit = "TF/s" if r["bound"] == "compute" else "GB/s"
        speed = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-"
        peak = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") is not None else "-"
        chk = r["correctness"].get("passed") if isinstance(r["correctness"], dict) else None
        if not r["variant"].startswith("wave_rt") and chk is not None:
            chk = f"({chk})"  # a baseline's own check: information, not a failure of the run
        print(f"{r['op']:17s} {r['pass']:16s} {shape:34s} {r['variant']:22s} {r['median_ms']:10.3f} "
              f"{rate:9.1f} {unit:4s} {r['fraction_of_ceiling']:6.2f} {speed:>8s} {peak:>9s} {str(chk):>6s}")
    for s in ctx.skipped:
        print(f"skipped: {s}")


# ------------------------------------------------------------------------------------------------ main
def out_path_for_dry_run(args: argparse.Namespace) -> Path:
    return args.out if args.out is not None else harness.RESULTS / "kernels.json"


def out_path(ctx: Ctx, args: argparse.Namespace) -> Path | None:
    if args.out is not None:
        return args.out
    return None if ctx.smoke else harness.RESULTS / f"kernels_{device_slug()}.json"


def save(ctx: Ctx, args: argparse.Namespace, ops: tuple[str, ...], final: bool) -> None:
    path = out_path(ctx, args)
    if path is None:
        if final:
            print("smoke run: no result file written (pass --out to write one)")
        return
    command = "python bench/kernels/bench_kernels.py " + " ".join(shlex.quote(a) for a in args.argv)
    doc = {
        "bench": "kernels_smoke" if ctx.smoke else "kernels",
        "smoke": ctx.smoke,
        "complete": final,
        "note": ("SMOKE RUN: tiny shapes on the CPU to exercise every code path; the timings are not "
                 "performance claims" if ctx.smoke else "GPU run; see the docstring of bench/kernels/bench_kernels.py"),
        "device": harness.device_name(),
        "device_info": device_info(ctx),
        "versions": harness.versions(),
        "commit": args.commit or harness.git_commit(),
        "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ops": list(ops),
        "settings": {"dtype": str(ctx.dtype).replace("torch.", ""), "backend": ctx.ours_label,
                     "compile_backend": ctx.compile_backend, "compile_mode": ctx.compile_mode or "default",
                     "compile": not ctx.no_compile, "target_s": ctx.target_s, "min_repeats": ctx.min_repeats,
                     "max_repeats": ctx.max_repeats, "budget_s": ctx.budget_s, "shapes": ctx.shapes.__dict__,
                     "topk_corpus": list(ctx.topk_locations), "topk_headroom_bytes": ctx.topk_headroom,
                     "timing": "median of CUDA-event timings per call (bench/harness.py time_it) after untimed "
                               "warm-up calls; first_call_s = the first call (compile/autotune) by wall clock"},
        "ceilings": {"measured": ctx.ceilings, "nominal_design_md": nominal_ceilings(),
                     "nominal_source": "DESIGN.md section 4 (bench/harness.py CEILINGS)",
                     "used_for_fractions": "measured"},
        "elapsed_s": ctx.elapsed(),
        "failures": ctx.failures,
        "skipped": ctx.skipped,
        "rows": ctx.rows,
    }
    write_doc(path, doc, args.merged, ops)
    if final:
        print(f"wrote {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, every code path; no claims")
    ap.add_argument("--only", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    ap.add_argument("--out", type=Path, default=None,
                    help="result JSON (default on GPU: bench/results/kernels_<device>.json; smoke: none)")
    ap.add_argument("--merge", type=Path, default=None,
                    help="earlier result JSON of the same device: its rows of ops not run now are kept")
    ap.add_argument("--backend", choices=["auto", *kdispatch.BACKENDS], default="auto",
                    help="backend of our kernels (auto: triton on CUDA; on CPU interpret with TRITON_INTERPRET=1, else torch)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="default bf16; fp32 for --backend interpret (the interpreter's bf16 is wrong)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--target-s", type=float, default=None, help="timed seconds per variant (GPU 1.0, smoke 0.05)")
    ap.add_argument("--min-repeats", type=int, default=5)
    ap.add_argument("--max-repeats", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new case after this many seconds (default GPU 420, smoke none)")
    ap.add_argument("--topk-corpus", default=None, help="device, host or device,host (default: device; smoke: both)")
    ap.add_argument("--topk-n", type=int, default=None, help="corpus rows requested (default 10M)")
    ap.add_argument("--topk-headroom-gib", type=float, default=4.0)
    ap.add_argument("--info-nce-batches", default=None, help="comma-separated B (= M), default 16384,65536,262144")
    ap.add_argument("--commit", default=None, help="commit to record (the device machine's copy may lack .git)")
    ap.add_argument("--plan", action="store_true", help="print the rough runtime estimate and exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="--plan, and check that the --out / --merge paths are usable (no GPU needed)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ops = tuple(o.strip() for o in args.only.split(",") if o.strip())
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        print(f"unknown op(s) {unknown}; choose from {OPS}", file=sys.stderr)
        return 2
    if args.merge is not None and not args.merge.exists():
        print(f"--merge {args.merge}: no such file", file=sys.stderr)
        return 2
    args.merged = None
    if args.merge is not None:
        args.merged = json.loads(args.merge.read_text())
        merge_device = args.merged.get("device")
        if merge_device != harness.device_name():
            print(f"--merge {args.merge}: its device {merge_device!r} is not this machine's", file=sys.stderr)
            return 2
    if args.dry_run:
        args.plan = True
        out = out_path_for_dry_run(args)
        if harness.dry_run_report("bench_kernels.py", [out]) != 0:
            return 1
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke and not args.plan:
        print("the full benchmark needs a CUDA device; use --smoke for the tiny CPU run", file=sys.stderr)
        return 2
    # "auto" times the Triton kernels on CUDA: layer_fusion_mlp's automatic choice for contiguous hidden is the
    # cuBLAS view GEMM, which the wave_rt_torch_fallback rows already time.
    backend = ("triton" if cuda else None) if args.backend == "auto" else args.backend
    dtype_name = args.dtype or ("fp32" if backend == "interpret" or (backend is None and not cuda and
                                                                      kdispatch.interpret_requested()) else "bf16")
    shapes = SMOKE if args.smoke else FULL
    if args.topk_n is not None:
        shapes = Shapes(**{**shapes.__dict__, "topk_n": args.topk_n})
    if args.info_nce_batches:
        shapes = Shapes(**{**shapes.__dict__, "nce_batches": tuple(int(x) for x in args.info_nce_batches.split(","))})
    locations = tuple((args.topk_corpus or ("device,host" if args.smoke else "device")).split(","))
    if any(loc not in ("device", "host") for loc in locations):
        print(f"--topk-corpus: {locations}; expected device and/or host", file=sys.stderr)
        return 2
    ctx = Ctx(device=torch.device("cuda" if cuda else "cpu"), dtype=DTYPES[dtype_name], backend=backend,
              smoke=args.smoke, shapes=shapes, compile_backend=args.compile_backend,
              compile_mode=args.compile_mode, no_compile=args.no_compile,
              target_s=args.target_s if args.target_s is not None else (0.05 if args.smoke else 1.0),
              min_repeats=args.min_repeats if not args.smoke else min(args.min_repeats, 3),
              max_repeats=args.max_repeats, budget_s=args.budget_s if args.budget_s is not None else
              (None if args.smoke else 420.0), topk_locations=locations,
              topk_headroom=int(args.topk_headroom_gib * GIB))

    if ctx.smoke:
        torch.set_num_threads(1)  # tiny ops on a shared CPU: thread hand-offs would be most of each timing
    est = estimate(ctx, ops)
    print(f"kernels benchmark ({'SMOKE: tiny shapes on CPU, not performance numbers' if ctx.smoke else 'GPU'}); "
          f"device {harness.device_name()}, dtype {dtype_name}, our backend {ctx.ours_label}")
    print("rough runtime estimate (s): " + ", ".join(f"{k} {v:.0f}" for k, v in est.items())
          + f"; total {sum(est.values()):.0f}", flush=True)
    if args.plan:
        return 0

    ctx.ceilings = measure_ceilings(ctx, host_bandwidth="host" in locations and "similarity_topk" in ops)
    print("measured ceilings: " + ", ".join(f"{k} {v:.4g}" for k, v in ctx.ceilings.items()), flush=True)

    sections: list[tuple[str, Any, Callable[[Any], None]]] = []
    if "layer_fusion_mlp" in ops:
        sections += [("layer_fusion_mlp", b, lambda b: bench_layer_fusion(ctx, b)) for b in shapes.fusion_batches]
    if "scalar_mix" in ops:
        sections += [("scalar_mix", b, lambda b: bench_scalar_mix(ctx, b)) for b in shapes.fusion_batches]
    if "similarity_topk" in ops:
        sections += [("similarity_topk", loc, lambda loc: bench_similarity(ctx, loc)) for loc in locations]
    if "info_nce" in ops:
        nce_state: dict[str, Any] = {}
        sections += [("info_nce", b, lambda b: bench_info_nce(ctx, nce_state, b))
                     for b in (None, *shapes.nce_batches)]
    for op, arg, run in sections:
        if ctx.over_budget():
            ctx.skipped.append({"op": op, "case": arg, "reason": f"time budget of {ctx.budget_s:.0f} s spent"})
            print(f"{op} {arg}: skipped (time budget)", flush=True)
            continue
        t = time.perf_counter()
        n_rows = len(ctx.rows)
        try:
            run(arg)
        except Exception as exc:  # a broken section is recorded and the others still run
            ctx.failures.append(f"{op} {arg}: {type(exc).__name__}: {exc}")
            ctx.skipped.append({"op": op, "case": arg, "reason": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc(limit=8)})
            traceback.print_exc()
        cleanup(ctx)
        print(f"{op} {arg if arg is not None else ''}: {len(ctx.rows) - n_rows} rows in "
              f"{time.perf_counter() - t:.1f} s (elapsed {ctx.elapsed():.0f} s)", flush=True)
        # After every section: a run killed at the device tool's time limit still leaves its finished rows.
        save(ctx, args, ops, final=False)

    print_table(ctx)
    save(ctx, args, ops, final=True)
    if ctx.failures:
        print("FAILURES:\n  " + "\n  ".join(ctx.failures), file=sys.stderr)
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    sys.exit(main())
