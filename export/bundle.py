"""Export bundles: a directory of stage graphs (ONNX and/or AOTInductor), the token embedding table,
tokenizer, config (recipe and prompts included) and a manifest.json that names every file with its sha256.

Layout::

    BUNDLE/manifest.json
    BUNDLE/config.json  tokenizer.json  tokenizer_config.json
    BUNDLE/embed_tokens.safetensors        # the decoder's input embedding table (a lookup, kept out of the graph)
    BUNDLE/onnx/<stage>.onnx [.onnx.data]
    BUNDLE/aoti/<stage>.pt2
    BUNDLE/tensorrt/<stage>.plan           # written later by `wave-rt export tensorrt BUNDLE`

Loading checks the manifest before anything runs: format version, every listed file present with the
recorded sha256, the ONNX opset, and the torch version an AOTInductor package was compiled against.
Nothing in a bundle is unpickled: tensors are safetensors, graphs are protobuf or compiled packages.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from wave_rt.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "wave_rt-bundle"
FORMAT_VERSION = 1
FORMATS = ("onnx", "aoti")
EMBED_TABLE = "embed_tokens.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")
BACKEND_FORMAT = {"onnxruntime": "onnx", "aoti": "aoti", "tensorrt": "tensorrt"}


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import transformers

    import wave_rt

    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "wave_rt": getattr(wave_rt, "__version__", "0"), "python": platform.python_version()}
    for mod in ("onnx", "onnxruntime", "onnxscript", "tensorrt"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def _tensor_meta(t: torch.Tensor, axes: dict[int, str]) -> dict[str, Any]:
    return {"dtype": str(t.dtype).removeprefix("torch."),
            "shape": [axes.get(i, int(s)) for i, s in enumerate(t.shape)]}


def _check_formats(formats: tuple[str, ...], dtype: torch.dtype | None) -> None:
    from wave_rt.export.graphs import OPSET

    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats}")
    if "onnx" in formats and dtype == torch.bfloat16:
        # ONNX opset 18 (what TensorRT 10's parser reads fully) has no bfloat16 ConstantOfShape; TensorRT builds
        # bf16 engines from fp32 graphs (`wave-rt export tensorrt --precision bf16`)
        raise ValueError(f"bf16 ONNX graphs need opset >= 20 (we export opset {OPSET}): export the onnx format in "
                         "fp32 or fp16 (TensorRT engines take --precision bf16), or bf16 with --formats aoti")


def export_bundle(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    formats: tuple[str, ...] = ("onnx",),
    stages: tuple[str, ...] | None = None,
    recipe: str | None = None,
    beats_path: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Export a checkpoint directory's stage graphs into a bundle (see export_model_bundle)."""
    from wave_rt.model.loading import load_wave_model

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: export into a new directory")
    _check_formats(formats, dtype)  # before loading a 7B model
    model, _ = load_wave_model(checkpoint, device=device, dtype=dtype, recipe=recipe, beats_path=beats_path)
    return export_model_bundle(model, out, formats=formats, stages=stages, tokenizer_dir=checkpoint,
                               source=Path(checkpoint).resolve().name)


