"""Turning a stage graph into files: ONNX (torch.onnx dynamo exporter) and AOTInductor packages (.pt2).

Both go through torch.export with the same symbolic axes, so a shape accepted by one is accepted by the
other. Axis names in StageSpec.dynamic may carry a multiplier ("fbank_patches*16"): an axis that must
stay a multiple of a patch or merge size is declared that way instead of letting the tracer guard on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from wave_rt.export.stages import StageSpec

# ONNX opset of every graph we write (ai.onnx). 18 is the newest opset both ONNX Runtime >= 1.14 and
# TensorRT 10 parse fully; a bundle written with another opset is rejected at load time.
OPSET = 18
# Protobuf's hard limit is 2 GiB; weights go to an external-data file well before it.
EXTERNAL_DATA_BYTES = 1 << 30
MAX_AXIS = 1 << 20


def dynamic_shapes(spec: StageSpec) -> dict[str, dict[int, Any]]:
    """torch.export dynamic_shapes for a spec: one Dim per axis name, shared across inputs."""
    dims: dict[str, Any] = {}

    def dim(label: str) -> Any:
        name, _, mult = label.partition("*")
        if name not in dims:
            lo, hi = spec.bounds.get(name, (1, MAX_AXIS))
            dims[name] = torch.export.Dim(name, min=lo, max=hi)
        return dims[name] * int(mult) if mult else dims[name]

    return {inp: {axis: dim(label) for axis, label in spec.dynamic.get(inp, {}).items()} for inp in spec.inputs}


def export_program(spec: StageSpec, example: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    args = tuple(example[name] for name in spec.inputs)
    with torch.no_grad():
        return torch.export.export(spec.module, args, dynamic_shapes=dynamic_shapes(spec), strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=True)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def export_onnx(spec: StageSpec, example: dict[str, torch.Tensor], path: str | os.PathLike[str],
                opset: int = OPSET, optimize: bool = True) -> list[Path]:
    """Write spec as ONNX at `path` (weights in `<path>.data` past EXTERNAL_DATA_BYTES); checker-clean.
    Returns the files written."""
    from wave_rt._optional import require

    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export (the torch.onnx dynamo exporter)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    external = _param_bytes(spec.module) > EXTERNAL_DATA_BYTES
    args = tuple(example[name] for name in spec.inputs)
    with torch.no_grad():
        program = torch.onnx.export(
            spec.module, args, dynamo=True, dynamic_shapes=dynamic_shapes(spec), opset_version=opset,
            input_names=list(spec.inputs), output_names=list(spec.outputs), optimize=optimize,
            verify=False, report=False,
        )
    program.save(str(out), external_data=external)
    # check_model on the path, not a loaded proto: the path form handles external data past 2 GB.
    onnx.checker.check_model(str(out), full_check=True)
    # The graph and its external-data file(s), which the exporter names after the graph.
    return [out] + sorted(p for p in out.parent.glob(out.name + "*") if p != out)


def export_aoti(spec: StageSpec, example: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> list[Path]:
    """AOTInductor package (.pt2) of spec for the device the example tensors are on."""
    from torch._inductor import aoti_compile_and_package

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(spec, example)
    aoti_compile_and_package(program, package_path=str(out))
    return [out]


def onnx_ops(path: str | os.PathLike[str]) -> set[tuple[str, str]]:
    """(domain, op_type) of every node, subgraphs and local functions included."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: set[tuple[str, str]] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            ops.add((node.domain or "ai.onnx", node.op_type))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            ops.add((node.domain or "ai.onnx", node.op_type))
    return ops


def onnx_opset(path: str | os.PathLike[str]) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None
