"""layer_fusion_mlp and scalar_mix against their float64 references: values and every gradient, on the Triton
interpreter and the torch fallback (GPU: compiled Triton, marked `gpu`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from wave_rt.kernels import _dispatch as dispatch
from wave_rt.kernels import layer_fusion_mlp, scalar_mix
from wave_rt.kernels._checks import KernelArgumentError
from wave_rt.kernels.layer_fusion import _layer_fusion_mlp
from wave_rt.kernels.reference import layer_fusion_mlp_reference, scalar_mix_reference

pytestmark = pytest.mark.usefixtures("poison", "seed")

CPU_DTYPES = (torch.float32, torch.float16)


def fusion_inputs(batch: int, layers: int, dim: int, hidden: int, device: str | torch.device = "cpu",
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 inputs scaled like a trained head: pre-activations of order 1, so GELU's curved part matters."""
    h = torch.randn(batch, layers, dim, dtype=torch.float64, device=device)
    w1 = torch.randn(hidden, layers * dim, dtype=torch.float64, device=device) / (layers * dim) ** 0.5
    b1 = 0.5 * torch.randn(hidden, dtype=torch.float64, device=device)
    return h, w1, b1


def run_with_grads(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], dy: torch.Tensor,
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    # detach(), not clone(): a clone of a view that is not dense is contiguous, and the kernels would never
    # see the strides a test builds
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def check_against_reference(accuracy, fn: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor],
                            inputs64: Sequence[torch.Tensor], dtype: torch.dtype, names: Sequence[str],
                            low: Sequence[torch.Tensor] | None = None) -> None:
    """fn on `low` (default: inputs64 cast to dtype) vs the reference in float64 and in `dtype`."""
    low = [x.to(dtype) for x in inputs64] if low is None else low
    dy = torch.randn(reference(*inputs64).shape, dtype=torch.float64, device=inputs64[0].device)
    ref64, grads64 = run_with_grads(reference, inputs64, dy)
    base, grads_base = run_with_grads(reference, [x.to(dtype) for x in inputs64], dy)
    out, grads = run_with_grads(fn, low, dy)
    assert out.dtype == dtype
    accuracy("value", out, ref64, base, dtype)
    for name, g, g64, gb, x in zip(names, grads, grads64, grads_base, low):
        assert g.dtype == x.dtype, f"grad of {name} has dtype {g.dtype}, input {x.dtype}"
        accuracy(f"d {name}", g, g64, gb, dtype)


# ------------------------------------------------------------------------------------ layer_fusion_mlp
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(19, 3, 123, 45), (5, 4, 33, 17)], ids=lambda s: "B{}L{}D{}H{}".format(*s))
def test_layer_fusion_matches_float64(cpu_backend, accuracy, dtype, shape):
    inputs64 = fusion_inputs(*shape)
    with dispatch.force_backend(cpu_backend):
        check_against_reference(accuracy, layer_fusion_mlp, layer_fusion_mlp_reference, inputs64, dtype,
                                ("hidden", "w1", "b1"))


