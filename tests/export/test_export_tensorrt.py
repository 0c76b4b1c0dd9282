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
