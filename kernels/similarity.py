"""Pooled similarity top-k (DESIGN.md section 4.2): scores = queries @ corpus.T, top-k per query, streamed.

The q x N score matrix never exists. Each program of the filter kernel owns a block of queries and a
contiguous range of corpus rows and computes one [queries, corpus-tile] score tile at a time (tl.dot over
D, fp32 accumulation). Two regimes pick the tile shapes: few queries (q <= 16: one 16-row query tile, a
bandwidth-bound pass that reads the corpus once and computes its norms from the tiles it loads anyway)
and many queries (64/128-row tensor-core tiles; the norms of both sides computed once beforehand).

Selection, FAISS block-select style: each row keeps an fp32 threshold (the k-th best score its program has
folded so far, -inf at first). Scores above it are appended (fp32 score, int32 row) to a small per-row
candidate buffer; only when a buffer would overflow (and once at the end) are the candidates folded into
the row's running top-K_PAD list with bitonic networks, which also raises the threshold. After the first
few tiles almost no score beats the threshold, so almost every tile costs its GEMM and one comparison.
A second kernel merges the per-range lists of all programs (and the result of previous corpus chunks),
so a corpus of any length goes through several launches. Memory beyond the inputs: O(q * k) (the lists
and buffers of one launch, bounded by _WORKSPACE_BYTES).

In the folds scores and indices travel as one int64 key per candidate: the high 32 bits are the fp32 score
mapped to a signed integer with the same order, the low 32 bits are (2^32 - 1 - index). Keys are unique,
larger key means larger score and, for equal scores, lower index, so the bitonic sorts and merges below are
exact and ties go to the lower index by construction. The threshold test is strict: a program scans its
range in index order, so a later score equal to the k-th best loses that tie anyway.

Folding: take the buffer's own top-K (a bitonic top-k), reverse it and take the elementwise max with the
running list (sorted descending): the result holds exactly the top-K of the union as a bitonic sequence,
which one bitonic merge sorts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _dispatch as dispatch
from ._checks import KernelArgumentError, check_tensor
from ._dispatch import Kernel, config, tl, triton

MAX_K = 1024
_MIN_KEY = -(2**63)  # below every key of a non-NaN score: the padding of partial top-k lists
_LOW_MASK = 0xFFFFFFFF


# ------------------------------------------------------------------------------------ bitonic network
# Sorting networks on int64 keys, written on the "hypercube" view of a tile (a [2**R, 2**C] tile reshaped
# to R + C axes of size 2) like triton.language's own sort. The partner of an element along one size-2 axis
# is sum(pair) - self: exact for int64 (wrapping arithmetic) and a plain sum reduction, which the Triton
# interpreter runs as one numpy call (its generic reductions, e.g. the xor_sum of tl.sort, loop in Python
# per element: far too slow for CI).
@triton.jit
def _indicator(n_dims: tl.constexpr, axis: tl.constexpr):
    """0/1 position along the `axis`-th innermost size-2 axis, broadcastable against the hypercube."""
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - axis - 1) + [2] + [1] * axis)


@triton.jit
def _compare_swap(h, flip, axis: tl.constexpr, n_dims: tl.constexpr):
    partner = tl.sum(h, axis=n_dims - 1 - axis, keep_dims=True) - h
    return tl.where((h > partner) != (flip ^ _indicator(n_dims, axis)), partner, h)


@triton.jit
def _bitonic_merge(h, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
    """Sort every bitonic run of 2**stage along the innermost axes: order 0 ascending, 1 descending,
    2 alternating between neighbouring runs (the building block of a bitonic sort)."""
    if order == 2:
        flip = _indicator(n_dims, stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _compare_swap(h, flip, stage - 1 - i, n_dims)
    return h


@triton.jit
def _row_topk_ascending(x, LOG_ROWS: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr):
    """The 2**LOG_K largest keys of every row of x [2**LOG_ROWS, 2**LOG_N], each row sorted ascending.

    Bitonic top-k: sort runs of 2**LOG_K (alternating order), then repeatedly keep the elementwise max of
    neighbouring runs (a bitonic run holding the top of both) and re-sort it."""
    n_dims: tl.constexpr = LOG_ROWS + LOG_N
    h = tl.reshape(x, [2] * n_dims)
    for i in tl.static_range(1, LOG_K + 1):
        h = _bitonic_merge(h, i, 2 if i < LOG_N else 0, n_dims)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):
        h = tl.max(h, axis=n_dims - (i - LOG_K) - LOG_K)
        h = _bitonic_merge(h, LOG_K, 2 if i < LOG_N else 0, n_dims - (i - LOG_K))
    return tl.reshape(h, [2**LOG_ROWS, 2**LOG_K])


@triton.jit
def _merge_descending(best, cand_ascending, LOG_ROWS: tl.constexpr, LOG_K: tl.constexpr):
    """Top of (best sorted descending) and (cand sorted ascending), sorted descending: their elementwise
    max is a bitonic run holding exactly the top 2**LOG_K of the union."""
    n_dims: tl.constexpr = LOG_ROWS + LOG_K
    h = tl.reshape(tl.maximum(best, cand_ascending), [2] * n_dims)
    h = _bitonic_merge(h, LOG_K, 1, n_dims)
    return tl.reshape(h, [2**LOG_ROWS, 2**LOG_K])


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _key_of(score, index):
    """int64 keys of fp32 scores and int64 corpus indices (see encode_keys)."""
    # -0.0 and +0.0 are equal scores with different bit patterns: map -0.0 to +0.0 so that the tie between
    # them goes to the lower index like any other tie.
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (4294967295 - index)


@triton.jit
def _score_of(key):
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fold_candidates(best_ptr, buf_s_ptr, buf_i_ptr, cnt_ptr, thr_ptr, row0, n_q, k, index_base, min_key,
                     stride_pm, stride_bm,
                     BLOCK_Q: tl.constexpr, MERGE_Q: tl.constexpr, K_PAD: tl.constexpr, BUF: tl.constexpr,
                     LOG_MQ: tl.constexpr, LOG_BUF: tl.constexpr, LOG_K: tl.constexpr):
    """Fold each row's candidate buffer (cnt[row] entries) into its running list best[row] (K_PAD keys,
    descending) and write the row's new threshold (the k-th best score; -inf while fewer than k are known).

    Rows go MERGE_Q at a time so that the bitonic networks stay within the register file for any k; a
    runtime loop, so that the networks are compiled once, not once per row group. The per-row counts and
    thresholds travel through global scratch because a register tensor cannot be sliced by row group; the
    barriers order those writes against the reads of the other threads of the program."""
    tl.debug_barrier()
    offs_k = tl.arange(0, K_PAD)
    offs_b = tl.arange(0, BUF)
    for g in range(0, BLOCK_Q, MERGE_Q):
        rows = row0 + g + tl.arange(0, MERGE_Q)
        live = rows < n_q
        r64 = rows.to(tl.int64)
        cnt = tl.load(cnt_ptr + rows, mask=live, other=0)
        filled = (offs_b[None, :] < cnt[:, None]) & live[:, None]
        slot = r64[:, None] * stride_bm + offs_b[None, :]
        score = tl.load(buf_s_ptr + slot, mask=filled, other=0.0)
        index = tl.load(buf_i_ptr + slot, mask=filled, other=0).to(tl.int64) + index_base
        keys = tl.where(filled, _key_of(score, index), min_key)
        best_rows = best_ptr + r64[:, None] * stride_pm + offs_k[None, :]
        best = tl.load(best_rows, mask=live[:, None], other=min_key)
        best = _merge_descending(best, _row_topk_ascending(keys, LOG_MQ, LOG_BUF, LOG_K), LOG_MQ, LOG_K)
        tl.store(best_rows, best, mask=live[:, None])
        kth = tl.sum(tl.where(offs_k[None, :] == k - 1, best, 0), axis=1)
        thr = tl.where(kth == min_key, -float("inf"), _score_of(kth))
        tl.store(thr_ptr + rows, thr, mask=live)
    tl.debug_barrier()


@triton.jit
def _topk_filter_kernel(
    q_ptr, c_ptr, q_norm_ptr, c_norm_ptr, part_ptr, buf_s_ptr, buf_i_ptr, cnt_ptr, thr_ptr,
    n_q, n_c, D, k, index_base, min_key, n_splits,
    stride_qm, stride_qd, stride_cn, stride_cd, stride_pm, stride_ps, stride_bm, stride_bs,
    NORMALIZE: tl.constexpr, C_NORM_IN_LOOP: tl.constexpr, K_PAD: tl.constexpr, BUF: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MERGE_Q: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr, LOG_MQ: tl.constexpr, LOG_BUF: tl.constexpr,
    LOG_K: tl.constexpr,
):
    """Top-K_PAD keys of each query row over one contiguous range of corpus rows (one per pid_s), written
    to part[:, pid_s]. Scores that beat the row's threshold are appended to a candidate buffer; a fold
    (sort + merge) runs only when a buffer would overflow, and sets the new thresholds."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_q * BLOCK_Q
    offs_q = row0 + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < n_q
    offs_d = tl.arange(0, BLOCK_D)
    rows_per_split = tl.cdiv(tl.cdiv(n_c, n_splits), BLOCK_N) * BLOCK_N
    n_start = pid_s * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, n_c)

    # This program's slices of the workspaces: its running lists, candidate buffers and scratch.
    best_ptr = part_ptr + pid_s * stride_ps
    buf_s = buf_s_ptr + pid_s * stride_bs
    buf_i = buf_i_ptr + pid_s * stride_bs
    cnt_ws = cnt_ptr + pid_s * n_q
    thr_ws = thr_ptr + pid_s * n_q
    offs_k = tl.arange(0, K_PAD)
    for g in range(0, BLOCK_Q, MERGE_Q):
        rows = row0 + g + tl.arange(0, MERGE_Q)
        tl.store(best_ptr + rows[:, None].to(tl.int64) * stride_pm + offs_k[None, :],
                 tl.full((MERGE_Q, K_PAD), min_key, tl.int64), mask=(rows < n_q)[:, None])

    thr = tl.full((BLOCK_Q,), -float("inf"), tl.float32)
    cnt = tl.zeros((BLOCK_Q,), dtype=tl.int32)
    if NORMALIZE:
        q_norm = tl.load(q_norm_ptr + offs_q, mask=mask_q, other=1.0)
    # Loads read clamped rows instead of masked ones (rows past the end repeat the last row; `valid` drops
    # their scores): with D a multiple of BLOCK_D the hot loop has no masks, which keeps it out of spills.
    q_rows = q_ptr + tl.minimum(offs_q, n_q - 1)[:, None].to(tl.int64) * stride_qm
    buf_rows = offs_q[:, None].to(tl.int64) * stride_bm
    # One step past the range (no tile: D loop and masks empty) folds what the buffers still hold: a single
    # call site of the fold keeps the bitonic networks compiled once.
    for n0 in range(n_start, n_end + BLOCK_N, BLOCK_N):
        past_end = n0 >= n_end
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        c_cols = c_ptr + tl.minimum(offs_n, n_c - 1)[None, :].to(tl.int64) * stride_cn
        acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        c_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        d_end = tl.where(past_end, 0, D)
        for d0 in range(0, d_end, BLOCK_D):
            dd = d0 + offs_d
            if EVEN_D:
                qt = tl.load(q_rows + dd[None, :] * stride_qd)
                ct = tl.load(c_cols + dd[:, None] * stride_cd)
            else:
                qt = tl.load(q_rows + dd[None, :] * stride_qd, mask=(dd < D)[None, :], other=0.0)
                ct = tl.load(c_cols + dd[:, None] * stride_cd, mask=(dd < D)[:, None], other=0.0)
            acc = tl.dot(qt, ct, acc, input_precision=PRECISION)
            if NORMALIZE and C_NORM_IN_LOOP:  # few queries: free, the pass is bound by reading the corpus
                cf = ct.to(tl.float32)
                c_sq += tl.sum(cf * cf, axis=0)
        if NORMALIZE:  # x / max(||x||, 1e-12), as F.normalize; the same division order as the torch path
            if C_NORM_IN_LOOP:
                c_norm = tl.maximum(tl.sqrt(c_sq), 1e-12)
            else:
                c_norm = tl.load(c_norm_ptr + offs_n, mask=mask_n, other=1.0)
            acc = acc / q_norm[:, None] / c_norm[None, :]

        # A NaN score ranks as -inf (last), as in the torch path.
        acc = tl.where(acc == acc, acc, -float("inf"))
        valid = mask_q[:, None] & mask_n[None, :]
        # Strict: this program scans its range in index order, so a later score equal to the threshold has
        # a higher index than the k-th best it ties with and loses the tie. While a row knows fewer than k
        # scores (threshold -inf) every score is taken, -inf included, so that k rows always come back.
        hit = ((acc > thr[:, None]) | (thr == -float("inf"))[:, None]) & valid
        n_new = tl.sum(hit.to(tl.int32), axis=1)
        if past_end | (tl.max(cnt + n_new, axis=0) > BUF):
            tl.store(cnt_ws + offs_q, cnt, mask=mask_q)
            _fold_candidates(best_ptr, buf_s, buf_i, cnt_ws, thr_ws, row0, n_q, k, index_base, min_key,
                             stride_pm, stride_bm, BLOCK_Q, MERGE_Q, K_PAD, BUF, LOG_MQ, LOG_BUF, LOG_K)
            thr = tl.load(thr_ws + offs_q, mask=mask_q, other=-float("inf"))
            cnt = tl.zeros((BLOCK_Q,), dtype=tl.int32)
            hit = ((acc > thr[:, None]) | (thr == -float("inf"))[:, None]) & valid
            n_new = tl.sum(hit.to(tl.int32), axis=1)
        if tl.max(n_new, axis=0) > 0:
            slot = buf_rows + (cnt[:, None] + tl.cumsum(hit.to(tl.int32), axis=1) - 1)
            tl.store(buf_s + slot, acc, mask=hit)
            tl.store(buf_i + slot, tl.broadcast_to(offs_n[None, :], (BLOCK_Q, BLOCK_N)), mask=hit)
            cnt += n_new


