"""Large-batch InfoNCE (DESIGN.md section 4.3): contrastive loss without the B x M logits matrix.

info_nce(q [B, D], d [M, D], t): s = q @ d.T, row i of d is the positive of row i of q, rows B..M-1 of d are
extra negatives for every query. q->d loss = mean_i [LSE_j s_ij / t - s_ii / t]; the symmetric loss averages
it with the d->q loss over the columns j < B (document j against every query). kernels/reference.py pins
the semantics, including the false-negative mask (margin m: negative j of query i is dropped when
s_ij > s_ii - m; in the d->q direction query i of document j is dropped when s_ij > s_jj - m).

Both directions are the same one-directional problem: rows X [R, D] scored against columns Y [N, D], row i's
positive is column i + off, loss_i = LSE over the kept columns - s_{i,i+off} / t. q->d is (X = q, Y = d);
d->q is (X = d[:B], Y = q), because s^T restricted to the first B columns is d[:B] @ q.T. The forward runs
at most three kernels, none of which writes anything of size B x M:

  1. _diag_kernel (only with a margin): s_{i,i+off} per row (an elementwise dot, fp32): the mask threshold;
  2. _row_stats_kernel (q->d): one program per block of rows walks all column tiles, each tile a tl.dot over
     D in BLOCK_D slices, masks it and folds it into a running (max, sum) per row: an online log-sum-exp;
  3. _col_stats_kernel (d->q, symmetric only): one program per block of the first B columns walks all row
     tiles of the same q @ d.T orientation and reduces along the rows. (Scoring d[:B] @ q.T instead would
     give the same numbers up to rounding, but the backward recomputes q @ d.T tiles, and statistics from
     differently rounded scores cost accuracy; see below.)

Per row (and column) it keeps, in fp32, the largest kept raw score m_i, log l_i = log sum_j exp((s_ij - m_i) / t) and the
row's loss (m_i - s_pos) / t + log l_i, with s_pos taken from the same tile values as m_i: O(B) numbers.
The running max is kept in raw-score units, not as a logit: with t = 0.02 a logit is ~50 and one fp32 ulp
of a stored log-sum-exp there (4e-6) would already be a 4e-6 relative error of every probability in the
backward; (s - m) / t is accurate where it matters (entries near the max), and the loss of a row whose
positive is its maximum is exactly log l_i.

Backward. With G'_ij = a (P_ij - [j = i+off]) + b [j < B] (Pc_ij - [i = j]), where
P_ij = exp((s_ij - m_i)/t - log l_i) and Pc the same with the column statistics, on the kept entries, and
(a, b) = (1/2, 1/2) symmetric, (1, 0) one-directional:
  dL/ds_ij = g G'_ij / (B t),  dq = g/(B t) G' @ d,  dd = g/(B t) G'^T @ q,  dL/dt = -g/(B t^2) sum G'_ij s_ij.
_grad_kernel recomputes the score tiles of a block of rows (the same tl.dot as the forward) and writes G' for
those rows into a workspace, in the input dtype; the two GEMMs then run in cuBLAS (as Liger-Kernel's fused
linear cross entropy does with its logits gradient). G' is in [-1, 1] whatever B, t and the loss scale are:
the scalar factor g/(B t) is applied in fp32 after the GEMMs, so fp16 never sees a subnormal gradient.
The rows of the workspace are chunked so that it stays about as large as q and d together: memory
O((B + M) D). The per-tile sums for the temperature come out of the same kernel, as
sum_ij [a (P_ij - [pos]) (s_ij - m_i) + b (Pc_ij - [pos]) (s_ij - m_j)], which equals sum G' s because every
row of (P - [pos]) and every column of (Pc - [pos]) sums to zero, but has no cancellation between the
positive's term and the negatives' (computed literally it loses ~20x in fp32 at t = 0.02).

The mask is a step function of s, so (as in the reference) it contributes no gradient; forward and backward
compare the recomputed fp32 tile values with the same thresholds (an entry within an ulp of its threshold
may fall on either side, as it may between fp32 and float64).

info_nce_distributed: every rank scores its own rows against the all-gathered columns (q->d) and its own
positive documents against all gathered queries (d->q), each as the one-directional problem above with
off = rank * B_r; gathers are autograd-aware (the backward sends every rank's gradient of the gathered
tensors back to their owners, summed).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import _dispatch as dispatch
from ._checks import KernelArgumentError, check_same_device, check_same_dtype, check_tensor
from ._dispatch import Kernel, config, tl, triton


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _score_tile(x_ptr, y_ptr, offs_r, mask_r, offs_n, mask_n, D,
                stride_xr, stride_xd, stride_yr, stride_yd,
                BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """s = X[offs_r] @ Y[offs_n].T as an fp32 [BLOCK_R, BLOCK_N] tile (zeros outside the masks)."""
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + offs_r[:, None].to(tl.int64) * stride_xr
    y_cols = y_ptr + offs_n[None, :].to(tl.int64) * stride_yr
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        mask_d = dd < D
        xt = tl.load(x_rows + dd[None, :] * stride_xd, mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        yt = tl.load(y_cols + dd[:, None] * stride_yd, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(xt, yt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _diag_kernel(x_ptr, y_ptr, diag_ptr, R, D, off, stride_xr, stride_xd, stride_yr, stride_yd,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """diag[i] = X[i] . Y[i + off] in fp32."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + offs_r[:, None].to(tl.int64) * stride_xr
    y_rows = y_ptr + (offs_r + off)[:, None].to(tl.int64) * stride_yr
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        mask = mask_r[:, None] & (dd < D)[None, :]
        xv = tl.load(x_rows + dd[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        yv = tl.load(y_rows + dd[None, :] * stride_yd, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(xv * yv, axis=1)
    tl.store(diag_ptr + offs_r, acc, mask=mask_r)


@triton.jit
def _logsumexp_step(m, total, s_pos, s, keep, is_pos, inv_t, AXIS: tl.constexpr):
    """One score tile into the running max m, total = sum exp((s - m) / t) over the kept entries and the
    positive's score, reduced along AXIS (1: per row of the tile, 0: per column)."""
    s_kept = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s_kept, axis=AXIS))
    total = total * tl.exp((m - m_new) * inv_t) + tl.sum(tl.exp((s_kept - tl.expand_dims(m_new, AXIS)) * inv_t),
                                                          axis=AXIS)
    return m_new, total, s_pos + tl.sum(tl.where(is_pos, s, 0.0), axis=AXIS)


@triton.jit
def _store_stats(m, total, s_pos, inv_t, offs, mask, max_ptr, logsum_ptr, loss_ptr):
    # Entries past the end have total = 0; log(1) keeps them finite (they are not stored).
    log_l = tl.log(tl.where(mask, total, 1.0))
    tl.store(max_ptr + offs, m, mask=mask)
    tl.store(logsum_ptr + offs, log_l, mask=mask)
    tl.store(loss_ptr + offs, (m - s_pos) * inv_t + log_l, mask=mask)


@triton.jit
def _row_stats_kernel(
    x_ptr, y_ptr, t_ptr, diag_ptr, max_ptr, logsum_ptr, loss_ptr,
    R, N, D, off, margin,
    stride_xr, stride_xd, stride_yr, stride_yd,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK: tl.constexpr,  # false-negative margin given: drop negatives with s > s_pos - margin
    PRECISION: tl.constexpr,
):
    """Per row i: m_i = max kept s_ij, log l_i = log sum_{j kept} exp((s_ij - m_i) / t) and the row loss
    (m_i - s_{i,i+off}) / t + log l_i, online over the column tiles."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    pos = offs_r + off
    # The temperature is read on the device: a learnable temperature never costs a host sync.
    inv_t = 1.0 / tl.load(t_ptr)
    if MASK:
        threshold = tl.load(diag_ptr + offs_r, mask=mask_r, other=0.0) - margin
    # A finite start for the running max: a tile in which all entries of a row are masked then gives
    # exp(-inf) = 0 and a finite rescale factor, never inf - inf.
    m_i = tl.full((BLOCK_R,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_pos = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        s = _score_tile(x_ptr, y_ptr, offs_r, mask_r, offs_n, mask_n, D,
                        stride_xr, stride_xd, stride_yr, stride_yd, BLOCK_R, BLOCK_N, BLOCK_D, PRECISION)
        is_pos = offs_n[None, :] == pos[:, None]
        keep = mask_n[None, :]
        if MASK:  # the positive is never dropped, whatever its score
            keep = keep & ((s <= threshold[:, None]) | is_pos)
        m_i, l_i, s_pos = _logsumexp_step(m_i, l_i, s_pos, s, keep, is_pos, inv_t, 1)
    _store_stats(m_i, l_i, s_pos, inv_t, offs_r, mask_r, max_ptr, logsum_ptr, loss_ptr)


@triton.jit
def _col_stats_kernel(
    x_ptr, y_ptr, t_ptr, diag_ptr, max_ptr, logsum_ptr, loss_ptr,
    R, n_col, D, margin,
    stride_xr, stride_xd, stride_yr, stride_yd,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK: tl.constexpr,  # drop row i from column j when s_ij > s_jj - margin
    PRECISION: tl.constexpr,
):
    """_row_stats_kernel's statistics for the columns j < n_col of s = X @ Y.T, over all R rows; column j's
    positive is row j. Tiles are scored exactly as _grad_kernel scores them (same operand order)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_col
    inv_t = 1.0 / tl.load(t_ptr)
    if MASK:
        threshold = tl.load(diag_ptr + offs_n, mask=mask_n, other=0.0) - margin
    m_j = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    l_j = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_pos = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        s = _score_tile(x_ptr, y_ptr, offs_r, mask_r, offs_n, mask_n, D,
                        stride_xr, stride_xd, stride_yr, stride_yd, BLOCK_R, BLOCK_N, BLOCK_D, PRECISION)
        is_pos = offs_r[:, None] == offs_n[None, :]
        keep = mask_r[:, None]
        if MASK:
            keep = keep & ((s <= threshold[None, :]) | is_pos)
        m_j, l_j, s_pos = _logsumexp_step(m_j, l_j, s_pos, s, keep, is_pos, inv_t, 0)
    _store_stats(m_j, l_j, s_pos, inv_t, offs_n, mask_n, max_ptr, logsum_ptr, loss_ptr)


@triton.jit
def _grad_kernel(
    x_ptr, y_ptr, t_ptr, diag_ptr, row_max_ptr, row_logsum_ptr, col_max_ptr, col_logsum_ptr, g_ptr, dt_ptr,
    R, N, D, off, r0, margin, w_row, w_col, n_col,
    stride_xr, stride_xd, stride_yr, stride_yd, stride_gr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK: tl.constexpr,
    # HAS_COL: the d->q direction is folded into the same G' (single-process symmetric loss, off == 0):
    # columns j < n_col also carry w_col * (Pc_ij - [i == j]) with Pc from the column statistics.
    HAS_COL: tl.constexpr,
    NEED_DT: tl.constexpr,  # temperature is learnable: write this tile's share of sum G' * s
    PRECISION: tl.constexpr,
):
    """G'[i - r0, j] for rows i in [r0, R) and all columns, recomputing s tile by tile."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = r0 + pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < R
    mask_n = offs_n < N
    valid = mask_r[:, None] & mask_n[None, :]
    s = _score_tile(x_ptr, y_ptr, offs_r, mask_r, offs_n, mask_n, D,
                    stride_xr, stride_xd, stride_yr, stride_yd, BLOCK_R, BLOCK_N, BLOCK_D, PRECISION)
    inv_t = 1.0 / tl.load(t_ptr)
    is_pos = valid & (offs_n[None, :] == (offs_r + off)[:, None])

    keep = valid
    if MASK:
        threshold = tl.load(diag_ptr + offs_r, mask=mask_r, other=0.0) - margin
        keep = keep & ((s <= threshold[:, None]) | is_pos)
    row_max = tl.load(row_max_ptr + offs_r, mask=mask_r, other=0.0)
    row_logsum = tl.load(row_logsum_ptr + offs_r, mask=mask_r, other=0.0)
    # where() after exp: a dropped entry may overflow exp, but is never selected.
    p = tl.where(keep, tl.exp((s - row_max[:, None]) * inv_t - row_logsum[:, None]), 0.0)
    g_row = p - is_pos.to(tl.float32)
    g = w_row * g_row
    if NEED_DT:
        # sum_j (P_ij - [pos]) = 0 for every row, so anchoring s at the row max changes nothing exactly but
        # removes the cancellation between the positive's term and the negatives' terms
        dt_terms = w_row * g_row * (s - row_max[:, None])
    if HAS_COL:
        is_col = offs_n < n_col
        keep_c = valid & is_col[None, :]
        if MASK:
            threshold_c = tl.load(diag_ptr + offs_n, mask=is_col, other=0.0) - margin
            keep_c = keep_c & ((s <= threshold_c[None, :]) | is_pos)
        col_max = tl.load(col_max_ptr + offs_n, mask=is_col, other=0.0)
        col_logsum = tl.load(col_logsum_ptr + offs_n, mask=is_col, other=0.0)
        pc = tl.where(keep_c, tl.exp((s - col_max[None, :]) * inv_t - col_logsum[None, :]), 0.0)
        g_col = pc - (is_pos & is_col[None, :]).to(tl.float32)
        g += w_col * g_col
        if NEED_DT:  # the column sums of (Pc - [pos]) vanish: anchor at the column max
            dt_terms += w_col * g_col * (s - col_max[None, :])
    g = tl.where(valid, g, 0.0)
    out = g_ptr + (offs_r - r0)[:, None].to(tl.int64) * stride_gr + offs_n[None, :]
    tl.store(out, g.to(g_ptr.dtype.element_ty), mask=valid)
    if NEED_DT:
        dt_terms = tl.where(valid, dt_terms, 0.0)
        tl.store(dt_ptr + pid_r * tl.num_programs(1) + pid_n, tl.sum(tl.sum(dt_terms, axis=1), axis=0))


# ------------------------------------------------------------------------------------- launch configs
def _stats_configs() -> list:
    """Tiles for H100/H200-class GPUs; 128 x 128 x 64 fp32 tiles with 3 stages still fit shared memory."""
    return [config(warps, stages, BLOCK_R=br, BLOCK_N=bn, BLOCK_D=bd) for br, bn, bd, warps, stages in
            [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3),
             (64, 128, 64, 4, 4), (128, 64, 32, 4, 4)]]


def _grad_configs() -> list:
    # BLOCK_R / BLOCK_N come from the launcher: they size the per-tile temperature partial sums.
    return [config(warps, stages, BLOCK_D=bd) for bd, warps, stages in
            [(32, 4, 3), (64, 4, 3), (64, 8, 3), (32, 8, 4), (64, 8, 4)]]


_DIAG = Kernel(_diag_kernel, lambda: [config(4, 2, BLOCK_R=32, BLOCK_D=128), config(4, 2, BLOCK_R=16, BLOCK_D=256)],
               key=["R", "D"], interpret_meta={"BLOCK_R": 16, "BLOCK_D": 32})
_ROW_STATS = Kernel(_row_stats_kernel, _stats_configs, key=["R", "N", "D", "MASK"],
                    interpret_meta={"BLOCK_R": 16, "BLOCK_N": 16, "BLOCK_D": 32})
_COL_STATS = Kernel(_col_stats_kernel, _stats_configs, key=["R", "n_col", "D", "MASK"],
                    interpret_meta={"BLOCK_R": 16, "BLOCK_N": 16, "BLOCK_D": 32})
# No "R" in the key: the backward launches once per row chunk with R = the chunk's end row, and keying on it
# re-autotuned every chunk (H200, B = 64k: 9 autotunings, 8 of the first call's 21 s).
_GRAD = Kernel(_grad_kernel, _grad_configs, key=["N", "D", "MASK", "HAS_COL", "NEED_DT"],
               interpret_meta={"BLOCK_D": 32})


def _grad_tiles(dtype: torch.dtype, backend: dispatch.Backend) -> tuple[int, int]:
    if backend == "interpret":
        return 16, 16  # several row and column tiles even at test sizes
    return (64, 64) if dtype == torch.float32 else (128, 128)


def _chunk_rows(rows: int, cols: int, dim: int, backend: dispatch.Backend) -> int:
    """Rows of G' per backward step: the workspace (chunk x cols) stays about as large as X and Y together,
    i.e. O((B + M) D), and is never smaller than a few MiB so that the GEMMs keep a useful size."""
    if backend == "interpret":
        return 32  # two row blocks per chunk and several chunks at test sizes: every accumulation path runs
    budget = max((rows + cols) * dim, 1 << 22)
    chunk = max(1, budget // max(cols, 1))
    if backend == "triton":
        chunk = max(128, chunk // 128 * 128)
    return min(rows, chunk)


# ------------------------------------------------------------------------------------------ launchers
def _diag(x: torch.Tensor, y: torch.Tensor, off: int, backend: dispatch.Backend) -> torch.Tensor:
    rows, dim = x.shape
    if backend == "torch":
        return torch.einsum("rd,rd->r", x.float(), y[off:off + rows].float())
    diag = dispatch.empty((rows,), torch.float32, x.device)
    _DIAG.launch(backend, lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),),
                 x, y, diag, rows, dim, off, x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    return diag


def _positive_mask(first_pos: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """[rows, cols] bool: column first_pos + i of row i (the positive)."""
    pos = torch.arange(first_pos, first_pos + rows, device=device)
    return torch.arange(cols, device=device)[None, :] == pos[:, None]


def _keep_torch(s: torch.Tensor, threshold: torch.Tensor, is_pos: torch.Tensor) -> torch.Tensor:
    return (s <= threshold) | is_pos


def _stats_torch(x: torch.Tensor, y: torch.Tensor, off: int, diag: torch.Tensor | None, t: torch.Tensor,
                 margin: float | None, chunk: int, n_col: int) -> tuple[torch.Tensor, ...]:
    """The torch fallback of both statistics kernels, one block of rows at a time (never more than
    chunk x N scores): row statistics, and for n_col > 0 (off == 0) the column statistics of the first
    n_col columns, merged online across the row blocks. The blocks are the ones the backward recomputes."""
    rows = x.shape[0]
    cols = y.shape[0]
    yf = y.float()
    row_out = []
    col_max = torch.full((n_col,), -1.0e30, dtype=torch.float32, device=x.device)
    col_sum = torch.zeros(n_col, dtype=torch.float32, device=x.device)
    col_pos = torch.zeros(n_col, dtype=torch.float32, device=x.device)
    for r0 in range(0, rows, chunk):
        s = x[r0:r0 + chunk].float() @ yf.T
        is_pos = _positive_mask(r0 + off, s.shape[0], cols, s.device)
        s_kept = s
        if margin is not None:
            s_kept = s.masked_fill(~_keep_torch(s, diag[r0:r0 + chunk, None] - margin, is_pos), float("-inf"))
        m = s_kept.amax(dim=1)
        log_l = torch.exp((s_kept - m[:, None]) / t).sum(dim=1).log()
        s_pos = s[is_pos]  # one positive per row, in row order
        row_out.append(torch.stack([m, log_l, (m - s_pos) / t + log_l]))
        if n_col:
            sc, pc = s[:, :n_col], is_pos[:, :n_col]
            sc_kept = sc
            if margin is not None:
                sc_kept = sc.masked_fill(~_keep_torch(sc, diag[None, :n_col] - margin, pc), float("-inf"))
            new_max = torch.maximum(col_max, sc_kept.amax(dim=0))
            col_sum = (col_sum * torch.exp((col_max - new_max) / t)
                       + torch.exp((sc_kept - new_max[None, :]) / t).sum(dim=0))
            col_max = new_max
            col_pos += torch.where(pc, sc, 0.0).sum(dim=0)
    row_max, row_logsum, row_loss = torch.cat(row_out, dim=1).unbind(0)
    if not n_col:
        return row_max, row_logsum, row_loss
    col_logsum = col_sum.log()
    return row_max, row_logsum, row_loss, col_max, col_logsum, (col_max - col_pos) / t + col_logsum


def _row_stats(x: torch.Tensor, y: torch.Tensor, off: int, diag: torch.Tensor | None, t: torch.Tensor,
               margin: float | None, backend: dispatch.Backend,
               chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max kept raw score, log-sum of exp((s - max) / t), row loss) per row of X, each fp32 [R]."""
    rows, dim = x.shape
    cols = y.shape[0]
    if backend == "torch":
        return _stats_torch(x, y, off, diag, t, margin, chunk, 0)
    stats = dispatch.empty((3, rows), torch.float32, x.device)
    _ROW_STATS.launch(
        backend, lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),),
        x, y, t, stats if diag is None else diag, stats[0], stats[1], stats[2],
        rows, cols, dim, off, 0.0 if margin is None else float(margin),
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        MASK=margin is not None, PRECISION=dispatch.dot_precision(x.dtype),
    )
    return stats[0], stats[1], stats[2]