def test_layer_fusion_strided_inputs(cpu_backend, accuracy):
    """hidden as rows of a [L, B, D] capture buffer (and with a non-unit D stride), w1 as a transposed view:
    the kernels walk strides, nothing is concatenated or made contiguous."""
    batch, layers, dim, hidden = 7, 3, 61, 29
    _, w1, b1 = fusion_inputs(batch, layers, dim, hidden)
    capture = torch.randn(layers, batch, 2 * dim, dtype=torch.float64)
    views = [
        (lambda buf: buf.transpose(0, 1)[:, :, ::2], lambda w: w),  # hidden strides (2D, 2BD, 2)
        (lambda buf: buf[:, :, :dim].transpose(0, 1), lambda w: w.T.contiguous().T),  # w1 column-major
    ]
    for view_h, view_w in views:
        h64, w64 = view_h(capture), view_w(w1)
        low = [view_h(capture.float()), view_w(w1.float()), b1.float()]
        assert not low[0].is_contiguous() and low[0].stride() == h64.stride()
        assert low[1].stride() == w64.stride()
        with dispatch.force_backend(cpu_backend):
            check_against_reference(accuracy, layer_fusion_mlp, layer_fusion_mlp_reference, (h64, w64, b1),
                                    torch.float32, ("hidden", "w1", "b1"), low=low)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_layer_fusion_many_strided_layers_low_precision(cpu_backend, accuracy, dtype):
    """28 layers as rows of a [L, B, D] capture buffer, in fp16: the torch path's per-layer GEMMs must
    accumulate in fp32 like one GEMM does (28 partial sums rounded to fp16 in turn broke the 2x rule)."""
    batch, layers, dim, hidden = 8, 28, 24, 16
    for _ in range(6):  # one draw often passes by luck: the old summation failed on about one in three
        _, w1, b1 = fusion_inputs(batch, layers, dim, hidden)
        capture = torch.randn(layers, batch, dim, dtype=torch.float64)
        h64 = capture.transpose(0, 1)
        low = [capture.to(dtype).transpose(0, 1), w1.to(dtype), b1.to(dtype)]
        with dispatch.force_backend(cpu_backend):
            check_against_reference(accuracy, layer_fusion_mlp, layer_fusion_mlp_reference, (h64, w1, b1), dtype,
                                    ("hidden", "w1", "b1"), low=low)


def test_strided_bias_and_mixing_weights(cpu_backend, accuracy):
    """b1 and the scalar-mix weights as every other element of a longer vector: the kernels read them by
    their strides (they once indexed them as dense vectors, so every other bias was wrong)."""
    batch, layers, dim, hidden = 6, 3, 21, 13
    h64, w1, b1 = fusion_inputs(batch, layers, dim, hidden)
    b_long = torch.randn(2 * hidden, dtype=torch.float64)
    w_long = torch.randn(2 * layers, dtype=torch.float64)
    for dtype in CPU_DTYPES:
        low_b, low_w = b_long.to(dtype)[::2], w_long.to(dtype)[::2]
        assert low_b.stride() == (2,) and low_w.stride() == (2,)
        with dispatch.force_backend(cpu_backend):
            check_against_reference(accuracy, layer_fusion_mlp, layer_fusion_mlp_reference, (h64, w1, b_long[::2]),
                                    dtype, ("hidden", "w1", "b1"), low=[h64.to(dtype), w1.to(dtype), low_b])
            check_against_reference(accuracy, scalar_mix, scalar_mix_reference, (h64, w_long[::2]), dtype,
                                    ("hidden", "weights"), low=[h64.to(dtype), low_w])


@pytest.mark.parametrize("split_k", [1, 2, 3, 5, 7])
def test_layer_fusion_split_k(accuracy, split_k):
    """Every layer split of the interpreted kernel, from one program per tile (bias + GELU in the GEMM) to more
    splits than layers (empty splits write zero partial sums)."""
    inputs64 = fusion_inputs(11, 5, 37, 21)
    with dispatch.force_backend("interpret"):
        check_against_reference(accuracy, lambda h, w, b: _layer_fusion_mlp(h, w, b, split_k=split_k),
                                layer_fusion_mlp_reference, inputs64, torch.float32, ("hidden", "w1", "b1"))


