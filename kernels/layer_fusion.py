"""Fused layer aggregation (DESIGN.md section 4.1): the first half of WAVE's fusion head, and scalar mix.

layer_fusion_mlp(hidden [B, L, D], w1 [H, L*D], b1 [H]) = GELU(concat_l(hidden[:, l]) @ w1.T + b1).
The kernel is a GEMM whose K dimension walks the L layer slices of `hidden` through its own strides, so
no [B, L*D] concatenation is ever built (hidden may be any strided view, e.g. rows gathered from a
[L, B, D] capture buffer). For small B the grid is split over layers ("split-K") so that enough programs
stream the 100,352 x 3584 weight; partial sums then go to an fp32 workspace that a second kernel reduces
with the bias + GELU epilogue. The pre-activation z is kept (fp32, B x H) for the backward.

Backward: dz = dy * GELU'(z) (and db1 = sum_b dz) in one pass over [B, H]; then two GEMMs that again read
`hidden` and write `d hidden` layer slice by layer slice: dW1 = dz^T @ concat(hidden), d hidden = dz @ W1.

scalar_mix(hidden [B, L, D], weights [L]) = sum_l softmax(weights)_l hidden[:, l] -> [B, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dispatch as dispatch
from ._checks import KernelArgumentError, check_same_device, check_same_dtype, check_tensor
from ._dispatch import Kernel, config, tl, triton

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _fusion_fwd_kernel(
    h_ptr, w_ptr, b_ptr, out_ptr, z_ptr, part_ptr,
    B, H, L, D,
    stride_hb, stride_hl, stride_hd,
    stride_wh, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    # SPLIT_K == 1: this program owns all layers and applies bias + GELU itself. SPLIT_K > 1: programs
    # along axis 2 own disjoint layer ranges and write fp32 partial sums for _fusion_epilogue_kernel.
    SPLIT_K: tl.constexpr,
    STORE_Z: tl.constexpr,  # the pre-activation is only needed when a backward will run
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < B
    mask_n = offs_n < H
    layers_per_split = tl.cdiv(L, SPLIT_K)
    l_start = pid_k * layers_per_split
    l_end = tl.minimum(l_start + layers_per_split, L)

    h_rows = h_ptr + offs_m[:, None].to(tl.int64) * stride_hb
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wh
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (layer, d-block) pairs rather than two nested loops: the compiler pipelines
    # only the innermost loop, and this way the loads of the next layer overlap the current one.
    n_dblocks = tl.cdiv(D, BLOCK_K)
    for kk in range(l_start * n_dblocks, l_end * n_dblocks):
        layer = kk // n_dblocks
        dk = (kk - layer * n_dblocks) * BLOCK_K + offs_k
        mask_k = dk < D
        a = tl.load(h_rows + layer * stride_hl + dk[None, :] * stride_hd,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_cols + (layer * D + dk[:, None]).to(tl.int64) * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    out_offs = offs_m[:, None] * H + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        z = acc + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
        if STORE_Z:
            tl.store(z_ptr + out_offs, z, mask=out_mask)
    else:
        tl.store(part_ptr + pid_k * B * H + out_offs, acc, mask=out_mask)


@triton.jit
def _fusion_epilogue_kernel(part_ptr, b_ptr, out_ptr, z_ptr, B, H, n_splits,
                            BLOCK: tl.constexpr, STORE_Z: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B * H
    z = tl.load(b_ptr + offs % H, mask=mask, other=0.0).to(tl.float32)
    for s in range(0, n_splits):
        z += tl.load(part_ptr + s * B * H + offs, mask=mask, other=0.0)
    y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_Z:
        tl.store(z_ptr + offs, z, mask=mask)


@triton.jit
def _gelu_grad_kernel(dy_ptr, z_ptr, dz_ptr, db_ptr, B, H, stride_dyb, stride_dyh,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """dz = dy * GELU'(z) for a column block of [B, H], and db1 = sum_b dz for those columns."""
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    db = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask = (offs_b < B)[:, None] & mask_h[None, :]
        dy = tl.load(dy_ptr + offs_b[:, None] * stride_dyb + offs_h[None, :] * stride_dyh, mask=mask, other=0.0)
        z = tl.load(z_ptr + offs_b[:, None] * H + offs_h[None, :], mask=mask, other=0.0)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        dz = dy.to(tl.float32) * (cdf + z * pdf)
        tl.store(dz_ptr + offs_b[:, None] * H + offs_h[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        db += tl.sum(dz, axis=0)
    tl.store(db_ptr + offs_h, db.to(db_ptr.dtype.element_ty), mask=mask_h)


@triton.jit
def _layer_tile(M, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The backward kernels' tile: grid axis 0 enumerates blocks of M rows, axis 1 (layer, d-block) pairs of
    the [L, D] layer slices. Returns (row offsets, row mask, layer, d offsets, d mask)."""
    n_dblocks = tl.cdiv(D, BLOCK_N)
    pid_n = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = (pid_n % n_dblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_m < M, pid_n // n_dblocks, offs_d, offs_d < D


@triton.jit
def _fusion_dhidden_kernel(
    dz_ptr, w_ptr, dh_ptr,
    B, H, D,
    stride_wh, stride_wk,
    stride_db, stride_dl, stride_dd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """d hidden[:, l, d-block] = dz @ W1[:, l*D + d-block]; axis 1 of the grid enumerates (layer, d-block)."""
    offs_m, mask_m, layer, offs_d, mask_d = _layer_tile(B, D, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_cols = w_ptr + (layer * D + offs_d[None, :]).to(tl.int64) * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        hk = k0 + offs_k
        mask_k = hk < H
        a = tl.load(dz_ptr + offs_m[:, None] * H + hk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_cols + hk[:, None].to(tl.int64) * stride_wh, mask=mask_k[:, None] & mask_d[None, :],
                    other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    dh = dh_ptr + offs_m[:, None].to(tl.int64) * stride_db + layer * stride_dl + offs_d[None, :] * stride_dd
    tl.store(dh, acc.to(dh_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _fusion_dw_kernel(
    dz_ptr, h_ptr, dw_ptr,
    B, H, D,
    stride_hb, stride_hl, stride_hd,
    stride_wh, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """dW1[h-block, l*D + d-block] = dz[:, h-block]^T @ hidden[:, l, d-block] (reduction over the batch)."""
    offs_h, mask_h, layer, offs_d, mask_d = _layer_tile(H, D, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, B, BLOCK_K):
        bk = k0 + offs_k
        mask_k = bk < B
        a = tl.load(dz_ptr + bk[None, :] * H + offs_h[:, None], mask=mask_h[:, None] & mask_k[None, :], other=0.0)
        h = tl.load(h_ptr + bk[:, None].to(tl.int64) * stride_hb + layer * stride_hl + offs_d[None, :] * stride_hd,
                    mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(a, h, acc, input_precision=PRECISION)
    dw = dw_ptr + offs_h[:, None].to(tl.int64) * stride_wh + (layer * D + offs_d[None, :]).to(tl.int64) * stride_wk
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])


@triton.jit
def _scalar_mix_fwd_kernel(h_ptr, w_ptr, out_ptr, L, D, stride_hb, stride_hl, stride_hd,
                           BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_l = offs_l < L
    mask_d = offs_d < D
    w = tl.load(w_ptr + offs_l, mask=mask_l, other=float("-inf")).to(tl.float32)
    p = tl.exp(w - tl.max(w, axis=0))
    p = p / tl.sum(p, axis=0)
    h = tl.load(h_ptr + pid_b.to(tl.int64) * stride_hb + offs_l[:, None] * stride_hl + offs_d[None, :] * stride_hd,
                mask=mask_l[:, None] & mask_d[None, :], other=0.0)
    y = tl.sum(h.to(tl.float32) * p[:, None], axis=0)
    tl.store(out_ptr + pid_b.to(tl.int64) * D + offs_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _scalar_mix_bwd_kernel(h_ptr, w_ptr, dy_ptr, dh_ptr, g_ptr, L, D,
                           stride_hb, stride_hl, stride_hd, stride_dyb, stride_dyd,
                           BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                           NEED_DH: tl.constexpr, NEED_G: tl.constexpr):
    """d hidden = p_l * dy, and per-program partial sums g_l = sum_d dy * hidden[:, l] for d weights."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_l = offs_l < L
    mask_d = offs_d < D
    mask = mask_l[:, None] & mask_d[None, :]
    dy = tl.load(dy_ptr + pid_b.to(tl.int64) * stride_dyb + offs_d * stride_dyd, mask=mask_d, other=0.0)
    dy = dy.to(tl.float32)
    if NEED_DH:
        w = tl.load(w_ptr + offs_l, mask=mask_l, other=float("-inf")).to(tl.float32)
        p = tl.exp(w - tl.max(w, axis=0))
        p = p / tl.sum(p, axis=0)
        dh = p[:, None] * dy[None, :]
        dh_offs = pid_b.to(tl.int64) * L * D + offs_l[:, None] * D + offs_d[None, :]
        tl.store(dh_ptr + dh_offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)
    if NEED_G:
        h = tl.load(h_ptr + pid_b.to(tl.int64) * stride_hb + offs_l[:, None] * stride_hl
                    + offs_d[None, :] * stride_hd, mask=mask, other=0.0)
        g = tl.sum(h.to(tl.float32) * dy[None, :], axis=1)
        row = pid_b * tl.num_programs(1) + pid_d
        tl.store(g_ptr + row * L + offs_l, g, mask=mask_l)


# ------------------------------------------------------------------------------------- launch configs
def _gemm_configs(block_m: bool = False) -> list:
    """Tile shapes for H100/H200-class GPUs; BLOCK_M comes from the launcher where the batch decides it."""
    out = []
    for bn, bk, warps, stages in [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (64, 128, 4, 3),
                                  (128, 128, 8, 3), (256, 64, 8, 3)]:
        if block_m:
            for bm in (64, 128):
                out.append(config(warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk))
        else:
            out.append(config(warps, stages, BLOCK_N=bn, BLOCK_K=bk))
    return out


# The forward is keyed on the batch bucket (BLOCK_M, SPLIT_K), not the batch size: token-budget batching
# gives many distinct B, and each new key would benchmark every config again. The backward kernels run
# at a training batch size that rarely changes.
_FWD = Kernel(_fusion_fwd_kernel, lambda: _gemm_configs(), key=["BLOCK_M", "SPLIT_K", "H", "L", "D"],
              interpret_meta={"BLOCK_N": 32, "BLOCK_K": 32})
_EPILOGUE = Kernel(_fusion_epilogue_kernel, lambda: [config(4, 1, BLOCK=1024)], key=["B", "H"],
                   interpret_meta={"BLOCK": 256})
_GELU_GRAD = Kernel(_gelu_grad_kernel, lambda: [config(4, 1, BLOCK_B=32, BLOCK_H=128)], key=["B", "H"],
                    interpret_meta={"BLOCK_B": 16, "BLOCK_H": 64})
_DHIDDEN = Kernel(_fusion_dhidden_kernel, lambda: _gemm_configs(), key=["B", "H", "D"],
                  interpret_meta={"BLOCK_N": 32, "BLOCK_K": 32})
_DW = Kernel(_fusion_dw_kernel, lambda: _gemm_configs(block_m=True), key=["B", "H", "D"],
             interpret_meta={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16})
_MIX_FWD = Kernel(_scalar_mix_fwd_kernel, lambda: [config(4, 1, BLOCK_D=256), config(8, 1, BLOCK_D=512)],
                  key=["L", "D"], interpret_meta={"BLOCK_D": 64})
_MIX_BWD = Kernel(_scalar_mix_bwd_kernel, lambda: [config(4, 1, BLOCK_D=256)], key=["L", "D"],
                  interpret_meta={"BLOCK_D": 64})


def _block_m(batch: int, backend: dispatch.Backend) -> int:
    if backend == "interpret":
        return 16
    return 16 if batch <= 16 else 32 if batch <= 32 else 64 if batch <= 64 else 128


def _split_k(batch: int, hidden: int, layers: int, block_m: int, device: torch.device,
             backend: dispatch.Backend) -> int:
    """Enough layer splits that the grid covers the GPU about twice (small batches stream W1 from
    few row tiles); never more splits than layers."""
    tiles = triton.cdiv(batch, block_m) * triton.cdiv(hidden, 128 if backend == "triton" else 32)
    want = triton.cdiv(2 * dispatch.num_sms(device), tiles)
    return max(1, min(layers, want))


# ------------------------------------------------------------------------------------------ launchers
def _fusion_forward(hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, backend: dispatch.Backend,
                    store_z: bool, split_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, layers, dim = hidden.shape
    h_out = w1.shape[0]
    block_m = _block_m(batch, backend)
    if split_k is None:
        split_k = _split_k(batch, h_out, layers, block_m, hidden.device, backend)
    out = dispatch.empty((batch, h_out), hidden.dtype, hidden.device)
    z = dispatch.empty((batch, h_out), torch.float32, hidden.device) if store_z else out
    part = dispatch.empty((split_k, batch, h_out), torch.float32, hidden.device) if split_k > 1 else out
    _FWD.launch(
        backend,
        lambda meta: (triton.cdiv(batch, block_m), triton.cdiv(h_out, meta["BLOCK_N"]), split_k),
        hidden, w1, b1, out, z, part,
        batch, h_out, layers, dim,
        hidden.stride(0), hidden.stride(1), hidden.stride(2),
        w1.stride(0), w1.stride(1),
        BLOCK_M=block_m, SPLIT_K=split_k, STORE_Z=store_z, PRECISION=dispatch.dot_precision(hidden.dtype),
    )
    if split_k > 1:
        _EPILOGUE.launch(backend, lambda meta: (triton.cdiv(batch * h_out, meta["BLOCK"]),),
                         part, b1, out, z, batch, h_out, split_k, STORE_Z=store_z)
    return out, (z if store_z else None)


def _fusion_backward(dy: torch.Tensor, z: torch.Tensor, hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                     needs: tuple[bool, bool, bool], backend: dispatch.Backend):
    batch, layers, dim = hidden.shape
    h_out = w1.shape[0]
    precision = dispatch.dot_precision(hidden.dtype)
    dz = dispatch.empty((batch, h_out), hidden.dtype, hidden.device)
    db = dispatch.empty((h_out,), b1.dtype, hidden.device)
    _GELU_GRAD.launch(backend, lambda meta: (triton.cdiv(h_out, meta["BLOCK_H"]),),
                      dy, z, dz, db, batch, h_out, dy.stride(0), dy.stride(1))
    d_hidden = d_w1 = None
    if needs[0]:
        d_hidden = dispatch.empty((batch, layers, dim), hidden.dtype, hidden.device)
        block_m = _block_m(batch, backend)
        _DHIDDEN.launch(
            backend, lambda meta: (triton.cdiv(batch, block_m), layers * triton.cdiv(dim, meta["BLOCK_N"])),
            dz, w1, d_hidden, batch, h_out, dim, w1.stride(0), w1.stride(1),
            d_hidden.stride(0), d_hidden.stride(1), d_hidden.stride(2),
            BLOCK_M=block_m, PRECISION=precision,
        )
    if needs[1]:
        d_w1 = dispatch.empty(tuple(w1.shape), w1.dtype, w1.device)
        _DW.launch(
            backend, lambda meta: (triton.cdiv(h_out, meta["BLOCK_M"]), layers * triton.cdiv(dim, meta["BLOCK_N"])),
            dz, hidden, d_w1, batch, h_out, dim,
            hidden.stride(0), hidden.stride(1), hidden.stride(2), d_w1.stride(0), d_w1.stride(1),
            PRECISION=precision,
        )
    return d_hidden, d_w1, (db if needs[2] else None)


class LayerFusionMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, w1, b1, backend, split_k):
        needs_grad = any(ctx.needs_input_grad[:3])
        out, z = _fusion_forward(hidden, w1, b1, backend, store_z=needs_grad, split_k=split_k)
        if needs_grad:
            ctx.save_for_backward(hidden, w1, b1, z)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, dy):
        hidden, w1, b1, z = ctx.saved_tensors
        grads = _fusion_backward(dy, z, hidden, w1, b1, tuple(ctx.needs_input_grad[:3]), ctx.backend)
        return (*grads, None, None)


class ScalarMixFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weights, backend):
        batch, layers, dim = hidden.shape
        out = dispatch.empty((batch, dim), hidden.dtype, hidden.device)
        block_l = triton.next_power_of_2(layers)
        _MIX_FWD.launch(backend, lambda meta: (batch, triton.cdiv(dim, meta["BLOCK_D"])),
                        hidden, weights, out, layers, dim, hidden.stride(0), hidden.stride(1), hidden.stride(2),
                        BLOCK_L=block_l)
        ctx.save_for_backward(hidden, weights)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, dy):
        hidden, weights = ctx.saved_tensors
        batch, layers, dim = hidden.shape
        need_dh, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        block_l = triton.next_power_of_2(layers)
        block_d = _MIX_BWD.interpret_meta["BLOCK_D"] if ctx.backend == "interpret" else 256
        n_dblocks = triton.cdiv(dim, block_d)
        d_hidden = dispatch.empty((batch, layers, dim), hidden.dtype, hidden.device) if need_dh else dy
        g_part = dispatch.empty((batch * n_dblocks, layers), torch.float32, hidden.device) if need_g else dy
        _MIX_BWD.launch(ctx.backend, lambda meta: (batch, n_dblocks),
                        hidden, weights, dy, d_hidden, g_part, layers, dim,
                        hidden.stride(0), hidden.stride(1), hidden.stride(2), dy.stride(0), dy.stride(1),
                        BLOCK_L=block_l, NEED_DH=need_dh, NEED_G=need_g)
        d_weights = None
        if need_g:
            p = torch.softmax(weights.float(), dim=0)
            g = g_part.sum(dim=0)
            d_weights = (p * (g - (p * g).sum())).to(weights.dtype)
        return (d_hidden if need_dh else None), d_weights, None