@triton.jit
def _topk_merge_kernel(part_ptr, prev_ptr, out_ptr, n_q, n_splits, min_key, stride_pm, stride_ps,
                       HAS_PREV: tl.constexpr, K_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                       LOG_Q: tl.constexpr, LOG_K: tl.constexpr):
    """out = top-K of (prev, part[:, 0], ..., part[:, n_splits-1]); every list sorted descending."""
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, K_PAD)
    mask = (offs_q < n_q)[:, None]
    rows = offs_q[:, None].to(tl.int64)
    if HAS_PREV:
        best = tl.load(prev_ptr + rows * K_PAD + offs_k[None, :], mask=mask, other=min_key)
    else:
        best = tl.full((BLOCK_Q, K_PAD), min_key, tl.int64)
    reverse = K_PAD - 1 - offs_k  # reading a descending list backwards gives the ascending one
    for s in range(0, n_splits):
        cand = tl.load(part_ptr + rows * stride_pm + s * stride_ps + reverse[None, :], mask=mask, other=min_key)
        best = _merge_descending(best, cand, LOG_Q, LOG_K)
    tl.store(out_ptr + rows * K_PAD + offs_k[None, :], best, mask=mask)


def _filter_configs() -> list:
    # 8 warps only: with 4 warps the previous (bitonic-per-tile) kernel returned wrong top-k lists on an H100
    # (Triton 3.6, fp16, k=100), never root-caused; the fold below uses the same bitonic networks.
    # Two configs: each compiles the fold's bitonic networks. BLOCK_D comes from the plan (EVEN_D needs it).
    return [config(8, stages) for stages in (3, 4)]


