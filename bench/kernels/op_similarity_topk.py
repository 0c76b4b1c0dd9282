"""Benchmark of similarity_topk against the chunked cuBLAS + torch.topk loop."""

from __future__ import annotations

import sys
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
    compiled,
    make_rows,
    measure,
    ours,
    poisoned,
    seeded,
    sync,
)
from wave_rt.kernels import similarity_topk  # noqa: E402
from wave_rt.kernels.reference import similarity_topk_reference  # noqa: E402


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


class CorpusHolder:
    """The corpus of the current location, kept across the q sections of that location (filling 72 GB
    once, not once per q) and released when the location changes or the sections end."""

    def __init__(self) -> None:
        self.location: str | None = None
        self.corpus: torch.Tensor | None = None
        self.registered = False
        self.extra: dict[str, Any] = {}

    def release(self) -> None:
        if self.registered and self.corpus is not None:
            torch.cuda.cudart().cudaHostUnregister(self.corpus.data_ptr())
        self.location, self.corpus, self.registered, self.extra = None, None, False, {}

    def get(self, ctx: Ctx, location: str) -> tuple[torch.Tensor | None, dict[str, Any]]:
        if self.location == location:
            return self.corpus, self.extra
        self.release()
        s = ctx.shapes
        n_rows, why = choose_topk_rows(ctx, location)
        extra = {"N_requested": s.topk_n, "corpus_location": location, "eager_chunk_rows": s.topk_chunk,
                 "normalize": True, "N_choice": why}
        if n_rows < s.topk_chunk:
            extra["skip"] = f"corpus does not fit ({why})"
            return None, extra
        cleanup(ctx)
        corpus, registered = alloc_corpus(ctx, location, n_rows, extra)
        if corpus is None:
            extra["skip"] = extra["N_choice"]
            return None, extra
        fill_corpus(ctx, corpus, seed=300)
        self.location, self.corpus, self.registered, self.extra = location, corpus, registered, extra
        return corpus, extra


def bench_similarity(ctx: Ctx, holder: CorpusHolder, location: str, q: int) -> None:
    """One (corpus location, number of queries) case. q = ctx.shapes.topk_q is the compute-bound case with
    every baseline; smaller q are the bandwidth rows (ours and the eager chunked loop only)."""
    s = ctx.shapes
    D, k, C = s.dim, s.topk_k, s.topk_chunk
    corpus, base_extra = holder.get(ctx, location)
    if corpus is None:
        ctx.skipped.append({"op": "similarity_topk", "location": location, "q": q, "reason": base_extra["skip"]})
        return
    n_rows = corpus.shape[0]
    main_case = q == s.topk_q
    queries = torch.randn(q, D, dtype=ctx.dtype, device=ctx.device, generator=seeded(ctx, 301))
    bases = [torch.tensor(c0, dtype=torch.int64, device=ctx.device) for c0 in range(0, n_rows, C)]
    shape = {"q": q, "N": n_rows, "D": D, "k": k}
    results: dict[str, dict[str, Any]] = {}

    def run_ours() -> tuple[torch.Tensor, torch.Tensor]:
        with ours(ctx):
            return similarity_topk(queries, corpus, k)

    results["wave_rt"] = measure(ctx, run_ours)
    results["eager_chunked"] = measure(ctx, lambda: chunked_topk(_topk_chunk_step, queries, corpus, k, C, bases))
    if main_case and not ctx.no_compile:
        step = compiled(ctx, _topk_chunk_step)
        results["compile_chunked"] = measure(ctx, lambda: chunked_topk(step, queries, corpus, k, C, bases))
    if main_case and location == "device":
        results["naive_reference"] = measure(ctx, lambda: similarity_topk_reference(queries, corpus, k))
    outputs = {v: r.pop("output") for v, r in results.items() if r.get("status") == "ok"}

    correctness = topk_checks(ctx, queries, corpus, outputs)
    del outputs
    elt = ctx.elt
    flops = 2.0 * q * n_rows * D
    n_bytes = float(n_rows * D + q * D) * elt + q * k * 12.0
    corpus_bytes = float(n_rows * D * elt)
    if location == "device":
        # A pass that reads the corpus once moves its bytes one way; the copy ceiling counts read + write.
        floor_bw = ctx.ceilings["copy_bandwidth_GBps"]
        floor_what = "corpus bytes / measured device copy bandwidth (bytes read + written)"
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
              baseline="eager_chunked", extra=base_extra | {"regime": "many queries" if q > 16 else "few queries"},
              per_variant=per_variant)


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