@pytest.mark.parametrize("wanted", ["hidden", "w1", "b1", "none"])
def test_layer_fusion_partial_gradients(cpu_backend, accuracy, wanted):
    """Only the requested gradients are computed; without any, the forward stores no pre-activation."""
    inputs64 = fusion_inputs(6, 2, 23, 13)
    names = ("hidden", "w1", "b1")
    dy = torch.randn(6, 13, dtype=torch.float64)
    leaves = [x.float().requires_grad_(n == wanted) for n, x in zip(names, inputs64)]
    with dispatch.force_backend(cpu_backend):
        out = layer_fusion_mlp(*leaves)
    ref = layer_fusion_mlp_reference(*inputs64)
    accuracy("value", out.detach(), ref, layer_fusion_mlp_reference(*[x.float() for x in inputs64]), torch.float32)
    if wanted == "none":
        assert not out.requires_grad
        return
    (grad,) = torch.autograd.grad(out, [leaves[names.index(wanted)]], dy.float())
    leaves64 = [x.clone().requires_grad_(n == wanted) for n, x in zip(names, inputs64)]
    (grad64,) = torch.autograd.grad(layer_fusion_mlp_reference(*leaves64), [leaves64[names.index(wanted)]], dy)
    leaves32 = [x.float().requires_grad_(n == wanted) for n, x in zip(names, inputs64)]
    (grad32,) = torch.autograd.grad(layer_fusion_mlp_reference(*leaves32), [leaves32[names.index(wanted)]],
                                    dy.float())
    accuracy(f"d {wanted}", grad, grad64, grad32, torch.float32)


@pytest.mark.parametrize("shape", [(0, 3, 10, 7), (4, 3, 10, 0), (4, 3, 0, 7), (4, 0, 10, 7)],
                         ids=["B0", "H0", "D0", "L0"])
def test_layer_fusion_empty_dimensions(cpu_backend, shape):
    batch, layers, dim, hidden = shape
    h, w1, b1 = (x.float().requires_grad_() for x in fusion_inputs(*shape))
    with dispatch.force_backend(cpu_backend):
        out = layer_fusion_mlp(h, w1, b1)
    assert out.shape == (batch, hidden) and out.dtype == torch.float32
    # No K dimension: the output is GELU(b1) on every row.
    expected = torch.nn.functional.gelu(b1.detach()).expand(batch, hidden) if layers * dim == 0 else None
    if expected is not None:
        torch.testing.assert_close(out.detach(), expected)
    grads = torch.autograd.grad(out.sum(), (h, w1, b1), allow_unused=True)
    for g, x in zip(grads, (h, w1, b1)):
        g = torch.zeros_like(x) if g is None else g
        assert g.shape == x.shape and not torch.isnan(g).any()
    if batch == 0:
        assert not grads[2].any()


def test_layer_fusion_argument_errors():
    h, w1, b1 = (x.float() for x in fusion_inputs(2, 3, 4, 5))
    cases = [
        ((h[0], w1, b1), "hidden", "3 dimensions"),
        ((h, w1[:, :-1], b1), "w1", "L*D"),
        ((h, w1, b1[:-1]), "b1", "H = 5"),
        ((h, w1.unsqueeze(0), b1), "w1", "2 dimensions"),
        ((h.half(), w1, b1), "hidden/w1/b1", "one dtype"),
        ((h.int(), w1.int(), b1.int()), "hidden", "dtype"),
        ((h.numpy(), w1, b1), "hidden", "torch.Tensor"),
        ((h, w1.to("meta"), b1), "hidden/w1/b1", "one device"),
    ]
    for args, argument, text in cases:
        with pytest.raises(KernelArgumentError) as info:
            layer_fusion_mlp(*args)
        assert info.value.op == "layer_fusion_mlp" and info.value.argument == argument, info.value
        assert text in str(info.value)
        assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------ scalar_mix
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(19, 13, 123), (3, 1, 70)], ids=["B19L13D123", "L1"])
def test_scalar_mix_matches_float64(cpu_backend, accuracy, dtype, shape):
    batch, layers, dim = shape
    inputs64 = (torch.randn(batch, layers, dim, dtype=torch.float64), torch.randn(layers, dtype=torch.float64))
    with dispatch.force_backend(cpu_backend):
        check_against_reference(accuracy, scalar_mix, scalar_mix_reference, inputs64, dtype, ("hidden", "weights"))


