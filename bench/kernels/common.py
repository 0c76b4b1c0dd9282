"""Shared harness of the kernel benchmarks (bench/kernels/op_*.py): shapes, the run context, timing and
peak memory of one variant (on bench/harness.py), the measured ceilings, result rows in DESIGN.md section 7's
shape, correctness helpers and the result document."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness  # noqa: E402
from wave_rt.kernels import _dispatch as kdispatch  # noqa: E402

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
