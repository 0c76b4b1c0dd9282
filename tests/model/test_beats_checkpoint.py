"""BEATs checkpoint files: the released pickled {'cfg', 'model'} layout read with weights_only=True,
refusal of arbitrary pickles and of malformed state dicts, safetensors conversion and loading."""

from __future__ import annotations

import json
import os

import pytest
import torch

from wave_rt.errors import CheckpointError
from wave_rt.model.beats import (
    BEATsConfig,
    BEATsEncoder,
    convert_beats_checkpoint,
    load_beats_encoder,
    load_beats_state_dict,
)

TABLE = "encoder.layers.{}.self_attn.relative_attention_bias.weight"


def released_cfg() -> dict:
    """A tiny cfg dict the way the released file spells it (the reference's field names), plus one key
    our config does not know."""
    return {
        "encoder_layers": 2, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 48, "encoder_attention_heads": 4,
        "activation_fn": "gelu", "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "encoder_layerdrop": 0.05, "dropout_input": 0.0, "layer_norm_first": False, "conv_bias": False,
        "conv_pos": 16, "conv_pos_groups": 4, "relative_position_embedding": True, "num_buckets": 32,
        "max_distance": 64, "gru_rel_pos": True, "deep_norm": True, "input_patch_size": 16,
        "layer_wise_gradient_decay_ratio": 0.6, "embed_dim": 24, "finetuned_model": True,
        "predictor_dropout": 0.0, "predictor_class": 5, "label_rate": 50,
    }


@pytest.fixture()
def released(tmp_path):
    """(path, source model, raw state) of a fake released checkpoint with the tied table stored once."""
    torch.manual_seed(0)
    model = BEATsEncoder(BEATsConfig.from_dict(released_cfg())).eval()
    state = model.state_dict()
    for i in range(1, 2):
        state[TABLE.format(i)] = state[TABLE.format(0)]  # the same tensor, as torch.save of a tied module
    path = tmp_path / "BEATs_iter3_plus_AS2M.pt"
    torch.save({"cfg": released_cfg(), "model": state}, path)
    return path, model, state


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_released_layout_round_trip(released):
    path, model, state = released
    cfg, loaded = load_beats_state_dict(path)
    assert cfg.to_dict() == released_cfg()
    assert cfg.extra == {"label_rate": 50}
    _assert_same(loaded, state)
    fresh = BEATsEncoder(cfg).eval()
    fresh.load_state_dict(loaded, strict=True)
    fbank = torch.randn(2, 100, 128)
    with torch.no_grad():
        assert torch.equal(fresh(fbank)[0], model(fbank)[0])


def test_legacy_non_zip_file_loads(released, tmp_path):
    _, _, state = released
    path = tmp_path / "legacy.pt"
    torch.save({"cfg": released_cfg(), "model": state}, path, _use_new_zipfile_serialization=False)
    _, loaded = load_beats_state_dict(path)
    _assert_same(loaded, state)


class _Payload:
    """Unpickling this would create a file: the loader must never get that far."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["cfg", "model", "tensor"])
def test_pickled_objects_are_refused_without_running_them(released, tmp_path, where):
    _, _, state = released
    marker = tmp_path / "executed"
    payload = _Payload(str(marker))
    cfg, model = released_cfg(), dict(state)
    if where == "cfg":
        cfg["activation_fn"] = payload
    elif where == "model":
        model = payload
    else:
        model["encoder.layer_norm.weight"] = payload
    path = tmp_path / "evil.pt"
    torch.save({"cfg": cfg, "model": model}, path)
    with pytest.raises(CheckpointError, match="weights_only=True") as info:
        load_beats_state_dict(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def _save(tmp_path, cfg: dict, state: dict, name: str = "ckpt.pt"):
    path = tmp_path / name
    torch.save({"cfg": cfg, "model": state}, path)
    return path


def test_missing_unexpected_and_misshaped_tensors_are_listed(released, tmp_path):
    _, _, state = released
    bad = dict(state)
    del bad["encoder.layers.1.fc1.weight"]
    bad["encoder.extra_table"] = torch.zeros(3)
    bad["predictor.weight"] = torch.zeros(6, 32)
    path = _save(tmp_path, released_cfg(), bad)
    with pytest.raises(CheckpointError) as info:
        load_beats_state_dict(path)
    message = str(info.value)
    assert str(path) in message
    assert "missing tensors (1): encoder.layers.1.fc1.weight" in message
    assert "unexpected tensors (1): encoder.extra_table" in message
    assert "predictor.weight: checkpoint [6, 32] vs model [5, 32]" in message


def test_differing_relative_tables_are_refused(released, tmp_path):
    _, _, state = released
    bad = dict(state)
    bad[TABLE.format(1)] = state[TABLE.format(0)] + 1
    with pytest.raises(CheckpointError, match="relative position tables differ"):
        load_beats_state_dict(_save(tmp_path, released_cfg(), bad))


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("plain_state_dict", "released layout"),
        ("list", "released layout"),
        ("bad_cfg_value", "unsupported BEATs cfg"),
        ("bad_cfg_key_type", "bad BEATs cfg"),
    ],
)
def test_malformed_files_are_refused(released, tmp_path, content, fragment):
    _, _, state = released
    path = tmp_path / f"{content}.pt"
    if content == "plain_state_dict":
        torch.save(dict(state), path)
    elif content == "list":
        torch.save([1, 2], path)
    elif content == "bad_cfg_value":
        torch.save({"cfg": {**released_cfg(), "activation_fn": "glu"}, "model": state}, path)
    else:
        torch.save({"cfg": {**released_cfg(), 3: "x"}, "model": state}, path)
    with pytest.raises(CheckpointError, match=fragment):
        load_beats_state_dict(path)


def test_unreadable_and_absent_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\xef\xbb\xbfnot a checkpoint")
    with pytest.raises(CheckpointError, match="refused or unreadable"):
        load_beats_state_dict(junk)
    with pytest.raises(CheckpointError, match="file not found"):
        load_beats_state_dict(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_beats_state_dict(tmp_path)


def test_conversion_to_safetensors_round_trip(released, tmp_path):
    path, model, state = released
    dst = convert_beats_checkpoint(path, tmp_path / "out" / "beats.safetensors")
    sidecar = dst.with_suffix(".json")
    assert dst.is_file() and sidecar.is_file()
    assert json.loads(sidecar.read_text()) == released_cfg()
    cfg, loaded = load_beats_state_dict(dst)
    assert cfg.to_dict() == released_cfg()
    _assert_same(loaded, state)

    os.remove(sidecar)  # the config also travels in the file's metadata
    cfg2, loaded2 = load_beats_state_dict(dst)
    assert cfg2 == cfg
    _assert_same(loaded2, state)


def test_safetensors_without_config_or_damaged_is_refused(released, tmp_path):
    from safetensors.torch import save_file

    _, _, state = released
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.clone() for k, v in state.items()}, str(bare))
    with pytest.raises(CheckpointError, match="bare.json"):
        load_beats_state_dict(bare)
    (tmp_path / "bare.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_beats_state_dict(bare)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(bare.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_beats_state_dict(broken)


def test_load_beats_encoder_is_frozen_in_eval_mode_and_dtype(released):
    path, model, _ = released
    enc = load_beats_encoder(path, dtype=torch.bfloat16)
    assert not enc.training
    assert all(not p.requires_grad for p in enc.parameters())
    assert enc.dtype == torch.bfloat16
    enc32 = load_beats_encoder(path)
    fbank = torch.randn(1, 64, 128)
    with torch.no_grad():
        assert torch.equal(enc32(fbank)[0], model(fbank)[0])