def _col_stats(x: torch.Tensor, y: torch.Tensor, diag: torch.Tensor | None, t: torch.Tensor,
               margin: float | None, backend: dispatch.Backend) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same statistics for the columns j < R of s = X @ Y.T (column j's positive is row j)."""
    rows, dim = x.shape
    stats = dispatch.empty((3, rows), torch.float32, x.device)
    _COL_STATS.launch(
        backend, lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]),),
        x, y, t, stats if diag is None else diag, stats[0], stats[1], stats[2],
        rows, rows, dim, 0.0 if margin is None else float(margin),
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        MASK=margin is not None, PRECISION=dispatch.dot_precision(x.dtype),
    )
    return stats[0], stats[1], stats[2]


def _grad_rows(x: torch.Tensor, y: torch.Tensor, off: int, diag: torch.Tensor | None,
               row_stats: tuple[torch.Tensor, torch.Tensor], col_stats: tuple[torch.Tensor, torch.Tensor] | None,
               t: torch.Tensor, margin: float | None, w_row: float, w_col: float, r0: int, r1: int,
               need_dt: bool, backend: dispatch.Backend) -> tuple[torch.Tensor, torch.Tensor]:
    """G' for rows [r0, r1) of X against all columns, and the partial sums of G' * s (for dL/dt)."""
    rows, dim = x.shape
    cols = y.shape[0]
    row_max, row_logsum = row_stats
    if backend == "torch":
        s = x[r0:r1].float() @ y.float().T
        is_pos = _positive_mask(r0 + off, r1 - r0, cols, s.device)
        p = torch.exp((s - row_max[r0:r1, None]) / t - row_logsum[r0:r1, None])
        if margin is not None:
            p = p.masked_fill(~_keep_torch(s, diag[r0:r1, None] - margin, is_pos), 0.0)
        g_row = p - is_pos.float()
        g = w_row * g_row
        dt_part = s.new_zeros(1)
        if need_dt:  # anchored as in _grad_kernel
            dt_part += w_row * (g_row * (s - row_max[r0:r1, None])).sum()
        if col_stats is not None:
            col_max, col_logsum = col_stats
            n_col = col_max.shape[0]
            sc = s[:, :n_col]
            pc = torch.exp((sc - col_max[None, :]) / t - col_logsum[None, :])
            if margin is not None:
                pc = pc.masked_fill(~_keep_torch(sc, diag[None, :n_col] - margin, is_pos[:, :n_col]), 0.0)
            g_col = pc - is_pos[:, :n_col].float()
            g[:, :n_col] += w_col * g_col
            if need_dt:
                dt_part += w_col * (g_col * (sc - col_max[None, :])).sum()
        return g, dt_part

    block_r, block_n = _grad_tiles(x.dtype, backend)
    grid = (triton.cdiv(r1 - r0, block_r), triton.cdiv(cols, block_n))
    g = dispatch.empty((r1 - r0, cols), x.dtype, x.device)
    dt_part = dispatch.empty((grid[0] * grid[1],), torch.float32, x.device) if need_dt else g
    col_max, col_logsum = row_stats if col_stats is None else col_stats
    _GRAD.launch(
        backend, lambda meta: grid,
        x, y, t, row_max if diag is None else diag, row_max, row_logsum, col_max, col_logsum, g, dt_part,
        r1, cols, dim, off, r0, 0.0 if margin is None else float(margin), float(w_row), float(w_col),
        0 if col_stats is None else col_max.shape[0],
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), g.stride(0),
        BLOCK_R=block_r, BLOCK_N=block_n, MASK=margin is not None, HAS_COL=col_stats is not None,
        NEED_DT=need_dt, PRECISION=dispatch.dot_precision(x.dtype),
    )
    return g, dt_part


