"""Bundle round trip and its failures: a missing file, a changed hash, another opset, another torch for
AOTInductor packages, a stage without the asked format; loading never unpickles; graphs are checker-clean,
have the pinned opset and dynamic batch/sequence axes."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from wave_rt.export.bundle import MANIFEST, read_manifest, verify_bundle, write_manifest
from wave_rt.export.graphs import OPSET, onnx_opset

from wave_rt.embed.encoder import WaveEncoder
from wave_rt.errors import CheckpointError


def test_manifest_lists_every_file_with_its_hash(wave_bundle):
    m = read_manifest(wave_bundle)
    on_disk = {p.relative_to(wave_bundle).as_posix() for p in wave_bundle.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(m["files"]) == on_disk
    assert set(m["stages"]) == {"audio_tower", "beats", "vision", "decoder"}
    assert m["opset"] == OPSET and m["recipe"] == "all_layer" and m["dtype"] == "float32"
    for key in ("torch", "onnx", "onnxruntime", "transformers", "wave_rt"):
        assert key in m["versions"]
    dec = m["stages"]["decoder"]
    assert dec["inputs"]["inputs_embeds"]["shape"][:2] == ["batch", "seq"]
    assert dec["input_order"] == ["inputs_embeds", "attention_mask", "position_ids", "use_head"]


def test_graphs_are_checker_clean_with_dynamic_axes(wave_bundle):
    import onnx

    for stage in read_manifest(wave_bundle)["stages"].values():
        path = wave_bundle / stage["files"]["onnx"][0]
        onnx.checker.check_model(str(path), full_check=True)
        assert onnx_opset(path) == OPSET
        graph = onnx.load(str(path), load_external_data=False).graph
        for inp in graph.input:
            declared = stage["inputs"][inp.name]["shape"]
            dims = inp.type.tensor_type.shape.dim
            for axis, want in enumerate(declared):
                if isinstance(want, str):  # symbolic in the graph too, not a traced constant
                    assert dims[axis].dim_param and not dims[axis].HasField("dim_value"), (inp.name, axis)


def _tamper(bundle, rel):
    path = bundle / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_changed_hash_is_refused_naming_the_file(bundle_copy):
    _tamper(bundle_copy, "onnx/decoder.onnx")
    with pytest.raises(CheckpointError, match=r"decoder\.onnx.*sha256"):
        WaveEncoder.from_pretrained(bundle_copy, backend="onnxruntime", device="cpu")
    # The AOTInductor side does not read that file, so it still loads.
    verify_bundle(bundle_copy, "aoti")


def test_changed_embedding_table_is_refused(bundle_copy):
    _tamper(bundle_copy, "embed_tokens.safetensors")
    for backend in ("onnxruntime", "aoti"):
        with pytest.raises(CheckpointError, match="embed_tokens.safetensors"):
            verify_bundle(bundle_copy, backend)


def test_missing_file_is_refused_naming_it(bundle_copy):
    (bundle_copy / "aoti" / "vision.pt2").unlink()
    with pytest.raises(CheckpointError, match=r"vision\.pt2.*missing"):
        WaveEncoder.from_pretrained(bundle_copy, backend="aoti", device="cpu")
    (bundle_copy / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        verify_bundle(bundle_copy, "onnxruntime")


def test_other_opset_is_refused(bundle_copy):
    import onnx

    # A graph whose opset disagrees with the manifest, with hashes rewritten so only the opset check can catch it.
    path = bundle_copy / "onnx" / "beats.onnx"
    model = onnx.load(str(path))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = OPSET - 1
    onnx.save(model, str(path))
    manifest = read_manifest(bundle_copy)
    write_manifest(bundle_copy, manifest)
    with pytest.raises(CheckpointError, match=rf"beats\.onnx.*opset {OPSET - 1}"):
        verify_bundle(bundle_copy, "onnxruntime")
    manifest["opset"] = OPSET + 1
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"opset {OPSET + 1}"):
        verify_bundle(bundle_copy, "onnxruntime")


def test_other_torch_version_is_refused_for_aoti(bundle_copy):
    manifest = read_manifest(bundle_copy)
    manifest["versions"]["torch"] = "2.3.1"
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="torch 2.3.1"):
        verify_bundle(bundle_copy, "aoti")
    verify_bundle(bundle_copy, "onnxruntime")  # ONNX graphs do not depend on the exporting torch


def test_other_format_version_and_unknown_backend(bundle_copy):
    with pytest.raises(ValueError, match="unknown backend"):
        verify_bundle(bundle_copy, "openvino")
    with pytest.raises(CheckpointError, match="no tensorrt files"):
        verify_bundle(bundle_copy, "tensorrt")
    manifest = read_manifest(bundle_copy)
    manifest["format_version"] = 99
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99"):
        verify_bundle(bundle_copy, "onnxruntime")


def test_loading_and_encoding_never_unpickle(wave_bundle, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read while loading a bundle")

    class Refusing:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refusing)
    for backend in ("onnxruntime", "aoti"):
        enc = WaveEncoder.from_pretrained(wave_bundle, backend=backend, device="cpu")
        out = enc.encode(["a dog barks", "rain"])
        assert out.shape == (2, enc.dim) and np.isfinite(out).all()


def test_bundle_files_have_the_modes_the_umask_gives(wave_bundle):
    # A bundle is served by other accounts (a Triton server's): mkdtemp's 0700 and safetensors' 0600 must not
    # survive into the published directory.
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for p in [wave_bundle, *wave_bundle.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(stat.S_IMODE(p.stat().st_mode)), oct(want))
