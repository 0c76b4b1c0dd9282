"""Which implementation a kernel call runs, decided per call from its tensors:

* CUDA tensors                              -> compiled Triton (autotuned over several launch configs);
* CPU tensors and ``TRITON_INTERPRET=1``    -> the same Triton kernels in Triton's interpreter, with one
                                               launch config (autotuning over several fails there);
* anything else (or no triton installed)    -> the op's torch fallback.

``force_backend`` overrides the choice for a block of code (tests, benchmarks). Outputs and workspaces of
the Triton paths are allocated through ``empty``; tests switch on ``poison_outputs`` so that every
allocation starts as NaN / a sentinel and a kernel that forgets to write an element is caught.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Literal

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch fallbacks still work; the kernels below are then plain functions
    HAS_TRITON = False

    class _StubLanguage:
        """Just enough of triton.language for kernel signatures (`tl.constexpr`) to be defined."""

        constexpr = object

    class _StubTriton:
        @staticmethod
        def jit(fn: Callable | None = None, **_: Any) -> Any:
            return fn if fn is not None else (lambda f: f)

    triton = _StubTriton()  # type: ignore[assignment]
    tl = _StubLanguage()  # type: ignore[assignment]

Backend = Literal["triton", "interpret", "torch"]
BACKENDS: tuple[Backend, ...] = ("triton", "interpret", "torch")

_forced: ContextVar[Backend | None] = ContextVar("wave_rt_kernels_backend", default=None)
poison_outputs = False


def interpret_requested() -> bool:
    """TRITON_INTERPRET read now (not at import), with triton's own notion of a true value."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on", "yes"}


@contextlib.contextmanager
def force_backend(backend: Backend | None) -> Iterator[None]:
    """Run the enclosed kernel calls on `backend` (None restores the automatic choice)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    token = _forced.set(backend)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Backend | None:
    """The backend `force_backend` set for the current block, or None under the automatic choice."""
    return _forced.get()


def select_backend(*tensors: torch.Tensor) -> Backend:
    on_cuda = any(t.is_cuda for t in tensors)
    forced = _forced.get()
    if forced is not None:
        if forced == "triton" and not (HAS_TRITON and on_cuda):
            raise RuntimeError("backend 'triton' needs triton and CUDA tensors")
        if forced == "interpret" and (not HAS_TRITON or on_cuda):
            raise RuntimeError("backend 'interpret' needs triton and CPU tensors")
        return forced
    if on_cuda:
        return "triton" if HAS_TRITON else "torch"
    if HAS_TRITON and interpret_requested():
        return "interpret"
    return "torch"


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for kernel outputs; NaN-filled (floats) or filled with a sentinel (ints) when poisoning."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if poison_outputs:
        out.fill_(float("nan") if out.is_floating_point() else -7777)
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands: follow PyTorch's own matmul setting, so that our fp32
    error is comparable to the fp32 PyTorch path (TF32 only where PyTorch would use it too)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs per grid axis exercise the multi-program code paths


# The interpreter executes one program at a time through process-global state (grid index, patched
# triton.language), so interpreted launches are serialised.
_interpreter_lock = threading.RLock()


@contextlib.contextmanager
def _jit_calls_run_interpreted() -> Iterator[None]:
    """Make calls to @triton.jit helpers (tl.sum, tl.max, tl.sort, ...) work inside interpreted kernels.

    triton decides at *decoration* time whether `@triton.jit` builds a compiled JITFunction or an
    interpreted one, so helpers defined while TRITON_INTERPRET was unset refuse to run in the
    interpreter. We interpret our own kernels per call, so while one runs, JITFunction calls are routed
    through an InterpretedFunction of the same Python function (cached by identity: hashing a
    JITFunction walks its globals, which the interpreter has patched at that point)."""
    from triton.runtime.errors import InterpreterError
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__
    # InterpretedFunction.__call__ re-patches the triton.language modules visible from the helper's globals
    # on every call (~3 ms: it walks the modules with inspect.getmembers), which dominated the interpreted
    # bitonic networks (hundreds of helper calls per launch). Those patches are only undone when the
    # launch ends, so one patch per globals dict and launch suffices; later calls run the rewritten helper.
    patched: set[int] = set()

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        fn = _interpreted_helpers.get(id(self))
        if fn is None:
            fn = _interpreted_helpers[id(self)] = InterpretedFunction(self.fn)
        scope = id(self.fn.__globals__)
        if scope not in patched or not hasattr(fn, "rewrite"):
            patched.add(scope)
            return fn(*args, **kwargs)
        try:
            return fn.rewrite()(*args, **kwargs)
        except Exception as e:  # the same error type the interpreter raises for a helper
            raise InterpreterError(repr(e)) from e

    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original


_interpreted_helpers: dict[int, Any] = {}


class Kernel:
    """One @triton.jit kernel, launched compiled (autotuned over `configs`) or interpreted (`interpret_meta`).

    `configs` are triton.Config objects (CUDA only); `interpret_meta` holds the meta-parameters of the
    single configuration used under the interpreter. Meta-parameters the launcher passes itself must not
    appear in either. `restore_value` names arguments a launch updates in place, so that autotuning
    (which launches a kernel several times) restores them between trials."""

    def __init__(self, kernel: Any, configs: Callable[[], list[Any]], key: list[str],
                 interpret_meta: dict[str, Any], restore_value: Sequence[str] = ()) -> None:
        self.kernel = kernel
        self._configs = configs
        self.key = key
        self.interpret_meta = interpret_meta
        self.restore_value = list(restore_value)
        self._compiled: Any = None
        self._interpreted: Any = None

    @property
    def fn(self) -> Callable:
        return self.kernel.fn

    def compiled(self) -> Any:
        if self._compiled is None:
            from triton.runtime.jit import JITFunction

            jit = self.kernel if isinstance(self.kernel, JITFunction) else JITFunction(self.kernel.fn)
            self._compiled = triton.autotune(configs=self._configs(), key=self.key,
                                             restore_value=self.restore_value or None)(jit)
        return self._compiled

    def configs(self) -> list[Any]:
        return self._configs()

    def launch(self, backend: Backend, grid: Callable[[dict[str, Any]], tuple[int, ...]], *args: Any,
               **kwargs: Any) -> None:
        if backend == "interpret":
            from triton.runtime.interpreter import InterpretedFunction

            if self._interpreted is None:
                self._interpreted = InterpretedFunction(self.kernel.fn)
            meta = {**kwargs, **self.interpret_meta}
            with _interpreter_lock, _jit_calls_run_interpreted():
                self._interpreted[grid(meta)](*args, **meta)
        elif backend == "triton":
            self.compiled()[grid](*args, **kwargs)
        else:
            raise RuntimeError(f"kernel launched on backend {backend!r}")


def config(warps: int = 4, stages: int = 3, **meta: Any) -> Any:
    return triton.Config(meta, num_warps=warps, num_stages=stages)