def test_scalar_mix_strided_hidden_and_fp32_weights(cpu_backend, accuracy):
    """fp16 rows of a [L, B, D] buffer with fp32 mixing weights (a common training setup)."""
    batch, layers, dim = 9, 5, 77
    capture = torch.randn(layers, batch, dim, dtype=torch.float64)
    weights = torch.randn(layers, dtype=torch.float64)
    h16 = capture.half().transpose(0, 1)
    dy = torch.randn(batch, dim)
    with dispatch.force_backend(cpu_backend):
        out, (dh, dw) = run_with_grads(scalar_mix, (h16, weights.float()), dy)
    assert out.dtype == torch.float16 and dh.dtype == torch.float16 and dw.dtype == torch.float32
    ref64, (dh64, dw64) = run_with_grads(scalar_mix_reference, (capture.transpose(0, 1), weights), dy.double())
    base, (dhb, dwb) = run_with_grads(scalar_mix_reference, (h16, weights.half()), dy.half())
    accuracy("value", out, ref64, base, torch.float16)
    accuracy("d hidden", dh, dh64, dhb, torch.float16)
    accuracy("d weights", dw, dw64, dwb, torch.float16)


@pytest.mark.parametrize("shape", [(0, 4, 8), (3, 4, 0), (3, 0, 8)], ids=["B0", "D0", "L0"])
def test_scalar_mix_empty_dimensions(cpu_backend, shape):
    h = torch.randn(shape, requires_grad=True)
    w = torch.randn(shape[1], requires_grad=True)
    with dispatch.force_backend(cpu_backend):
        out = scalar_mix(h, w)
    assert out.shape == (shape[0], shape[2])
    assert not out.detach().any()  # an empty batch, empty rows, or a sum over no layers
    dh, dw = torch.autograd.grad(out.sum(), (h, w), allow_unused=True)
    for g, x in ((dh, h), (dw, w)):
        assert g is None or (g.shape == x.shape and not torch.isnan(g).any())


def test_scalar_mix_argument_errors():
    h = torch.randn(2, 3, 4)
    cases = [
        ((h, torch.randn(4)), "weights", "L = 3"),
        ((h[0], torch.randn(4)), "hidden", "3 dimensions"),
        ((h, torch.randn(3, 1)), "weights", "1 dimensions"),
        ((h.long(), torch.randn(3)), "hidden", "dtype"),
        ((torch.randn(1, 1025, 2), torch.randn(1025)), "hidden", "1024"),
        ((h, torch.randn(3, device="meta")), "hidden/weights", "one device"),
    ]
    for args, argument, text in cases:
        with pytest.raises(KernelArgumentError) as info:
            scalar_mix(*args)
        assert info.value.op == "scalar_mix" and info.value.argument == argument, info.value
        assert text in str(info.value)


# --------------------------------------------------------------------------------------------------- GPU
GPU_DTYPES = (torch.bfloat16, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "shape"), [
    *((dtype, shape) for dtype in GPU_DTYPES for shape in [(3, 28, 256, 384), (37, 5, 123, 200), (300, 4, 512, 257)]),
    (torch.float32, (37, 5, 123, 200)),  # fp32 autotuning compiles slowly: one shape
], ids=lambda p: str(p) if isinstance(p, torch.dtype) else "B{}L{}D{}H{}".format(*p))
def test_layer_fusion_gpu(cuda, accuracy, monkeypatch, dtype, shape):
    """Compiled Triton (autotuned; split-K for the small batches) against the float64 reference on the GPU;
    the spy proves the Triton kernel ran (contiguous hidden would otherwise take the cuBLAS view path)."""
    from wave_rt.kernels import layer_fusion as lf

    backends = []
    original = lf.LayerFusionMLPFunction.apply
    monkeypatch.setattr(lf.LayerFusionMLPFunction, "apply",
                        staticmethod(lambda *a: backends.append(a[3]) or original(*a)))
    inputs64 = fusion_inputs(*shape, device=cuda)
    assert dispatch.select_backend(inputs64[0]) == "triton"
    with dispatch.force_backend("triton"):
        check_against_reference(accuracy, layer_fusion_mlp, layer_fusion_mlp_reference, inputs64, dtype,
                                ("hidden", "w1", "b1"))
    assert backends and set(backends) == {"triton"}


