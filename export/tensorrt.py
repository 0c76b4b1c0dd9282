"""TensorRT engines from a bundle's ONNX graphs (the official `tensorrt` Python API), and their runner.

`build_engines(bundle)` parses every stage graph with trt.OnnxParser, adds optimization profiles (the
decoder gets one per token-budget bucket: sequence ranges (1, 128], (128, 512], ... with the batch range a
token budget allows there), builds in fp16/bf16/fp32 with a persistent timing cache and, optionally, the
version-compatible flag, and writes `tensorrt/<stage>.plan` into the bundle with the manifest re-hashed.

TensorRT is not installable on our CI machines (its builder wheel lives on NVIDIA's index); a missing
TensorRT fails with the exact pip command. The graphs it would read are checked against TensorRT's ONNX
operator support list (export/data/tensorrt_onnx_operators.tsv) on every machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wave_rt.errors import BatchTooLargeError, CheckpointError

DEFAULT_SEQ_BUCKETS = (128, 512, 2048, 8192, 32768)
OPERATORS_FILE = Path(__file__).resolve().parent / "data" / "tensorrt_onnx_operators.tsv"
# Ranges for the encoder stages' axes (min, opt, max) when building one profile per stage.
AXIS_RANGES: dict[str, tuple[int, int, int]] = {
    "chunks": (1, 32, 1024),  # 1 s chunks of the Whisper tower in one batch
    "frames": (1, 1600, 51200),
    "tokens": (1, 800, 25600),
    "segments": (1, 4, 64),
    "fbank_patches": (2, 64, 512),
    "audio_tokens": (1, 800, 25600),  # BEATs rows after WAVE's merge: one per Whisper token, as "tokens"
    "merged": (1, 1024, 16384),
}


def supported_operators(path: Path = OPERATORS_FILE) -> dict[str, str]:
    """{operator: restrictions} of the operators TensorRT's ONNX parser marks supported (Y)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        cells = line.split("\t")
        if len(cells) >= 2 and cells[1].strip().upper().startswith("Y"):
            out[cells[0].strip()] = cells[3].strip() if len(cells) > 3 else ""
    return out


def unsupported_ops(onnx_path: str | os.PathLike[str]) -> list[str]:
    """Ops of a graph that TensorRT's ONNX parser does not list (custom domains count as unsupported)."""
    from wave_rt.export.graphs import onnx_ops

    ok = supported_operators()
    return sorted(f"{dom}::{op}" for dom, op in onnx_ops(onnx_path) if dom != "ai.onnx" or op not in ok)


def _trt() -> Any:
    from wave_rt._optional import require

    return require("tensorrt", "building TensorRT engines")


@dataclass(frozen=True)
class Profile:
    """One optimization profile: axis name -> (min, opt, max)."""

    axes: dict[str, tuple[int, int, int]]


