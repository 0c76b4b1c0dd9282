"""The export subcommands and bench-latency through wave_rt.cli.run (exit codes, outputs, error messages)."""

from __future__ import annotations

import io
import json

import pytest

from wave_rt._optional import available
from wave_rt.cli import EXIT_ERROR, EXIT_OK, run


def _run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_triton_repo_command(tmp_path, wave_bundle):
    code, out, err = _run("export", "triton-repo", str(wave_bundle), "--out", str(tmp_path / "repo"), "--cpu")
    assert code == EXIT_OK, err
    assert (tmp_path / "repo" / "wave_decoder" / "config.pbtxt").exists() and "repository written" in out


@pytest.mark.skipif(available("tensorrt"), reason="TensorRT is installed: the missing-package path cannot run")
def test_tensorrt_command_without_tensorrt_prints_the_install(wave_bundle):
    from wave_rt._optional import PIP_INSTALL

    code, _, err = _run("export", "tensorrt", str(wave_bundle))
    assert code == EXIT_ERROR and PIP_INSTALL["tensorrt"] in err and "tensorrt-cu13>=10,<11" in err


def test_bundle_command_refuses_a_non_empty_directory(tmp_path, wave_checkpoint):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("keep me")
    code, _, err = _run("export", "bundle", str(wave_checkpoint), "--out", str(tmp_path / "b"))
    assert code == EXIT_ERROR and "not empty" in err
    assert (tmp_path / "b" / "x").read_text() == "keep me"


def test_bench_latency_command_writes_json_and_png(tmp_path, wave_checkpoint, wave_bundle):
    out_json = tmp_path / "lat.json"
    code, out, err = _run("bench-latency", str(wave_checkpoint), "--bundle", str(wave_bundle), "--device", "cpu",
                          "--backends", "eager,onnxruntime", "--modalities", "text", "--iters", "3", "--warmup", "1",
                          "--batch-sizes", "1,2", "--out", str(out_json))
    assert code == EXIT_OK, err
    doc = json.loads(out_json.read_text())
    assert doc["partial"] is False and doc["machine_load_before"]["cpu_count"]
    assert set(doc["latency"]) == {"eager", "onnxruntime"}
    stats = doc["latency"]["onnxruntime"]["text"]
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] and stats["n"] == 3
    assert {r["case"] for r in doc["rows"]} >= {"text/bs1/p50/onnxruntime", "text/bs2/throughput/eager"}
    assert out_json.with_suffix(".png").stat().st_size > 1000


def test_bench_latency_refuses_a_bundle_of_another_model(tmp_path, wave_bundle):
    code, _, err = _run("bench-latency", "demo", "--bundle", str(wave_bundle), "--device", "cpu",
                        "--backends", "onnxruntime", "--modalities", "text", "--iters", "2", "--out",
                        str(tmp_path / "x.json"))
    assert code == EXIT_ERROR and "another model" in err


def test_latency_warmup_runs_every_batch_before_timing() -> None:
    """A batch first seen inside the timed loop pays its first-shape costs there (p99 877 ms vs p50 29 ms for
    eager 7B text on an H200): the warm-up covers every batch once, however small --warmup is."""
    import torch
    from wave_rt.export.bench_latency import measure

    class Batch:
        def __init__(self, i: int) -> None:
            self.i = i

        def to(self, device, dtype):
            return self

    calls: list[int] = []
    times = measure(lambda b: calls.append(b.i), [Batch(i) for i in range(5)], torch.device("cpu"), warmup=2,
                    iters=4, dtype=torch.float32)
    assert len(times) == 4 and len(calls) == 5 + 4
    assert sorted(calls[:5]) == [0, 1, 2, 3, 4], calls


def test_bf16_onnx_is_refused_before_the_model_loads(tmp_path, wave_checkpoint):
    # opset 18 has no bfloat16 ConstantOfShape: the export failed deep in onnx's checker with a traceback
    code, _, err = _run("export", "bundle", str(wave_checkpoint), "--out", str(tmp_path / "b"), "--dtype", "bf16")
    assert code == EXIT_ERROR and "opset >= 20" in err and "--precision bf16" in err
    assert not (tmp_path / "b").exists()


def test_bench_latency_bundle_opens_with_the_encoder(tmp_path, wave_checkpoint):
    # the bundle bench-latency exports had no tokenizer: WaveEncoder could not open it
    import numpy as np

    from wave_rt.embed.encoder import WaveEncoder

    out_json = tmp_path / "lat.json"
    code, _, err = _run("bench-latency", str(wave_checkpoint), "--device", "cpu", "--backends", "onnxruntime",
                        "--modalities", "text", "--iters", "2", "--warmup", "1", "--batch-sizes", "1,12",
                        "--bundle", str(tmp_path / "bundle"), "--out", str(out_json))
    assert code == EXIT_OK, err
    doc = json.loads(out_json.read_text())
    assert doc["throughput"]["onnxruntime"]["text"]["12"]["n"] >= 1  # 12 rows prepared for a batch of 12
    engine = WaveEncoder.from_pretrained(tmp_path / "bundle", backend="onnxruntime")
    torch_path = WaveEncoder.from_pretrained(wave_checkpoint, device="cpu")
    texts = ["a dog barks", "rain on a roof"]
    np.testing.assert_allclose(engine.encode(texts), torch_path.encode(texts), atol=1e-4)


def test_bench_latency_refuses_batches_larger_than_its_items():
    # a batch of 8 rows timed as a batch of 16 doubled its throughput
    from wave_rt.export.bench_latency import bench_latency

    with pytest.raises(ValueError, match="batch size 16 needs as many prepared items"):
        bench_latency(None, {"text": [object()] * 8}, ["eager"], None, 0, [1, 16])