@pytest.mark.gpu
def test_layer_fusion_gpu_automatic_choice(cuda, accuracy):
    """The automatic CUDA choice (cuBLAS view GEMM for contiguous hidden) is as accurate as PyTorch's path."""
    inputs64 = fusion_inputs(37, 5, 123, 200, device=cuda)
    check_against_reference(accuracy, layer_fusion_mlp, layer_fusion_mlp_reference, inputs64, torch.bfloat16,
                            ("hidden", "w1", "b1"))


def test_layer_fusion_automatic_choice_on_cuda(monkeypatch):
    """Where select_backend says triton (CUDA), a hidden that is a free [B, L*D] view goes to the single GEMM
    (measured faster on an H100) and a strided one to the split-K kernel; a forced backend is obeyed."""
    from wave_rt.kernels import layer_fusion as lf

    launched = []
    monkeypatch.setattr(dispatch, "select_backend", lambda *t: dispatch.forced_backend() or "triton")
    monkeypatch.setattr(lf.LayerFusionMLPFunction, "apply", staticmethod(lambda *a: launched.append(a[3]) or "kernel"))
    h, w1, b1 = (x.float() for x in fusion_inputs(4, 3, 8, 5))
    out = layer_fusion_mlp(h, w1, b1)
    assert launched == []
    torch.testing.assert_close(out, layer_fusion_mlp_reference(h, w1, b1), rtol=1e-5, atol=1e-5)
    assert layer_fusion_mlp(h.transpose(0, 1).contiguous().transpose(0, 1), w1, b1) == "kernel"
    assert layer_fusion_mlp(h[:, :, :6], w1[:, :18], b1) == "kernel"
    with dispatch.force_backend("triton"):
        assert layer_fusion_mlp(h, w1, b1) == "kernel"
    assert launched == ["triton"] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 3, 28])
def test_layer_fusion_gpu_split_k_and_strides(cuda, accuracy, split_k):
    batch, layers, dim, hidden = 9, 28, 96, 160
    _, w1, b1 = fusion_inputs(batch, layers, dim, hidden, device=cuda)
    capture = torch.randn(layers, batch, dim, dtype=torch.float64, device=cuda)
    h = capture.transpose(0, 1)
    low = [h.to(torch.bfloat16), w1.to(torch.bfloat16), b1.to(torch.bfloat16)]
    assert not low[0].is_contiguous()
    check_against_reference(accuracy, lambda a, b, c: _layer_fusion_mlp(a, b, c, split_k=split_k),
                            layer_fusion_mlp_reference, (h, w1, b1), torch.bfloat16, ("hidden", "w1", "b1"),
                            low=low)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_scalar_mix_gpu(cuda, accuracy, dtype):
    inputs64 = (torch.randn(33, 29, 1000, dtype=torch.float64, device=cuda),
                torch.randn(29, dtype=torch.float64, device=cuda))
    check_against_reference(accuracy, scalar_mix, scalar_mix_reference, inputs64, dtype, ("hidden", "weights"))


@pytest.mark.gpu
def test_layer_fusion_gpu_batch_sizes_share_tuning(cuda):
    """Batch sizes in one bucket reuse the forward's autotuning result instead of benchmarking again."""
    from wave_rt.kernels.layer_fusion import _FWD

    h, w1, b1 = (x.to(torch.bfloat16) for x in fusion_inputs(40, 4, 64, 96, device=cuda))
    layer_fusion_mlp(h[:33], w1, b1)
    tuned = len(_FWD.compiled().cache)
    for batch in (34, 40, 37):
        layer_fusion_mlp(h[:batch], w1, b1)
    assert len(_FWD.compiled().cache) == tuned