class InfoNCEFunction(torch.autograd.Function):
    """One InfoNCE term: (1 / n_norm) * [w_row sum_i rowloss_i + w_col sum_{j<R} colloss_j].

    x [R, D] are the rows, y [N, D] the columns, row i's positive is column i + off. w_col > 0 (the
    single-process symmetric loss) needs off == 0 and folds the d->q direction (columns j < R against all
    rows) into the same backward pass. Returns a 0-dim fp32 tensor."""

    @staticmethod
    def forward(ctx, x, y, temperature, t, off, n_norm, w_row, w_col, margin, backend, chunk):
        rows, dim = x.shape
        cols = y.shape[0]
        if chunk is None:
            chunk = _chunk_rows(rows, cols, dim, backend)
        if backend != "torch":
            # Chunks start on a row-tile boundary of the gradient kernel: its tiles then group rows as the
            # forward's do, so the interpreter recomputes bit-identical scores (the fp32 tl.dot on GPUs is
            # per-element sequential over D anyway). Recomputed scores that differ from the forward's by an
            # ulp cost a relative error ulp(s) / t in P_ii, i.e. about ulp(s) / t in G'_ii = P_ii - 1
            # itself, where the plain PyTorch path errs by only (1 - P_ii) times that.
            block_r = _grad_tiles(x.dtype, backend)[0]
            chunk = triton.cdiv(chunk, block_r) * block_r
        diag = None if margin is None else _diag(x, y, off, backend)
        col_max = col_logsum = None
        if w_col and backend == "torch":
            row_max, row_logsum, row_loss, col_max, col_logsum, col_loss = _stats_torch(
                x, y, off, diag, t, margin, chunk, rows)
        else:
            row_max, row_logsum, row_loss = _row_stats(x, y, off, diag, t, margin, backend, chunk)
            if w_col:
                # d->q over the columns j < R: document j's positive is query j, its threshold diag[j]
                col_max, col_logsum, col_loss = _col_stats(x, y, diag, t, margin, backend)
        loss = w_row * row_loss.sum()
        if w_col:
            loss = loss + w_col * col_loss.sum()
        ctx.save_for_backward(x, y, t, diag, row_max, row_logsum, col_max, col_logsum)
        ctx.args = (off, n_norm, w_row, w_col, margin, backend, chunk)
        ctx.t_meta = None if temperature is None else (temperature.shape, temperature.dtype)
        return loss / n_norm

    @staticmethod
    def backward(ctx, grad):
        x, y, t, diag, row_max, row_logsum, col_max, col_logsum = ctx.saved_tensors
        off, n_norm, w_row, w_col, margin, backend, chunk = ctx.args
        need_x, need_y, need_t = ctx.needs_input_grad[:3]
        rows, dim = x.shape
        col_stats = None if col_max is None else (col_max, col_logsum)
        # The torch fallback keeps G' and its GEMMs in fp32 (CPU GEMMs in fp16/bf16 are no faster); the
        # Triton paths feed cuBLAS G' in the input dtype, as the plain PyTorch path would.
        xw, yw = (x.float(), y.float()) if backend == "torch" else (x, y)
        scale = grad.float() / (t * n_norm)  # [1], stays on the device
        dx = torch.empty_like(x) if need_x else None
        dy_acc = None
        dt_sum = torch.zeros(1, dtype=torch.float32, device=x.device)
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            g, dt_part = _grad_rows(x, y, off, diag, (row_max, row_logsum), col_stats, t, margin, w_row, w_col,
                                    r0, r1, need_t, backend)
            if need_x:
                dx[r0:r1] = ((g @ yw).float() * scale).to(x.dtype)
            if need_y:
                part = (g.T @ xw[r0:r1]).float()
                dy_acc = part if dy_acc is None else dy_acc.add_(part)
            if need_t:
                dt_sum += dt_part.sum()
        dy = (dy_acc * scale).to(y.dtype) if need_y else None
        dt = None
        if need_t:
            shape, dtype = ctx.t_meta
            dt = (-grad.float() * dt_sum / (t * t * n_norm)).reshape(shape).to(dtype)
        return dx, dy, dt, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------- public functions
