"""A Triton Inference Server model repository from a bundle.

    DIR/wave_<stage>/config.pbtxt + 1/model.onnx (or model.plan)   one model per stage graph
    DIR/wave_rt/config.pbtxt + 1/model.py                          python-backend front model

The stage models are the bundle's graphs on the onnxruntime_onnx (or tensorrt_plan) platform. Their batch
axes are not axis 0 of every input (M-RoPE positions are [3, B, T], encoder stages take packed streams),
so they declare max_batch_size 0 with -1 dims and are called with whole batches. Dynamic batching lives
on the front model: Triton groups single-item requests (text, or a media path / bytes, plus an optional
instruction) into one execute(), which prepares the items with the bundle's processor, plans token-budget
batches and runs each stage through BLS calls to the stage models (the same BundleModel as
WaveEncoder.from_pretrained(bundle, backend=...), with Triton as the stage runner).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from wave_rt.export.bundle import read_manifest, verify_bundle

_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
          "bool": "TYPE_BOOL", "int32": "TYPE_INT32"}
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "onnx", "model.onnx"),
             "tensorrt": ("tensorrt_plan", "tensorrt", "model.plan")}
FRONT = "wave_rt"


def _dims(shape: list[Any]) -> str:
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape)


def _tensor(name: str, meta: dict[str, Any]) -> str:
    return f'  {{ name: "{name}" data_type: {_TYPES[meta["dtype"]]} dims: [ {_dims(meta["shape"])} ] }}'


def stage_config(stage: str, meta: dict[str, Any], platform: str, gpu: bool, profiles: int = 0) -> str:
    """A stage model's config; `profiles`: the engine's optimization profile count (tensorrt), every one listed
    on the instance (Triton's TensorRT backend uses only the first profile of an instance that lists none)."""
    plat, _, filename = PLATFORMS[platform]
    inputs = ",\n".join(_tensor(n, meta["inputs"][n]) for n in meta["input_order"])
    outputs = ",\n".join(_tensor(n, m) for n, m in meta["outputs"].items())
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    names = ", ".join(f'"{k}"' for k in range(profiles))
    listed = f" profile: [ {names} ]" if profiles > 1 else ""
    return (f'name: "wave_{stage}"\nplatform: "{plat}"\ndefault_model_filename: "{filename}"\nmax_batch_size: 0\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\ninstance_group [ {{ kind: {kind} count: 1{listed} }} ]\n")


def front_config(dim: int, bundle: str, max_batch: int, queue_delay_us: int) -> str:
    return f'''name: "{FRONT}"
backend: "python"
max_batch_size: {max_batch}
input [
  {{ name: "ITEM" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "MODALITY" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "INSTRUCTION" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "EMBEDDING" data_type: TYPE_FP32 dims: [ {dim} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "bundle" value: {{ string_value: "{bundle}" }} }}
'''


FRONT_MODEL_PY = '''"""wave_rt front model: preprocessing + token-budget batching, stages through BLS (written by wave-rt export
triton-repo). ITEM is text, or a media path when MODALITY is audio / video / av; INSTRUCTION is optional."""

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

import wave_rt
from wave_rt.embed.encoder import WaveEncoder
from wave_rt.export.triton_repo import bls_encoder

KINDS = {"text": lambda s: s, "query": lambda s: wave_rt.Text(s, side="query"), "audio": wave_rt.Audio,
         "video": wave_rt.Video, "av": wave_rt.AudioVisual}


def _rows(request, name):
    """Every row of an input (a request may carry a batch: [b, 1]); None when the optional input is absent."""
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    return [v.decode() if isinstance(v, bytes) else str(v) for v in t.as_numpy().reshape(-1)]


def _error(exc):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.encoder = bls_encoder(params["bundle"]["string_value"], pb_utils)

    def execute(self, requests):
        rows = {}  # request -> [(item, instruction)], one per row of its ITEM
        errors = {}
        for r, request in enumerate(requests):
            try:
                items = _rows(request, "ITEM")
                kinds = _rows(request, "MODALITY") or ["text"] * len(items)
                instructions = _rows(request, "INSTRUCTION") or [None] * len(items)
                if not (len(kinds) == len(instructions) == len(items)):
                    raise ValueError(f"{len(items)} ITEM rows but {len(kinds)} MODALITY and {len(instructions)} "
                                     "INSTRUCTION rows: give one per item, or none")
                rows[r] = [(KINDS[k or "text"](it), ins) for it, k, ins in zip(items, kinds, instructions)]
            except Exception as exc:  # one bad request never fails the others
                errors[r] = exc
        by_instruction = {}
        for r, pairs in rows.items():
            for j, (item, ins) in enumerate(pairs):
                by_instruction.setdefault(ins, []).append((r, j, item))
        out = {r: [None] * len(pairs) for r, pairs in rows.items()}
        for ins, group in by_instruction.items():
            try:
                emb = self.encoder.encode([it for _, _, it in group], instruction=ins)
            except Exception as exc:
                for r, _, _ in group:
                    errors.setdefault(r, exc)
                continue
            for (r, j, _), row in zip(group, emb):
                out[r][j] = np.asarray(row, dtype=np.float32)
        responses = []
        for r in range(len(requests)):
            if r in errors:
                responses.append(_error(errors[r]))
            else:
                tensor = pb_utils.Tensor("EMBEDDING", np.stack(out[r]))  # [b, dim]: the batch axis Triton expects
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
'''


class BlsStage:
    """A stage runner that sends the stage's tensors to its Triton model through BLS."""

    def __init__(self, pb_utils: Any, model: str, names: tuple[str, ...], output: str) -> None:
        self.pb = pb_utils
        self.model = model
        self.names = names
        self.output = output

    def __call__(self, inputs: dict[str, Any]) -> Any:
        import torch

        tensors = [self.pb.Tensor(n, inputs[n].detach().cpu().contiguous().numpy()) for n in self.names]
        # outputs in host memory: a GPU stage model's output stays on the device otherwise, and as_numpy() of
        # a device tensor raises
        request = self.pb.InferenceRequest(model_name=self.model, requested_output_names=[self.output],
                                           inputs=tensors,
                                           preferred_memory=self.pb.PreferredMemory(self.pb.TRITONSERVER_MEMORY_CPU, 0))
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.model}: {response.error().message()}")
        return torch.from_numpy(self.pb.get_output_tensor_by_name(response, self.output).as_numpy())


def bls_encoder(bundle: str, pb_utils: Any) -> Any:
    """WaveEncoder over the bundle's processor and heads with every stage a BLS call."""
    import torch
    from safetensors.torch import load_file
    from wave_rt.export.bundle import EMBED_TABLE
    from wave_rt.export.runtime import BundleModel, bundle_fingerprint

    from wave_rt.config import WaveConfig
    from wave_rt.embed.encoder import WaveEncoder
    from wave_rt.embed.processor import WaveProcessor, load_tokenizer

    root = Path(bundle)
    manifest = read_manifest(root)
    config = WaveConfig.from_pretrained(root)
    stages = {name: BlsStage(pb_utils, f"wave_{name}", tuple(m["input_order"]), next(iter(m["outputs"])))
              for name, m in manifest["stages"].items()}
    model = BundleModel(config, load_file(str(root / EMBED_TABLE))["weight"], stages, torch.device("cpu"), root)
    processor = WaveProcessor(config, load_tokenizer(root))
    return WaveEncoder(model, processor, model_id=root.name, weights_id=bundle_fingerprint(manifest))


def write_triton_repo(bundle: str | os.PathLike[str], out_dir: str | os.PathLike[str], platform: str = "onnxruntime",
                      gpu: bool = True, max_batch: int = 64, queue_delay_us: int = 2000,
                      bundle_path_in_server: str | None = None) -> Path:
    """Write the repository; graphs are copied (with their external data) under each model's version 1."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    if platform == "tensorrt" and not gpu:
        raise ValueError("TensorRT engines run on GPUs only: drop --cpu, or use --platform onnxruntime")
    root = Path(bundle)
    manifest = verify_bundle(root, "onnxruntime" if platform == "onnxruntime" else "tensorrt")
    engine_profiles = manifest.get("tensorrt", {}).get("profiles", {}) if platform == "tensorrt" else {}
    _, fmt, filename = PLATFORMS[platform]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, meta in manifest["stages"].items():
        model_dir = out / f"wave_{name}"
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        files = meta["files"][fmt]
        shutil.copyfile(root / files[0], model_dir / "1" / filename)
        for extra in files[1:]:  # ONNX external data keeps the file name the graph refers to
            shutil.copyfile(root / extra, model_dir / "1" / Path(extra).name)
        (model_dir / "config.pbtxt").write_text(stage_config(name, meta, platform, gpu,
                                                             len(engine_profiles.get(name, []))))
    front = out / FRONT
    (front / "1").mkdir(parents=True, exist_ok=True)
    (front / "1" / "model.py").write_text(FRONT_MODEL_PY)
    server_bundle = bundle_path_in_server or str(root.resolve())
    (front / "config.pbtxt").write_text(front_config(int(manifest["embedding_dim"]), server_bundle, max_batch,
                                                     queue_delay_us))
    return out


def server_flags(bundle: str | os.PathLike[str], platform: str) -> list[str]:
    """tritonserver options the repository needs: version-compatible engines run their embedded lean runtime
    only when the TensorRT backend is told to allow it (its default is false)."""
    manifest = read_manifest(Path(bundle))
    if platform == "tensorrt" and manifest.get("tensorrt", {}).get("version_compatible"):
        return ["--backend-config=tensorrt,version-compatible=true"]
    return []
