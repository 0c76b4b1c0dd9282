"""ONNX files: weights go to external data past the size limit (forced here on a small stage) and the
graph still passes the checker, loads in ONNX Runtime and matches the module; sessions are cached."""

from __future__ import annotations

import torch
from wave_rt.export import graphs
from wave_rt.export.bundle import export_bundle, read_manifest, verify_bundle
from wave_rt.export.examples import example_inputs
from wave_rt.export.runtime import OrtStage
from wave_rt.export.stages import stage_specs

from wave_rt.model.loading import load_wave_model


def test_external_data_round_trip_and_session_cache(tmp_path, wave_checkpoint, monkeypatch):
    monkeypatch.setattr(graphs, "EXTERNAL_DATA_BYTES", 0)
    bundle = export_bundle(wave_checkpoint, tmp_path / "b", formats=("onnx",), stages=("audio_tower",))
    stage = read_manifest(bundle)["stages"]["audio_tower"]
    files = stage["files"]["onnx"]
    assert files[0] == "onnx/audio_tower.onnx" and len(files) == 2 and files[1].startswith("onnx/audio_tower.onnx")
    graph_bytes = (bundle / files[0]).stat().st_size
    data_bytes = (bundle / files[1]).stat().st_size
    assert data_bytes > graph_bytes  # the weights left the protobuf
    verify_bundle(bundle, "onnxruntime")  # both files are hashed in the manifest

    model = load_wave_model(wave_checkpoint)[0]
    spec = next(s for s in stage_specs(model) if s.name == "audio_tower")
    example = example_inputs(model)["audio_tower"]
    run = OrtStage(bundle / files[0], torch.device("cpu"))
    with torch.no_grad():
        want = spec.module(**example)
    torch.testing.assert_close(run(example), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert OrtStage(bundle / files[0], torch.device("cpu")).session is run.session
    assert OrtStage(bundle / files[0], torch.device("cpu"), threads=1).session is not run.session