def decoder_profiles(max_batch_tokens: int, buckets: tuple[int, ...] = DEFAULT_SEQ_BUCKETS,
                     max_batch: int = 256) -> list[Profile]:
    """One profile per sequence bucket (lo, hi]: the batch axis up to what the token budget allows at lo."""
    out = []
    lo = 0
    for hi in buckets:
        if lo >= max_batch_tokens:
            break
        b_max = max(1, min(max_batch, max_batch_tokens // max(lo + 1, 1)))
        b_opt = max(1, min(b_max, max_batch_tokens // hi))
        out.append(Profile({"batch": (1, b_opt, b_max), "seq": (lo + 1, min(hi, max_batch_tokens), hi)}))
        lo = hi
    return out


def _shape(labels: list[Any], axes: dict[str, tuple[int, int, int]], which: int) -> tuple[int, ...]:
    dims = []
    for label in labels:
        if isinstance(label, int):
            dims.append(label)
            continue
        name, _, mult = str(label).partition("*")
        dims.append(axes[name][which] * (int(mult) if mult else 1))
    return tuple(dims)


def stage_profiles(name: str, stage_meta: dict[str, Any], max_batch_tokens: int) -> list[Profile]:
    if name == "decoder":
        return decoder_profiles(max_batch_tokens)
    axes: dict[str, tuple[int, int, int]] = {}
    for meta in stage_meta["inputs"].values():
        for label in meta["shape"]:
            if isinstance(label, str):
                base = label.partition("*")[0]
                axes[base] = AXIS_RANGES.get(base, (1, 64, 4096))
    for base, (lo, hi) in stage_meta.get("bounds", {}).items():
        mn, opt, mx = axes[base]
        axes[base] = (max(mn, lo), min(max(opt, lo), hi), min(mx, hi))
    return [Profile(axes)]


def build_engines(bundle: str | os.PathLike[str], precision: str = "fp16", max_batch_tokens: int = 32768,
                  timing_cache: str | os.PathLike[str] | None = None, version_compatible: bool = True,
                  workspace_gib: float = 8.0, stages: tuple[str, ...] | None = None) -> list[Path]:
    """Build tensorrt/<stage>.plan for the bundle's ONNX graphs; returns the engine files."""
    from wave_rt.export.bundle import read_manifest, verify_bundle, write_manifest

    trt = _trt()
    root = Path(bundle)
    manifest = verify_bundle(root, "onnxruntime")
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = Path(timing_cache) if timing_cache else root / "tensorrt" / "timing.cache"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    records: dict[str, Any] = {}
    for name, stage in manifest["stages"].items():
        if stages is not None and name not in stages:
            continue
        onnx_file = root / stage["files"]["onnx"][0]
        bad = unsupported_ops(onnx_file)
        if bad:
            raise CheckpointError(onnx_file, f"operators outside TensorRT's ONNX support list: {', '.join(bad)}")
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise CheckpointError(onnx_file, f"TensorRT's ONNX parser failed: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if precision != "fp32":
            flag = getattr(trt.BuilderFlag, precision.upper(), None)
            if flag is None:  # TensorRT 11 builds only strongly typed networks
                from wave_rt._optional import PIP_INSTALL

                raise CheckpointError(onnx_file, f"TensorRT {trt.__version__} has no {precision.upper()} builder flag; "
                                                 f"engines are built with TensorRT 10: {PIP_INSTALL['tensorrt']}")
            config.set_flag(flag)
        if version_compatible:
            # Engines run on later TensorRT versions of the same major through the lean runtime they embed.
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        profiles = stage_profiles(name, stage, max_batch_tokens)
        for prof in profiles:
            p = builder.create_optimization_profile()
            for inp, meta in stage["inputs"].items():
                p.set_shape(inp, *(_shape(meta["shape"], prof.axes, k) for k in range(3)))
            config.add_optimization_profile(p)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise CheckpointError(onnx_file, "TensorRT failed to build an engine (see the log above)")
        out = root / "tensorrt" / f"{name}.plan"
        tmp = out.with_suffix(".plan.tmp")
        tmp.write_bytes(bytes(engine))
        os.replace(tmp, out)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        written.append(out)
        stage["files"]["tensorrt"] = [out.relative_to(root).as_posix()]
        records[name] = [p.axes for p in profiles]
    manifest = {**read_manifest(root), "stages": manifest["stages"]}
    manifest["tensorrt"] = {"version": trt.__version__, "precision": precision, "version_compatible": version_compatible,
                            "max_batch_tokens": max_batch_tokens, "profiles": records}
    manifest["versions"]["tensorrt"] = trt.__version__
    added = written + ([cache_path] if cache_path.exists() and cache_path.is_relative_to(root) else [])
    write_manifest(root, manifest, added=added)
    return written


class TrtStage:
    """A serialized TensorRT engine on CUDA tensors: picks the first profile whose ranges hold the inputs."""

    def __init__(self, path: Path, names: tuple[str, ...], device: torch.device) -> None:
        trt = _trt()
        if device.type != "cuda":
            raise CheckpointError(path, "TensorRT engines run on CUDA devices only")
        self.trt = trt
        self.names = names
        self.device = device
        self.path = path
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        # Version-compatible engines carry a lean runtime: host code the runtime must be allowed to run.
        self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise CheckpointError(path, "TensorRT could not deserialize the engine (built by another TensorRT?)")
        self.context = self.engine.create_execution_context()
        self.outputs = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                        if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT]
        self._profile = -1

    def _pick_profile(self, inputs: dict[str, torch.Tensor]) -> int:
        for k in range(self.engine.num_optimization_profiles):
            fits = True
            for name in self.names:
                lo, _, hi = self.engine.get_tensor_profile_shape(name, k)
                shape = tuple(inputs[name].shape)
                fits &= all(a <= s <= b for a, s, b in zip(lo, shape, hi))
            if fits:
                return k
        raise BatchTooLargeError(f"{self.path.name}: no optimization profile holds input shapes "
                                 f"{[tuple(inputs[n].shape) for n in self.names]}")

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device)
        k = self._pick_profile(inputs)
        if k != self._profile:
            self.context.set_optimization_profile_async(k, stream.cuda_stream)
            self._profile = k
        keep = []
        for name in self.names:
            t = inputs[name].to(self.device).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        out_name = self.outputs[0]
        shape = tuple(self.context.get_tensor_shape(out_name))
        dtype = {self.trt.float32: torch.float32, self.trt.float16: torch.float16,
                 self.trt.bfloat16: torch.bfloat16}[self.engine.get_tensor_dtype(out_name)]
        out = torch.empty(shape, dtype=dtype, device=self.device)
        self.context.set_tensor_address(out_name, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out
