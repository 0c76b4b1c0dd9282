"""The graphs meant for TensorRT use only operators on TensorRT's ONNX support list (the list committed from
onnx-tensorrt's docs/operators.md); profiles cover the token budget; a missing TensorRT names the install."""

from __future__ import annotations

import pytest
from wave_rt.export.bundle import read_manifest
from wave_rt.export.tensorrt import (
    OPERATORS_FILE,
    _shape,
    build_engines,
    decoder_profiles,
    stage_profiles,
    supported_operators,
    unsupported_ops,
)

from wave_rt._optional import PIP_INSTALL, available
from wave_rt.errors import MissingDependencyError


def test_operator_list_is_the_published_matrix():
    text = OPERATORS_FILE.read_text()
    assert "onnx/onnx-tensorrt" in text and "docs/operators.md" in text  # the source is named
    ops = supported_operators()
    assert len(ops) > 140
    for op in ("MatMul", "Softmax", "Gather", "Where", "LayerNormalization", "Conv", "Erf", "Expand"):
        assert op in ops
    for op in ("STFT", "Unique", "StringNormalizer"):  # marked N in the matrix
        assert op not in ops


def test_bundle_graphs_use_only_tensorrt_operators(wave_bundle):
    manifest = read_manifest(wave_bundle)
    for name, stage in manifest["stages"].items():
        assert unsupported_ops(wave_bundle / stage["files"]["onnx"][0]) == [], name