def export_model_bundle(
    model: Any,
    out_dir: str | os.PathLike[str],
    formats: tuple[str, ...] = ("onnx",),
    stages: tuple[str, ...] | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    source: str = "<model>",
) -> Path:
    """Export a WaveModel's stage graphs (on its device, in its dtype) into a bundle directory, written to a
    temp dir and renamed, so an interrupted export never leaves a directory that looks complete."""
    from safetensors.torch import save_file
    from wave_rt.export.examples import example_inputs
    from wave_rt.export.graphs import OPSET, export_aoti, export_onnx
    from wave_rt.export.stages import stage_specs

    _check_formats(formats, getattr(model, "dtype", None))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: export into a new directory")
    config = model.config
    device = str(model.device)
    specs = [s for s in stage_specs(model) if stages is None or s.name in stages]
    if stages is not None and {s.name for s in specs} != set(stages):
        raise ValueError(f"unknown or unavailable stages {sorted(set(stages) - {s.name for s in specs})}")
    examples = example_inputs(model, device=device)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).exists():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        table = model.model.embed_tokens.weight.detach().to("cpu").contiguous()
        save_file({"weight": table}, str(tmp / EMBED_TABLE), metadata={"format": "pt"})
        stage_meta: dict[str, Any] = {}
        for spec in specs:
            example = examples[spec.name]
            with torch.no_grad():
                result = spec.module(*[example[n] for n in spec.inputs])
            files: dict[str, list[str]] = {}
            if "onnx" in formats:
                written = export_onnx(spec, example, tmp / "onnx" / f"{spec.name}.onnx")
                files["onnx"] = [p.relative_to(tmp).as_posix() for p in written]
            if "aoti" in formats:
                written = export_aoti(spec, example, tmp / "aoti" / f"{spec.name}.pt2")
                files["aoti"] = [p.relative_to(tmp).as_posix() for p in written]
            stage_meta[spec.name] = {
                "input_order": list(spec.inputs),
                "inputs": {n: _tensor_meta(example[n], spec.dynamic.get(n, {})) for n in spec.inputs},
                "outputs": {spec.outputs[0]: _tensor_meta(result, {0: "rows"})},
                "bounds": {k: list(v) for k, v in spec.bounds.items()},
                "files": files,
            }
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": source,
            "recipe": config.recipe.name,
            "backbone": config.backbone,
            "dtype": str(model.dtype).removeprefix("torch."),
            "aoti_device": device if "aoti" in formats else None,
            "opset": OPSET,
            "embedding_dim": config.embedding_dim,
            "config_fingerprint": config.fingerprint(),
            "state_fingerprint": state_fingerprint(model),
            "versions": versions(),
            "stages": stage_meta,
            "files": {},
        }
        write_manifest(tmp, manifest)
        _default_modes(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _default_modes(root: Path) -> None:
    """The modes a plain mkdir and open would have given under this process's umask: mkdtemp makes the staging
    directory owner-only (0700) and safetensors writes 0600, so a bundle served by another user (a Triton
    server's account) could not be read."""
    mask = os.umask(0)
    os.umask(mask)
    root.chmod(0o777 & ~mask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def state_fingerprint(model: Any) -> str:
    """The encoder's sampled hash of a model's weights: tells which model a bundle was exported from."""
    from wave_rt.embed.encoder import _state_fingerprint

    return _state_fingerprint(model)


def write_manifest(root: Path, manifest: dict[str, Any], added: list[Path] | None = None) -> None:
    """Hash every file under root into manifest["files"] and write manifest.json atomically; with `added`, keep
    the recorded hashes and hash only those files (a later step, e.g. TensorRT engines, never re-blesses files
    it did not check)."""
    if added is None:
        files = {}
        paths = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]
    else:
        files, paths = dict(manifest["files"]), added
    for p in paths:
        files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest["files"] = dict(sorted(files.items()))
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, root / MANIFEST)


def is_bundle(path: str | os.PathLike[str]) -> bool:
    p = Path(path) / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(path, "manifest.json is missing: not an export bundle") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"manifest.json is unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(path, f"not a {FORMAT} manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, f"bundle format version {data.get('format_version')} is not the supported "
                                    f"{FORMAT_VERSION}; re-export it with this wave_rt")
    return data


def verify_bundle(root: str | os.PathLike[str], backend: str, check_hashes: bool = True) -> dict[str, Any]:
    """The manifest, after checking what `backend` will read: files present, sha256, opset, versions."""
    from wave_rt.export.graphs import OPSET, onnx_opset

    base = Path(root)
    manifest = read_manifest(base)
    fmt = BACKEND_FORMAT.get(backend)
    if fmt is None:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKEND_FORMAT)} or 'torch'")
    needed = ["config.json", EMBED_TABLE] + [n for n in TOKENIZER_FILES if n in manifest["files"]]
    for name, stage in manifest["stages"].items():
        if fmt not in stage["files"]:
            raise CheckpointError(base, f"stage {name!r} has no {fmt} files in this bundle (exported formats: "
                                        f"{', '.join(stage['files']) or 'none'})")
        needed += stage["files"][fmt]
    for rel in needed:
        path = base / rel
        meta = manifest["files"].get(rel)
        if meta is None:
            raise CheckpointError(path, "not listed in manifest.json")
        if not path.is_file():
            raise CheckpointError(path, "missing from the bundle")
        if path.stat().st_size != meta["bytes"]:
            raise CheckpointError(path, f"size {path.stat().st_size} != {meta['bytes']} recorded in manifest.json")
        if check_hashes and sha256_file(path) != meta["sha256"]:
            raise CheckpointError(path, "sha256 differs from manifest.json (file changed or corrupt)")
    if fmt == "onnx":
        if manifest.get("opset") != OPSET:
            raise CheckpointError(base / MANIFEST, f"bundle opset {manifest.get('opset')} is not the opset {OPSET} "
                                                   "this wave_rt runs; re-export")
        for stage in manifest["stages"].values():
            graph = base / stage["files"]["onnx"][0]
            found = onnx_opset(graph)
            if found != manifest["opset"]:
                raise CheckpointError(graph, f"graph opset {found} != manifest opset {manifest['opset']}")
    if fmt == "aoti":
        built = manifest["versions"].get("torch", "")
        if _major_minor(built) != _major_minor(torch.__version__):
            raise CheckpointError(base / MANIFEST, f"AOTInductor packages were compiled with torch {built}; this is "
                                                   f"torch {torch.__version__}: re-export with this torch")
    return manifest


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])
