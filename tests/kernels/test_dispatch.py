"""Per-call backend selection, forcing, output poisoning, and the accuracy rule the kernel tests rely on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from wave_rt.kernels import _dispatch as dispatch
from wave_rt.kernels import layer_fusion, layer_fusion_mlp, scalar_mix, similarity, similarity_topk

pytestmark = pytest.mark.usefixtures("poison", "seed")


@pytest.fixture
def no_interpret_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_select_backend_cpu_follows_triton_interpret(no_interpret_env):
    x = torch.zeros(2)
    assert dispatch.select_backend(x) == "torch"
    for value in ("1", "true", "ON", " yes "):
        no_interpret_env.setenv("TRITON_INTERPRET", value)
        assert dispatch.select_backend(x) == "interpret", value
    for value in ("0", "", "false", "off"):
        no_interpret_env.setenv("TRITON_INTERPRET", value)
        assert dispatch.select_backend(x) == "torch", value


def test_select_backend_without_triton_uses_torch(no_interpret_env):
    no_interpret_env.setenv("TRITON_INTERPRET", "1")
    no_interpret_env.setattr(dispatch, "HAS_TRITON", False)
    assert dispatch.select_backend(torch.zeros(2)) == "torch"
    with pytest.raises(RuntimeError, match="interpret"), dispatch.force_backend("interpret"):
        dispatch.select_backend(torch.zeros(2))


def test_force_backend_overrides_and_restores(no_interpret_env):
    x = torch.zeros(2)
    with dispatch.force_backend("interpret"):
        assert dispatch.select_backend(x) == "interpret"
        with dispatch.force_backend("torch"):
            assert dispatch.select_backend(x) == "torch"
        assert dispatch.select_backend(x) == "interpret"
        with dispatch.force_backend(None):  # None: the automatic choice again
            assert dispatch.select_backend(x) == "torch"
    assert dispatch.select_backend(x) == "torch"
    with pytest.raises(KeyError), dispatch.force_backend("interpret"):
        raise KeyError("restored on errors too")
    assert dispatch.select_backend(x) == "torch"


def test_force_backend_errors():
    with pytest.raises(ValueError, match="unknown kernel backend"), dispatch.force_backend("cuda"):  # type: ignore[arg-type]
        pass
    # Compiled Triton needs CUDA tensors: forcing it on CPU tensors is an error, not a silent fallback.
    with dispatch.force_backend("triton"), pytest.raises(RuntimeError, match="CUDA"):
        dispatch.select_backend(torch.zeros(2))
    with dispatch.force_backend("triton"), pytest.raises(RuntimeError, match="CUDA"):
        layer_fusion_mlp(torch.zeros(1, 1, 2), torch.zeros(3, 2), torch.zeros(3))


def test_launch_on_torch_backend_is_an_error():
    with pytest.raises(RuntimeError, match="torch"):
        layer_fusion._FWD.launch("torch", lambda meta: (1,))


@pytest.mark.gpu
def test_select_backend_cuda(cuda):
    x = torch.zeros(2, device=cuda)
    assert dispatch.select_backend(x) == "triton"
    assert dispatch.select_backend(torch.zeros(2), x) == "triton"  # any CUDA tensor decides
    with dispatch.force_backend("interpret"), pytest.raises(RuntimeError, match="CPU"):
        dispatch.select_backend(x)


def test_empty_poisons_only_when_asked(monkeypatch):
    monkeypatch.setattr(dispatch, "poison_outputs", True)
    floats = dispatch.empty((3, 5), torch.float16, torch.device("cpu"))
    ints = dispatch.empty((4,), torch.int64, torch.device("cpu"))
    assert floats.shape == (3, 5) and floats.dtype == torch.float16 and torch.isnan(floats).all()
    assert ints.dtype == torch.int64 and (ints == -7777).all()
    monkeypatch.setattr(dispatch, "poison_outputs", False)
    plain = dispatch.empty((2, 2), torch.float32, torch.device("cpu"))
    assert plain.shape == (2, 2) and plain.dtype == torch.float32


@pytest.fixture
def cuda_matmul() -> Iterator[Any]:
    """torch.backends.cuda.matmul with allow_tf32 restored afterwards. Not monkeypatch: the flag is a
    property-like attribute of a module proxy that pytest 9's monkeypatch cannot undo (teardown error)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        yield matmul
    finally:
        matmul.allow_tf32 = before


def test_dot_precision_follows_pytorch_tf32_setting(cuda_matmul):
    cuda_matmul.allow_tf32 = False
    assert dispatch.dot_precision(torch.float32) == "ieee"
    cuda_matmul.allow_tf32 = True
    assert dispatch.dot_precision(torch.float32) == "tf32"
    assert dispatch.dot_precision(torch.float16) == "tf32"  # ignored by tl.dot for 16-bit inputs


def _count_launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    backends: list[str] = []
    original = dispatch.Kernel.launch

    def launch(self, backend, *args, **kwargs):
        backends.append(backend)
        return original(self, backend, *args, **kwargs)

    monkeypatch.setattr(dispatch.Kernel, "launch", launch)
    return backends


@pytest.mark.parametrize("op", ["layer_fusion_mlp", "scalar_mix", "similarity_topk"])
def test_public_ops_dispatch_on_triton_interpret(no_interpret_env, op):
    """Without CUDA and without TRITON_INTERPRET the torch fallback runs (no kernel launch); with it set,
    the same call runs the Triton kernels in the interpreter, forward and backward."""
    calls = {
        "layer_fusion_mlp": lambda: layer_fusion_mlp(torch.randn(3, 2, 5, requires_grad=True),
                                                     torch.randn(4, 10), torch.randn(4)).sum().backward(),
        "scalar_mix": lambda: scalar_mix(torch.randn(3, 2, 5, requires_grad=True),
                                         torch.randn(2, requires_grad=True)).sum().backward(),
        "similarity_topk": lambda: similarity_topk(torch.randn(3, 5), torch.randn(20, 5), 4),
    }
    launches = _count_launches(no_interpret_env)
    calls[op]()
    assert launches == []
    no_interpret_env.setenv("TRITON_INTERPRET", "1")
    calls[op]()
    assert launches and set(launches) == {"interpret"}
    if op != "similarity_topk":  # a backward kernel ran too
        assert len(launches) >= 2


def test_interpreted_launch_restores_jit_calls():
    """Interpreted launches route @triton.jit helper calls to the interpreter only while they run."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__
    with dispatch.force_backend("interpret"):
        similarity_topk(torch.randn(2, 4), torch.randn(9, 4), 3)
    assert JITFunction.__call__ is original
    with pytest.raises(ZeroDivisionError):  # a launch that fails half-way ...
        similarity._MERGE.launch("interpret", lambda meta: (1 // 0,))
    assert JITFunction.__call__ is original  # ... undoes the patch all the same


def test_accuracy_rule_rejects_bad_results(accuracy):
    """The comparison every kernel test uses can fail: a NaN, a wrong element or a shape mismatch."""
    ref64 = torch.randn(6, 7, dtype=torch.float64)
    baseline = ref64.half()
    good = ref64.half()
    accuracy("good", good, ref64, baseline, torch.float16)
    for bad in (good.clone().index_put_((torch.tensor(2), torch.tensor(3)), torch.tensor(float("nan"), dtype=torch.float16)),
                good + torch.nn.functional.one_hot(torch.tensor(40), 42).view(6, 7).half() * 0.05,
                good.T):
        with pytest.raises(AssertionError):
            accuracy("bad", bad, ref64, baseline, torch.float16)