# Not keyed on the number of queries (each search request would re-benchmark every config): the tile
# shapes it decides (BLOCK_Q, C_NORM_IN_LOOP) are already in the key.
_FILTER = Kernel(_topk_filter_kernel, _filter_configs,
                 key=["D", "K_PAD", "BUF", "BLOCK_Q", "BLOCK_N", "NORMALIZE", "C_NORM_IN_LOOP"],
                 interpret_meta={})
_MERGE = Kernel(_topk_merge_kernel, lambda: [config(8, 1)], key=["K_PAD"], interpret_meta={})
_MERGE_BLOCK_Q = 8
FEW_QUERIES = 16  # up to this many queries one tile row holds them all: one bandwidth-bound pass
_WORKSPACE_BYTES = 32 << 20  # candidate buffers + per-range lists of one launch (sets the number of ranges)
_FOLD_KEYS = 1024  # keys one fold step sorts at a time (MERGE_Q x BUF): bounds its registers for any k


def _log2(n: int) -> int:
    return n.bit_length() - 1


@dataclass(frozen=True)
class _Plan:
    """Tile shapes of one call. Few queries: one 16-row query tile streams the corpus once and computes the
    corpus norms from the tiles it loads anyway. Many queries: 64/128-row tensor-core tiles, every corpus
    tile read by q / BLOCK_Q programs, so the corpus norms are computed once beforehand instead."""

    block_q: int
    block_n: int
    block_d: int
    k_pad: int
    buf: int
    merge_q: int
    c_norm_in_loop: bool

    @staticmethod
    def choose(n_q: int, k: int, backend: dispatch.Backend) -> _Plan:
        k_pad = max(16, triton.next_power_of_2(k))
        if backend == "interpret":  # small tiles keep the interpreted bitonic networks fast
            block_q, block_n, block_d = (16 if n_q <= FEW_QUERIES else 32), 32, 32
        else:
            block_q = 16 if n_q <= FEW_QUERIES else 64 if n_q <= 64 else 128
            block_n = 128
            block_d = 128 if n_q <= FEW_QUERIES else 64  # the streaming tile: longer loads in flight
        # The buffer takes one whole tile after a fold, and is at least K_PAD wide for the bitonic top-k.
        buf = max(block_n, k_pad)
        merge_q = min(block_q, max(2, _FOLD_KEYS // buf))
        return _Plan(block_q, block_n, block_d, k_pad, buf, merge_q, c_norm_in_loop=n_q <= FEW_QUERIES)


@triton.jit
def _row_norm_kernel(x_ptr, out_ptr, n, D, stride_n, stride_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = max(||x[r]||, 1e-12), squares summed in fp32: one read of x, no fp32 copy of it."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < n
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    base = x_ptr + rows[:, None].to(tl.int64) * stride_n
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        v = tl.load(base + dd[None, :] * stride_d, mask=live[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * v, axis=1)
    tl.store(out_ptr + rows, tl.maximum(tl.sqrt(acc), 1e-12), mask=live)


_NORM = Kernel(_row_norm_kernel, lambda: [config(4, 2, BLOCK_R=16, BLOCK_D=256)], key=["D"],
               interpret_meta={"BLOCK_R": 16, "BLOCK_D": 32})


def _row_norms(x: torch.Tensor, device: torch.device, backend: dispatch.Backend) -> torch.Tensor:
    """max(||row||, 1e-12) in fp32 for every row of x (on `device`), computed once per call: the many-query
    tiles would otherwise recompute the corpus norms in every query block."""
    out = dispatch.empty((x.shape[0],), torch.float32, device)
    if x.shape[0]:
        _NORM.launch(backend, lambda meta: (triton.cdiv(x.shape[0], meta["BLOCK_R"]),),
                     x, out, x.shape[0], x.shape[1], x.stride(0), x.stride(1))
    return out


# ----------------------------------------------------------------------------------------- key codec
def encode_keys(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (score, -index): scores float32 [..., n], index int64 broadcastable."""
    # + 0.0 turns -0.0 into +0.0 (equal scores must get equal high halves; ties then go to the lower index).
    bits = (scores + 0.0).contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) | (_LOW_MASK - index)


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), _LOW_MASK - (keys & _LOW_MASK)


# ------------------------------------------------------------------------------------------ launchers
def _topk_triton(queries: torch.Tensor, corpus: torch.Tensor, k: int, normalize: bool, chunk_size: int,
                 backend: dispatch.Backend) -> tuple[torch.Tensor, torch.Tensor]:
    device = queries.device
    n_q, dim = queries.shape
    n_total = corpus.shape[0]
    plan = _Plan.choose(n_q, k, backend)
    q_blocks = triton.cdiv(n_q, plan.block_q)
    precision = dispatch.dot_precision(queries.dtype)
    # Enough corpus ranges per launch that (query blocks x ranges) covers the GPU about twice (four times for
    # the bandwidth-bound streaming tile: more loads in flight), within the workspace budget (memory stays
    # O(q * k) whatever N is).
    waves = 4 if plan.c_norm_in_loop else 2
    range_bytes = n_q * (plan.k_pad * 8 + plan.buf * 8)
    max_splits = max(1, min(triton.cdiv(waves * dispatch.num_sms(device), q_blocks), _WORKSPACE_BYTES // range_bytes))
    chunk_splits = min(max_splits, triton.cdiv(min(chunk_size, n_total), plan.block_n))
    part = dispatch.empty((n_q, chunk_splits, plan.k_pad), torch.int64, device)
    buf_s = dispatch.empty((n_q, chunk_splits, plan.buf), torch.float32, device)
    buf_i = dispatch.empty((n_q, chunk_splits, plan.buf), torch.int32, device)
    cnt = dispatch.empty((chunk_splits, n_q), torch.int32, device)
    thr = dispatch.empty((chunk_splits, n_q), torch.float32, device)
    q_norm = _row_norms(queries, device, backend) if normalize else queries  # (any tensor: unused without NORMALIZE)
    running = [dispatch.empty((n_q, plan.k_pad), torch.int64, device) for _ in range(2)]
    for i, c0 in enumerate(range(0, n_total, chunk_size)):
        chunk = corpus[c0:c0 + chunk_size].to(device, non_blocking=True)
        c_norm = _row_norms(chunk, device, backend) if normalize and not plan.c_norm_in_loop else queries
        splits = min(chunk_splits, triton.cdiv(chunk.shape[0], plan.block_n))
        _FILTER.launch(
            backend, lambda meta, s=splits: (q_blocks, s),
            queries, chunk, q_norm, c_norm, part, buf_s, buf_i, cnt, thr,
            n_q, chunk.shape[0], dim, k, c0, _MIN_KEY, splits,
            queries.stride(0), queries.stride(1), chunk.stride(0), chunk.stride(1), part.stride(0), part.stride(1),
            buf_s.stride(0), buf_s.stride(1),
            NORMALIZE=normalize, C_NORM_IN_LOOP=plan.c_norm_in_loop, K_PAD=plan.k_pad, BUF=plan.buf,
            BLOCK_Q=plan.block_q, BLOCK_N=plan.block_n, BLOCK_D=plan.block_d, MERGE_Q=plan.merge_q,
            EVEN_D=dim % plan.block_d == 0, PRECISION=precision,
            LOG_MQ=_log2(plan.merge_q), LOG_BUF=_log2(plan.buf), LOG_K=_log2(plan.k_pad),
        )
        # Ping-pong between two running lists: merging in place would merge a list with itself if the
        # launch is ever repeated (autotuning benchmarks a kernel by running it several times).
        prev, out = running[(i + 1) % 2], running[i % 2]
        _MERGE.launch(backend, lambda meta: (triton.cdiv(n_q, _MERGE_BLOCK_Q),),
                      part, prev, out, n_q, splits, _MIN_KEY, part.stride(0), part.stride(1),
                      HAS_PREV=i > 0, K_PAD=plan.k_pad, BLOCK_Q=_MERGE_BLOCK_Q, LOG_Q=_log2(_MERGE_BLOCK_Q),
                      LOG_K=_log2(plan.k_pad))
    values, indices = decode_keys(out[:, :k])
    return values, indices


def _topk_torch(queries: torch.Tensor, corpus: torch.Tensor, k: int, normalize: bool,
                chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same streamed algorithm in torch: fp32 scores of one [query block, corpus chunk] at a time,
    folded into a running top-k of int64 keys (exact, ties to the lower index).

    Normalization divides the raw dot products by both norms, in the kernel's order, rather than
    normalizing the rows first: rows with equal dot products and equal norms then tie, as they do in the
    kernel (per-element rounding of normalized rows would break such ties at random). Equal rows at
    different positions may still get dot products a last bit apart: BLAS rounds by position."""
    device = queries.device
    q = queries.float()
    q_norm = q.norm(dim=1).clamp_min(1e-12)[:, None] if normalize else None
    # Bound the score block to ~16M floats whatever the number of queries.
    q_block = max(1, min(q.shape[0], (1 << 24) // max(1, min(chunk_size, corpus.shape[0]))))
    best = torch.empty((q.shape[0], 0), dtype=torch.int64, device=device)
    for c0 in range(0, corpus.shape[0], chunk_size):
        c = corpus[c0:c0 + chunk_size].to(device=device, dtype=torch.float32)
        c_norm = c.norm(dim=1).clamp_min(1e-12)[None, :] if normalize else None
        index = torch.arange(c0, c0 + c.shape[0], device=device)
        keep = min(k, best.shape[1] + c.shape[0])
        merged = []
        for q0 in range(0, q.shape[0], q_block):
            scores = q[q0:q0 + q_block] @ c.T
            if normalize:
                scores = scores / q_norm[q0:q0 + q_block] / c_norm
            scores = scores.masked_fill(scores.isnan(), float("-inf"))  # NaN ranks last, as in the kernel
            keys = torch.cat([best[q0:q0 + q_block], encode_keys(scores, index)], dim=1)
            merged.append(torch.topk(keys, keep, dim=1, sorted=True).values)
        best = torch.cat(merged, dim=0) if merged else best[:, :keep]
    return decode_keys(best)


# ------------------------------------------------------------------------------------- public function
def similarity_topk(queries: torch.Tensor, corpus: torch.Tensor, k: int, normalize: bool = True,
                    chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k corpus rows by dot product (cosine with normalize=True) for every query, without q x N scores.

    queries [q, D] and corpus [N, D] share a float dtype (fp32/fp16/bf16); the corpus may live on another
    device than the queries (e.g. a pinned CPU tensor streamed to the GPU), it is then moved chunk by chunk.
    Returns (values float32 [q, k], indices int64 [q, k]), sorted by descending score; equal scores are
    ordered by lower corpus index (rows that are equal may still score a last bit apart: the dot products are
    rounded per position). A NaN score (a row holding NaN) counts as -inf: it ranks last and reads -inf. 1 <= k <= min(N, 1024). `chunk_size` = corpus rows per launch (default:
    the whole corpus when it sits on the queries' device, else chunks of ~1 GiB); results do not depend on it.
    normalize=True scores x / max(||x||, 1e-12) on both sides, fused into the same pass.
    """
    op = "similarity_topk"
    check_tensor(op, "queries", queries, ndim=2)
    check_tensor(op, "corpus", corpus, ndim=2)
    if corpus.dtype != queries.dtype:
        raise KernelArgumentError(op, "corpus", f"has dtype {corpus.dtype}; queries are {queries.dtype}")
    if corpus.shape[1] != queries.shape[1]:
        raise KernelArgumentError(op, "corpus", f"has D = {corpus.shape[1]}; queries have D = {queries.shape[1]}")
    n_total = corpus.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(MAX_K, n_total):
        raise KernelArgumentError(op, "k", f"= {k!r}; must be an int in [1, min(N, {MAX_K})] with N = {n_total}")
    if n_total >= _LOW_MASK:
        raise KernelArgumentError(op, "corpus", f"has {n_total} rows; at most {_LOW_MASK - 1} are supported")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise KernelArgumentError(op, "chunk_size", f"= {chunk_size!r}; must be a positive int or None")
    backend = dispatch.select_backend(queries)
    if chunk_size is None:
        if corpus.device == queries.device and backend != "torch":
            chunk_size = n_total
        else:
            chunk_size = max(1, (1 << 30) // max(1, corpus.shape[1] * corpus.element_size()))
            if backend == "torch":  # fp32 copies of the chunk and its scores on the CPU
                chunk_size = min(chunk_size, 1 << 16)
    if queries.shape[0] == 0:
        return (torch.empty((0, k), dtype=torch.float32, device=queries.device),
                torch.empty((0, k), dtype=torch.int64, device=queries.device))
    if backend == "torch":
        return _topk_torch(queries, corpus, k, normalize, chunk_size)
    return _topk_triton(queries, corpus, k, normalize, chunk_size, backend)
