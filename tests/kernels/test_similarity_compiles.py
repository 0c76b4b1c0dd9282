"""The compiled (CUDA) similarity_topk filter kernel, built for sm_90 on a machine without a GPU: Triton's
full lowering (MLIR -> PTX -> ptxas) runs on the CPU, so a kernel that only the interpreter accepts (a
type mismatch across an `if`, an op the compiler lacks, shared memory beyond an H100's) fails here in CI
instead of on a lent GPU. One tile shape per regime; speed and results are only checked on a GPU.

Each compile runs in a fresh Python process: a process that has run kernels in Triton's interpreter (the
other kernel tests) has triton.language patched for it, and compiling there fails ("'ir.value' object has
no attribute 'dtype'") unless the kernel is already in Triton's cache, i.e. on every fresh machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.slow


def _compile(dtype: str, n_q: int, k: int, normalize: bool) -> object:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from wave_rt.kernels import similarity as sim

    plan = sim._Plan.choose(n_q, k, "triton")
    fn = sim._topk_filter_kernel
    ptr = {"fp16": "*fp16", "bf16": "*bf16"}[dtype]
    types = {"q_ptr": ptr, "c_ptr": ptr, "q_norm_ptr": "*fp32", "c_norm_ptr": "*fp32", "part_ptr": "*i64",
             "buf_s_ptr": "*fp32", "buf_i_ptr": "*i32", "cnt_ptr": "*i32", "thr_ptr": "*fp32",
             "index_base": "i64", "min_key": "i64"}
    consts = {"NORMALIZE": normalize, "C_NORM_IN_LOOP": plan.c_norm_in_loop, "K_PAD": plan.k_pad, "BUF": plan.buf,
              "BLOCK_Q": plan.block_q, "BLOCK_N": plan.block_n, "BLOCK_D": plan.block_d, "MERGE_Q": plan.merge_q,
              "EVEN_D": True, "PRECISION": "tf32", "LOG_MQ": sim._log2(plan.merge_q),
              "LOG_BUF": sim._log2(plan.buf), "LOG_K": sim._log2(plan.k_pad), "stride_qd": 1, "stride_cd": 1}
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})


def _filter_facts(dtype: str, n_q: int, k: int, normalize: bool) -> dict[str, Any]:
    kernel = _compile(dtype, n_q, k, normalize)
    ptx = kernel.asm["ptx"]
    return {"shared": kernel.metadata.shared, "mma": "wgmma" in ptx or "mma.sync" in ptx}


def _norm_facts() -> dict[str, Any]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from wave_rt.kernels import similarity as sim

    fn = sim._row_norm_kernel
    consts = {"BLOCK_R": 16, "BLOCK_D": 256, "stride_d": 1}
    types = {"x_ptr": "*bf16", "out_ptr": "*fp32"}
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    return {"sqrt": "sqrt" in kernel.asm["ptx"]}


def _in_fresh_process(name: str, *args: Any) -> dict[str, Any]:
    code = (f"import json, runpy; m = runpy.run_path({__file__!r}); "
            f"print('RESULT ' + json.dumps(m[{name!r}](*{args!r})))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.parametrize(("dtype", "n_q", "k", "normalize"), [
    ("bf16", 1024, 100, True),   # many queries: 128-row tensor-core tiles, norms precomputed
    ("fp16", 1, 10, False),      # few queries: the streaming tile (the flat-gpu search path)
], ids=["many-queries", "few-queries"])
def test_filter_kernel_compiles_for_sm90(dtype, n_q, k, normalize):
    facts = _in_fresh_process("_filter_facts", dtype, n_q, k, normalize)
    assert facts["shared"] <= 227 * 1024, facts  # an H100's shared memory per block
    assert facts["mma"]  # scores on tensor cores


def test_row_norm_kernel_compiles_for_sm90():
    assert _in_fresh_process("_norm_facts")["sqrt"]