def _check_temperature(op: str, temperature: object, ref: torch.Tensor) -> None:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or temperature.dim() > 1:
            raise KernelArgumentError(op, "temperature", f"must be a 0-dim (or 1-element) tensor, got shape "
                                                         f"{tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise KernelArgumentError(op, "temperature", f"must be a floating tensor, got {temperature.dtype}")
        if temperature.device != ref.device:
            raise KernelArgumentError(op, "temperature", f"is on {temperature.device}; q is on {ref.device}")
        # Its value is checked where reading it is free (a CPU tensor); on a GPU that read would stall the step
        # on a host sync, so there a temperature <= 0 gives a NaN loss instead of this error.
        if temperature.device.type == "cpu":
            value = float(temperature.detach().reshape(()))
            if not (math.isfinite(value) and value > 0):
                raise KernelArgumentError(op, "temperature", f"= {value!r}; must be finite and > 0")
        return
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise KernelArgumentError(op, "temperature", f"must be a positive float or a 0-dim tensor, "
                                                     f"got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise KernelArgumentError(op, "temperature", f"= {temperature!r}; must be finite and > 0")


def _check_common(op: str, q: torch.Tensor, d: torch.Tensor, temperature: object, symmetric: object,
                  false_negative_margin: object) -> None:
    check_tensor(op, "q", q, ndim=2)
    check_tensor(op, "d", d, ndim=2)
    check_same_device(op, q=q, d=d)
    check_same_dtype(op, q=q, d=d)
    if d.shape[1] != q.shape[1]:
        raise KernelArgumentError(op, "d", f"has D = {d.shape[1]}; q has D = {q.shape[1]}")
    if q.shape[0] < 1:
        raise KernelArgumentError(op, "q", "has no rows; the loss is a mean over at least one query")
    if d.shape[0] < q.shape[0]:
        raise KernelArgumentError(op, "d", f"has M = {d.shape[0]} rows; needs M >= B = {q.shape[0]} "
                                           "(row i of d is the positive of row i of q)")
    _check_temperature(op, temperature, q)
    if not isinstance(symmetric, bool):
        raise KernelArgumentError(op, "symmetric", f"must be a bool, got {type(symmetric).__name__}")
    if false_negative_margin is not None and (isinstance(false_negative_margin, bool)
                                              or not isinstance(false_negative_margin, (int, float))
                                              or not math.isfinite(false_negative_margin)):
        raise KernelArgumentError(op, "false_negative_margin", f"= {false_negative_margin!r}; must be a finite "
                                                               "float or None")


def _temperature_args(temperature: float | torch.Tensor,
                      device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(the autograd input or None, the fp32 [1] value the kernels read on the device)."""
    if isinstance(temperature, torch.Tensor):
        return temperature, temperature.detach().to(torch.float32).reshape(1)
    return None, torch.full((1,), float(temperature), dtype=torch.float32, device=device)


def _info_nce(q: torch.Tensor, d: torch.Tensor, temperature: float | torch.Tensor, symmetric: bool = True,
              false_negative_margin: float | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    _check_common("info_nce", q, d, temperature, symmetric, false_negative_margin)
    tensors = (q, d) + ((temperature,) if isinstance(temperature, torch.Tensor) else ())
    backend = dispatch.select_backend(*tensors)
    t_input, t = _temperature_args(temperature, q.device)
    w_row, w_col = (0.5, 0.5) if symmetric else (1.0, 0.0)
    margin = None if false_negative_margin is None else float(false_negative_margin)
    return InfoNCEFunction.apply(q, d, t_input, t, 0, q.shape[0], w_row, w_col, margin, backend, chunk_rows)


def info_nce(q: torch.Tensor, d: torch.Tensor, temperature: float | torch.Tensor, symmetric: bool = True,
             false_negative_margin: float | None = None) -> torch.Tensor:
    """InfoNCE of queries q [B, D] against documents d [M, D] (M >= B) without the B x M logits.

    Row i of d is the positive of row i of q; rows B..M-1 of d are extra (hard) negatives for every query.
    Loss = mean_i CE(q_i . d^T / t, target i); with symmetric=True it is averaged with the d->q loss over
    the first B rows of d against all of q. `temperature` is a positive float or a 0-dim tensor (it then
    receives a gradient; parametrise it as exp(log_t) to learn log-temperature). With
    false_negative_margin=m, a negative j of query i is dropped when s_ij > s_ii - m (raw dot products;
    in the d->q direction the document's own positive score s_jj sets the threshold); positives are never
    dropped. Inputs are used as given: normalise them first for cosine similarity.

    q and d share one float dtype (fp32/fp16/bf16) and device. Returns a 0-dim float32 tensor (log-sum-exps
    are accumulated in fp32; rounding the loss to 16 bits would discard that), differentiable in q, d and
    a tensor temperature. Memory O((B + M) D). CUDA -> Triton; CPU -> the Triton interpreter when
    TRITON_INTERPRET=1, else a chunked torch path with the same algorithm. Semantics:
    kernels.reference.info_nce_reference."""
    return _info_nce(q, d, temperature, symmetric, false_negative_margin)


def _all_gather_rows(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup) -> None:
    """out [W * n, ...] = concatenation of every rank's x [n, ...]; all_gather_single replaces the
    deprecated all_gather_into_tensor in recent torch releases (older ones only have the latter)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous(), group=group)


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns to each rank the sum over ranks of the gradient of its
    own slice (a reduce-scatter), so that every rank's rows get the gradient of every rank's loss term."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather_rows(out, x, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == "nccl":
            out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        # gloo has no reduce-scatter: reduce everything and keep this rank's slice
        total = grad.clone()
        dist.all_reduce(total, group=group)
        return total.chunk(world)[rank].clone(), None


def _info_nce_distributed(q: torch.Tensor, d: torch.Tensor, temperature: float | torch.Tensor,
                          group: dist.ProcessGroup | None = None, symmetric: bool = True,
                          false_negative_margin: float | None = None,
                          chunk_rows: int | None = None) -> torch.Tensor:
    op = "info_nce_distributed"
    _check_common(op, q, d, temperature, symmetric, false_negative_margin)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialized (call init_process_group first)")
    group = dist.group.WORLD if group is None else group
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    n_rows, n_docs = q.shape[0], d.shape[0]
    # Every rank learns every rank's sizes, so a mismatch raises on all ranks alike (no rank left waiting
    # in a collective that the others never enter).
    sizes = torch.tensor([n_rows, n_docs, q.shape[1]], dtype=torch.int64, device=q.device)
    all_sizes = sizes.new_empty((world * 3,))
    _all_gather_rows(all_sizes, sizes, group)
    all_sizes = all_sizes.view(world, 3)
    if not bool((all_sizes == sizes).all()):
        raise KernelArgumentError(op, "q/d", f"must have the same shapes on every rank; (B, M, D) per rank: "
                                             f"{all_sizes.tolist()}")

    tensors = (q, d) + ((temperature,) if isinstance(temperature, torch.Tensor) else ())
    backend = dispatch.select_backend(*tensors)
    t_input, t = _temperature_args(temperature, q.device)
    margin = None if false_negative_margin is None else float(false_negative_margin)
    w_row = 0.5 if symmetric else 1.0
    n_global = world * n_rows
    off = rank * n_rows

    gathered = _GatherRows.apply(d, group).view(world, n_docs, -1)
    d_all = torch.cat([gathered[:, :n_rows].reshape(n_global, -1), gathered[:, n_rows:].reshape(-1, q.shape[1])])
    local = InfoNCEFunction.apply(q, d_all, t_input, t, off, n_global, w_row, 0.0, margin, backend, chunk_rows)
    if symmetric:
        q_all = _GatherRows.apply(q, group)
        local = local + InfoNCEFunction.apply(d[:n_rows], q_all, t_input, t, off, n_global, 0.5, 0.0, margin,
                                              backend, chunk_rows)
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    # Value: the global loss on every rank; gradient: through this rank's own terms only.
    return local + (total - local.detach())


def info_nce_distributed(q: torch.Tensor, d: torch.Tensor, temperature: float | torch.Tensor,
                         group: dist.ProcessGroup | None = None, symmetric: bool = True,
                         false_negative_margin: float | None = None) -> torch.Tensor:
    """info_nce over the union of all ranks' batches: local rows scored against all-gathered columns.

    Rank r holds q_r [B_r, D] and d_r [M_r, D] (its first B_r rows are the positives of q_r); every rank
    must hold the same B_r, M_r and D. The loss equals the single-process
    info_nce(q_all, d_all, temperature, symmetric, false_negative_margin) with
        q_all = cat(q_0, ..., q_{W-1}),
        d_all = cat(d_0[:B_r], ..., d_{W-1}[:B_r], d_0[B_r:], ..., d_{W-1}[B_r:])
    (all positives in rank order, then all extra negatives in rank order), W = group size, ranks numbered
    within `group` (default: the world). Every rank returns that same value (0-dim fp32).

    Gradients are those of that global loss: after backward on every rank, q_r.grad and d_r.grad equal the
    global gradient's slices for rank r's rows. A temperature tensor (replicated, one per rank) receives on
    each rank the part of dL/dt that comes from that rank's rows, so that the sum over ranks is dL/dt.
    DDP and FSDP *average* parameter gradients over ranks, so behind them every parameter (the temperature
    included) receives dL/dtheta / W; multiply the loss by W for the exact global gradient.

    Communication per call: one all-gather of d (and of q when symmetric) plus a few scalars; the backward
    reduce-scatters the gradients of the gathered tensors back to their ranks."""
    return _info_nce_distributed(q, d, temperature, group, symmetric, false_negative_margin)
