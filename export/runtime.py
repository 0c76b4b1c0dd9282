"""Running a bundle: stage runners per backend (ONNX Runtime, AOTInductor, TensorRT, eager torch) and
BundleModel, which does what WaveModel.forward does with the stage graphs in place of the modules.

BundleModel quacks like WaveModel where WaveEncoder touches it (`config`, `device`, `dtype`, `__call__`
on a collated PaddedBatch), so `WaveEncoder.from_pretrained(bundle, backend=...)` runs the same encode(),
token-budget batching, prompts and heads on every backend: only the stage runner changes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from wave_rt.export.stages import STAGES, StageInputs  # noqa: F401 - StageInputs: re-exported for runners

from wave_rt.config import WaveConfig
from wave_rt.dtypes import resolve_device
from wave_rt.errors import CheckpointError
from wave_rt.model.batch import PaddedBatch

StageRunner = Callable[[dict[str, torch.Tensor]], torch.Tensor]
BACKENDS = ("onnxruntime", "aoti", "tensorrt")


# ------------------------------------------------------------------------------------------ runners
_SESSIONS: dict[tuple, Any] = {}
_SESSIONS_LOCK = threading.Lock()


def ort_session(path: str | os.PathLike[str], providers: list[Any], threads: int | None = None) -> Any:
    """One InferenceSession per (file, size, mtime, providers, threads), shared by every encoder."""
    from wave_rt._optional import require

    ort = require("onnxruntime", "the onnxruntime backend")
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, repr(providers), threads)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if threads:
                opts.intra_op_num_threads = int(threads)
                opts.inter_op_num_threads = 1
            _SESSIONS[key] = ort.InferenceSession(str(p), sess_options=opts, providers=providers)
        return _SESSIONS[key]


_ORT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}


class OrtStage:
    """An ONNX graph on ONNX Runtime. On CUDA, inputs are bound in place with IO binding (no host copy);
    the output is bound on the device and handed back through DLPack. Intra-op threads: `threads`, else
    $WAVE_RT_ORT_THREADS, else ONNX Runtime's default (one per core)."""

    def __init__(self, path: Path, device: torch.device, threads: int | None = None) -> None:
        self.device = device
        if threads is None and os.environ.get("WAVE_RT_ORT_THREADS"):
            threads = int(os.environ["WAVE_RT_ORT_THREADS"])
        if device.type == "cuda":
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort_session(path, providers, threads)
        if device.type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise CheckpointError(path, "onnxruntime has no CUDA execution provider here: pip install onnxruntime-gpu")
        self.output = self.session.get_outputs()[0].name

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.device.type != "cuda":
            feeds = {k: v.detach().cpu().contiguous().numpy() for k, v in inputs.items()}
            return torch.from_numpy(self.session.run([self.output], feeds)[0])
        binding = self.session.io_binding()
        keep = []
        for name, t in inputs.items():
            t = t.detach().to(self.device).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", self.device.index or 0, _ORT_TYPES[t.dtype], list(t.shape), t.data_ptr())
        binding.bind_output(self.output, "cuda", self.device.index or 0)
        self.session.run_with_iobinding(binding)
        value = binding.get_outputs()[0]
        to_dlpack = getattr(value, "to_dlpack", None) or getattr(getattr(value, "_ortvalue", None), "to_dlpack", None)
        if to_dlpack is not None:
            return torch.from_dlpack(to_dlpack())
        return torch.from_numpy(value.numpy()).to(self.device)  # older onnxruntime: a copy through the host


class AotiStage:
    """An AOTInductor package (.pt2), compiled for the device it was exported on."""

    def __init__(self, path: Path, names: tuple[str, ...]) -> None:
        from torch._inductor import aoti_load_package

        self.names = names
        self.runner = aoti_load_package(str(path))

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.runner(*[inputs[n] for n in self.names])
        return out[0] if isinstance(out, (list, tuple)) else out


class TorchStage:
    """A stage module run by PyTorch (eager, or wrapped by torch.compile): the reference the others match."""

    def __init__(self, module: torch.nn.Module, names: tuple[str, ...]) -> None:
        self.module = module
        self.names = names

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(*[inputs[n] for n in self.names])