# ------------------------------------------------------------------------------------ torch fallbacks
def _has_flat_view(hidden: torch.Tensor) -> bool:
    """True when hidden [B, L, D] can be read as [B, L*D] without a copy (layers adjacent, unit stride)."""
    return hidden.stride(2) == 1 and hidden.stride(1) == hidden.shape[2]


def _fusion_torch(hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """Split-K over layers in plain torch: one GEMM on a free [B, L*D] view when the layout allows it,
    otherwise one GEMM per layer slice of W1 (never a concatenated copy of hidden)."""
    batch, layers, dim = hidden.shape
    if _has_flat_view(hidden):
        flat = hidden.as_strided((batch, layers * dim), (hidden.stride(0), 1))
        return F.gelu(F.linear(flat, w1, b1))
    # fp32 accumulation across the layer slices, as one GEMM (and the kernel) accumulates: L partial sums
    # rounded to fp16/bf16 one after another lose up to L roundings
    z = b1.float()
    for layer in range(layers):
        z = z + F.linear(hidden[:, layer].float(), w1[:, layer * dim:(layer + 1) * dim].float())
    return F.gelu(z).to(hidden.dtype)


def _scalar_mix_torch(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(weights.float(), dim=0).to(hidden.dtype)
    return torch.einsum("bld,l->bd", hidden, p)


# ------------------------------------------------------------------------------------- public functions
def _check_fusion(hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> None:
    op = "layer_fusion_mlp"
    check_tensor(op, "hidden", hidden, ndim=3)
    check_tensor(op, "w1", w1, ndim=2)
    check_tensor(op, "b1", b1, ndim=1)
    check_same_device(op, hidden=hidden, w1=w1, b1=b1)
    check_same_dtype(op, hidden=hidden, w1=w1, b1=b1)
    _, layers, dim = hidden.shape
    if w1.shape[1] != layers * dim:
        raise KernelArgumentError(op, "w1", f"has shape {tuple(w1.shape)}; expected [H, L*D] = [H, {layers * dim}] "
                                            f"for hidden of shape {tuple(hidden.shape)}")
    if b1.shape[0] != w1.shape[0]:
        raise KernelArgumentError(op, "b1", f"has {b1.shape[0]} entries; w1 has H = {w1.shape[0]} rows")


def _layer_fusion_mlp(hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                      split_k: int | None = None) -> torch.Tensor:
    _check_fusion(hidden, w1, b1)
    backend = dispatch.select_backend(hidden, w1, b1)
    if backend == "triton" and split_k is None and dispatch.forced_backend() is None and _has_flat_view(hidden):
        # Measured on an H100 in bf16 (bench/results/kernels_h100.json, L=28, D=H=3584): when [B, L*D] is a
        # free view of hidden, cuBLAS's single GEMM + GELU beats our split-K kernel at every benchmarked B
        # (forward 1.3x at B=1, 2.0x at B=512; forward+backward 1.0x-1.5x), so the automatic choice takes it.
        # The kernel still runs for strided hidden (torch would need one GEMM per layer) or when forced.
        backend = "torch"
    if backend == "torch" or hidden.shape[0] == 0 or w1.shape[0] == 0:  # empty grids cannot launch
        return _fusion_torch(hidden, w1, b1)
    # the kernels index b1 as a dense vector (hidden and w1 go by their strides)
    return LayerFusionMLPFunction.apply(hidden, w1, b1.contiguous(), backend, split_k)


def layer_fusion_mlp(hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """GELU(concat_l(hidden[:, l]) @ w1.T + b1) without building the concatenation.

    hidden [B, L, D] (any strides), w1 [H, L*D] (nn.Linear layout, layer-major columns), b1 [H], one float
    dtype (fp32, fp16 or bf16) -> [B, H] in that dtype. GELU is the exact erf form (nn.GELU()).
    Differentiable in hidden, w1 and b1. CUDA -> one cuBLAS GEMM on the free [B, L*D] view when hidden's
    layout allows it (measured faster than the kernel), else the Triton split-K kernel; CPU -> the Triton
    interpreter when TRITON_INTERPRET=1, else the torch split-K path."""
    return _layer_fusion_mlp(hidden, w1, b1)


def scalar_mix(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_l softmax(weights)_l * hidden[:, l]: hidden [B, L, D], weights [L] -> [B, D] in hidden's dtype.

    The softmax is taken in fp32 whatever the dtype of `weights`; differentiable in both arguments."""
    op = "scalar_mix"
    check_tensor(op, "hidden", hidden, ndim=3)
    check_tensor(op, "weights", weights, ndim=1)
    check_same_device(op, hidden=hidden, weights=weights)
    if weights.shape[0] != hidden.shape[1]:
        raise KernelArgumentError(op, "weights", f"has {weights.shape[0]} entries; hidden has L = {hidden.shape[1]}")
    if hidden.shape[1] > 1024:
        raise KernelArgumentError(op, "hidden", f"has L = {hidden.shape[1]} layers; at most 1024 are supported")
    backend = dispatch.select_backend(hidden, weights)
    if backend == "torch" or 0 in hidden.shape:  # empty grids (or an empty softmax) cannot launch
        return _scalar_mix_torch(hidden, weights)
    return ScalarMixFunction.apply(hidden, weights.contiguous(), backend)  # the kernels index weights densely