def test_the_check_flags_unsupported_and_custom_ops(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])
    graph = helper.make_graph([helper.make_node("Unique", ["x"], ["y"]),
                               helper.make_node("FastGelu", ["x"], ["z"], domain="com.microsoft")], "g", [x], [y, z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    assert unsupported_ops(tmp_path / "bad.onnx") == ["ai.onnx::Unique", "com.microsoft::FastGelu"]


def test_decoder_profiles_follow_token_budget_buckets():
    profiles = decoder_profiles(8192)
    seqs = [p.axes["seq"] for p in profiles]
    assert seqs[0][0] == 1 and seqs[-1][2] >= 8192
    for (_, _, hi1), (lo2, _, _) in zip(seqs, seqs[1:]):
        assert lo2 == hi1 + 1  # contiguous, no gap and no overlap
    for p in profiles:
        (bmin, bopt, bmax), (smin, sopt, smax) = p.axes["batch"], p.axes["seq"]
        assert 1 <= bmin <= bopt <= bmax and smin <= sopt <= smax
        assert bopt * sopt <= 8192 and bmax * smin <= 8192 or bmax == 1


def test_encoder_profiles_keep_multiples_and_bounds(wave_bundle):
    stage = read_manifest(wave_bundle)["stages"]["beats"]
    (prof,) = stage_profiles("beats", stage, 32768)
    lo, opt, hi = (_shape(stage["inputs"]["fbank"]["shape"], prof.axes, k) for k in range(3))
    assert lo[1] % 16 == 0 and hi[1] % 16 == 0 and lo[1] >= 32 and hi[1] <= 512 * 16 and lo[2] == 128


@pytest.mark.skipif(available("tensorrt"), reason="TensorRT is installed: the missing-package path cannot run")
def test_missing_tensorrt_names_the_install(wave_bundle):
    with pytest.raises(MissingDependencyError) as info:
        build_engines(wave_bundle)
    assert PIP_INSTALL["tensorrt"] in str(info.value)


def _fake_trt(flags=("FP16", "BF16", "VERSION_COMPATIBLE")):
    """The slice of the tensorrt module build_engines calls (TensorRT is not installable here): the builder
    returns fixed engine bytes, so what is checked is the bundle bookkeeping around it."""
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    trt = MagicMock(name="tensorrt")
    trt.__version__ = "10.16.0"
    trt.BuilderFlag = SimpleNamespace(**{f: f for f in flags})
    builder = trt.Builder.return_value
    builder.build_serialized_network.return_value = b"serialized engine"
    builder.create_builder_config.return_value.get_timing_cache.return_value.serialize.return_value = b"cache"
    trt.OnnxParser.return_value.parse_from_file.return_value = True
    return trt


def test_building_engines_never_re_blesses_files_it_did_not_check(bundle_copy, monkeypatch):
    # the manifest was re-hashed from the disk after the build: a corrupted .pt2 became "verified"
    from wave_rt.export import tensorrt
    from wave_rt.export.bundle import verify_bundle

    from wave_rt.errors import CheckpointError

    monkeypatch.setattr(tensorrt, "_trt", lambda: _fake_trt())
    pt2 = bundle_copy / read_manifest(bundle_copy)["stages"]["decoder"]["files"]["aoti"][0]
    data = bytearray(pt2.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt2.write_bytes(bytes(data))
    engines = build_engines(bundle_copy)
    assert {p.name for p in engines} == {f"{s}.plan" for s in read_manifest(bundle_copy)["stages"]}
    verify_bundle(bundle_copy, "tensorrt")  # the engines and the timing cache are recorded
    with pytest.raises(CheckpointError, match="sha256"):
        verify_bundle(bundle_copy, "aoti")


def test_tensorrt_without_the_fp16_flag_names_the_version_that_has_it(bundle_copy, monkeypatch):
    # TensorRT 11 dropped BuilderFlag.FP16/BF16 (AttributeError before); the install line pins TensorRT 10
    from wave_rt.export import tensorrt

    from wave_rt.errors import CheckpointError

    monkeypatch.setattr(tensorrt, "_trt", lambda: _fake_trt(flags=("VERSION_COMPATIBLE",)))
    with pytest.raises(CheckpointError, match="FP16 builder flag") as info:
        build_engines(bundle_copy, precision="fp16")
    assert PIP_INSTALL["tensorrt"] in str(info.value) and "<11" in PIP_INSTALL["tensorrt"]


def test_triton_tensorrt_models_list_every_profile_and_the_server_flag(bundle_copy, tmp_path, monkeypatch):
    # without a profile list Triton's TensorRT backend serves only profile 0 (decoder sequences <= 128)
    pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="pip install 'tritonclient[grpc]'")
    from google.protobuf import text_format
    from wave_rt.export import tensorrt
    from wave_rt.export.triton_repo import server_flags, write_triton_repo

    monkeypatch.setattr(tensorrt, "_trt", lambda: _fake_trt())
    build_engines(bundle_copy, max_batch_tokens=8192)
    repo = write_triton_repo(bundle_copy, tmp_path / "repo", platform="tensorrt")
    n = len(read_manifest(bundle_copy)["tensorrt"]["profiles"]["decoder"])
    cfg = text_format.Parse((repo / "wave_decoder" / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert n > 1 and list(cfg.instance_group[0].profile) == [str(k) for k in range(n)]
    assert cfg.platform == "tensorrt_plan"
    assert server_flags(bundle_copy, "tensorrt") == ["--backend-config=tensorrt,version-compatible=true"]
    with pytest.raises(ValueError, match="GPUs only"):
        write_triton_repo(bundle_copy, tmp_path / "cpu", platform="tensorrt", gpu=False)


def test_a_shape_outside_every_profile_is_a_batch_too_large_error(tmp_path):
    # the runners split such a batch in halves, as they split one that runs out of memory
    from types import SimpleNamespace

    import torch
    from wave_rt.export.tensorrt import TrtStage

    from wave_rt.errors import BatchTooLargeError

    stage = object.__new__(TrtStage)
    stage.names, stage.path = ("input_ids",), tmp_path / "decoder.plan"
    stage.engine = SimpleNamespace(num_optimization_profiles=2, get_tensor_profile_shape=lambda name, k: (
        [((1, 1), (4, 64), (256, 128)), ((1, 129), (8, 256), (63, 512))][k]))
    assert stage._pick_profile({"input_ids": torch.zeros(200, 100)}) == 0
    assert stage._pick_profile({"input_ids": torch.zeros(40, 300)}) == 1
    with pytest.raises(BatchTooLargeError, match="decoder.plan: no optimization profile"):
        stage._pick_profile({"input_ids": torch.zeros(300, 38)})