# ------------------------------------------------------------------------------------------- model
class BundleModel:
    """WaveModel.forward over stage runners (the padded layout the graphs were traced on)."""

    supports_packed = False  # WaveEncoder collates padded ModelBatches for it

    def __init__(self, config: WaveConfig, embed_table: torch.Tensor, stages: dict[str, StageRunner],
                 device: torch.device, source: object = "<bundle>") -> None:
        self.config = config
        self.host = StageInputs(config, embed_table)
        self.stages = stages
        self._device = device
        self.source = source
        self.weights_id: str | None = None

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.host.table.dtype

    def _run(self, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        runner = self.stages.get(name)
        if runner is None:
            raise CheckpointError(self.source, f"this bundle has no {name!r} stage (exported: {', '.join(self.stages)})")
        # Float inputs in the bundle's dtype: that is what the graphs were traced with (the modules cast anyway).
        moved = {k: v.to(self._device, self.dtype) if v.is_floating_point() else v.to(self._device)
                 for k, v in inputs.items()}
        return runner(moved).to(self._device)

    def encode_audio(self, batch: PaddedBatch) -> torch.Tensor:
        cfg = self.config
        whisper = None if cfg.beats_only else self._run("audio_tower", self.host.audio_tower(batch))
        if not cfg.use_beats:
            return whisper
        beats = self._run("beats", self.host.beats(batch))
        if whisper is None:
            return beats
        return torch.stack([whisper, beats.to(whisper.dtype)], dim=1).reshape(-1, whisper.shape[-1])

    def __call__(self, batch: PaddedBatch) -> torch.Tensor:
        from wave_rt.model.wave_model import _check_count

        embeds = self.host.token_embeddings(batch).to(self._device)
        input_ids = batch.input_ids.to(self._device)
        for kind, present, encode in (
            ("audio", batch.mel is not None or batch.fbank is not None, lambda: self.encode_audio(batch)),
            ("video", batch.pixel_values is not None, lambda: self._run("vision", self.host.vision(batch))),
        ):
            if present:
                feats = encode()
                mask = input_ids == self.config.token_id(kind)
                _check_count(mask, feats, kind)
                embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))
        return self._run("decoder", self.host.decoder(batch, embeds))

    forward = __call__


def load_bundle_model(path: str | os.PathLike[str], backend: str, device: torch.device | str | None = None,
                      threads: int | None = None, check_hashes: bool = True) -> tuple[BundleModel, dict[str, Any]]:
    """Verify the bundle for `backend` and build its BundleModel. Returns (model, manifest)."""
    from safetensors.torch import load_file
    from wave_rt.export.bundle import EMBED_TABLE, verify_bundle

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)} (or 'torch' for a checkpoint)")
    root = Path(path)
    manifest = verify_bundle(root, backend, check_hashes=check_hashes)
    dev = resolve_device(device)
    config = WaveConfig.from_pretrained(root)
    table = load_file(str(root / EMBED_TABLE), device=str(dev))["weight"]
    fmt = {"onnxruntime": "onnx", "aoti": "aoti", "tensorrt": "tensorrt"}[backend]
    if backend == "aoti" and manifest.get("aoti_device") and torch.device(manifest["aoti_device"]).type != dev.type:
        raise CheckpointError(root, f"the AOTInductor packages were compiled for {manifest['aoti_device']}, not {dev}")
    stages: dict[str, StageRunner] = {}
    for name in STAGES:
        meta = manifest["stages"].get(name)
        if meta is None:
            continue
        file = root / meta["files"][fmt][0]
        names = tuple(meta["input_order"])
        if backend == "onnxruntime":
            stages[name] = OrtStage(file, dev, threads)
        elif backend == "aoti":
            stages[name] = AotiStage(file, names)
        else:
            from wave_rt.export.tensorrt import TrtStage

            stages[name] = TrtStage(file, names, dev)
    model = BundleModel(config, table, stages, dev, source=root)
    model.weights_id = bundle_fingerprint(manifest)
    return model, manifest


def bundle_fingerprint(manifest: dict[str, Any]) -> str:
    """Hash of the weights-bearing files (graphs, embedding table), whatever the backend reads."""
    import hashlib

    h = hashlib.sha256()
    for rel, meta in sorted(manifest["files"].items()):
        if rel.endswith((".safetensors", ".onnx", ".data", ".pt2")):
            h.update(f"{rel}:{meta['sha256']};".encode())
    return h.hexdigest()[:16]
