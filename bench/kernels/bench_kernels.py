"""Kernel benchmark (issues 3, 14): wave_rt.kernels against PyTorch eager and torch.compile of the references.

This file is the CLI; each op lives in bench/kernels/op_<op>.py on the shared harness bench/kernels/common.py
(itself on bench/harness.py). The search step of `wave-rt search` is benchmarked by bench/bench_search.py.

Ops and shapes (GPU run, bf16):
  layer_fusion_mlp  B in {1, 64, 512}, L=28, D=3584, H=3584; forward and forward+backward (dW1, db1, dH)
  scalar_mix        the same B, L, D; forward and forward+backward (d hidden, d weights)
  similarity_topk   q=1024, N=10M (fewer if the corpus does not fit, see below), D=3584, k=100, normalize=True;
                    plus bandwidth rows at q=16 and q=1 on the same corpus (--topk-q)
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
import datetime as _dt
import json
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (bench/kernels/common.py: the shared harness)
    DTYPES,
    FULL,
    GIB,
    SMOKE,
    Ctx,
    Shapes,
    cleanup,
    device_info,
    device_slug,
    measure_ceilings,
    nominal_ceilings,
    print_table,
    write_doc,
)
from op_info_nce import bench_info_nce  # noqa: E402
from op_layer_fusion import bench_layer_fusion  # noqa: E402
from op_scalar_mix import bench_scalar_mix  # noqa: E402
from op_similarity_topk import CorpusHolder, bench_similarity  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness  # noqa: E402
from wave_rt.kernels import _dispatch as kdispatch  # noqa: E402

OPS = ("layer_fusion_mlp", "scalar_mix", "similarity_topk", "info_nce")


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
    few = 2 * variant_s(0.0, n * s.dim * e) + tune_s  # each bandwidth row: ours + eager chunked
    est["similarity_topk"] = len(ctx.topk_locations) * (3 * per * 1.5 + compile_s + tune_s + 10.0 + 2 * few)
    t = 0.0
    for b in s.nce_batches:
        per = variant_s(8.0 * b * b * s.dim, 4 * b * s.dim * e)  # ours recomputes the scores in its backward
        t += per * (3 if b <= 65_536 else 1) + compile_s + 2 * tune_s
    est["info_nce"] = t
    return {k: v for k, v in est.items() if k == "ceilings" or k in ops}


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
    ap.add_argument("--topk-q", default=None,
                    help="comma-separated numbers of queries; the first is the compute-bound case with every "
                         "baseline, the others bandwidth rows (default 1024,16,1; smoke 7,16,1)")
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
    topk_qs = tuple(int(x) for x in args.topk_q.split(",")) if args.topk_q else (shapes.topk_q, 16, 1)
    if topk_qs[0] != shapes.topk_q:
        shapes = Shapes(**{**shapes.__dict__, "topk_q": topk_qs[0]})
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
        holder = CorpusHolder()
        sections += [("similarity_topk", (loc, q), lambda case: bench_similarity(ctx, holder, *case))
                     for loc in locations for q in topk_qs]
        sections.append(("similarity_topk", "release corpus", lambda _: holder.release()))
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
