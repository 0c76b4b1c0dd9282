"""Checkpoint loading: every accepted layout loads to the same weights; every bad checkpoint gives one
clear CheckpointError; nothing is ever unpickled beyond plain tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import make_tiny_checkpoint

from wave_rt.embed.encoder import WaveEncoder
from wave_rt.errors import CheckpointError
from wave_rt.model.loading import load_wave_model

TEXTS = ["a dog barks", "rain on a tin roof", "x"]


@pytest.fixture(scope="module")
def wave_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("wave"), recipe="all_layer", use_beats=True, seed=11)


@pytest.fixture(scope="module")
def thinker_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("thinker"), recipe="last_token", use_beats=False, seed=12)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _rewrite(path: Path, fn) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    save_file(fn(tensors), str(path / "model.safetensors"))


def test_save_load_round_trip_is_bit_identical(wave_dir, tmp_path):
    enc = WaveEncoder.from_pretrained(wave_dir)
    enc.save_pretrained(tmp_path / "again")
    enc2 = WaveEncoder.from_pretrained(tmp_path / "again")
    assert _same_weights(enc.model, enc2.model)
    assert enc.fingerprint == enc2.fingerprint
    assert (enc.encode(TEXTS) == enc2.encode(TEXTS)).all()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (wave_dir / "model.safetensors").read_bytes()


def test_beats_from_separate_pt_file_and_explicit_path(tmp_path):
    inside = make_tiny_checkpoint(tmp_path / "inside", use_beats=True, seed=5)
    beside = make_tiny_checkpoint(tmp_path / "beside", use_beats=True, seed=5, beats_in_safetensors=False)
    assert not any(k.startswith("beats.") for k in load_file(str(beside / "model.safetensors")))
    m_in, _ = load_wave_model(inside)
    m_beside, _ = load_wave_model(beside)
    assert _same_weights(m_in, m_beside)
    moved = tmp_path / "elsewhere.pt"
    os.replace(beside / "BEATs_iter3_plus_AS2M.pt", moved)
    with pytest.raises(CheckpointError, match="BEATs"):
        load_wave_model(beside)
    m_explicit, _ = load_wave_model(beside, beats_path=moved)
    assert _same_weights(m_in, m_explicit)


def test_transformers5_names_and_full_omni_layout(thinker_dir, tmp_path):
    base, _ = load_wave_model(thinker_dir)
    v5 = _copy(thinker_dir, tmp_path / "v5")

    def to_v5(t):
        out = {}
        for k, v in t.items():
            if k.startswith("model."):
                out["model.language_model." + k[6:]] = v
            else:
                out["model." + k] = v
        out["lm_head.weight"] = torch.zeros(4, 4)  # never loaded, never shape-checked
        return out

    _rewrite(v5, to_v5)
    m5, _ = load_wave_model(v5)
    assert _same_weights(base, m5)

    full = _copy(thinker_dir, tmp_path / "full")
    _rewrite(full, lambda t: {**{"thinker." + k: v for k, v in t.items()}, "talker.codec_head.weight": torch.zeros(2)})
    cfg = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni", "thinker_config": cfg}))
    mf, _ = load_wave_model(full)
    assert _same_weights(base, mf)


def test_sharded_checkpoint_with_index(wave_dir, tmp_path):
    from wave_rt.model.loading import save_wave_model

    model, _ = load_wave_model(wave_dir)
    save_wave_model(model, tmp_path / "sharded", max_shard_bytes=200_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    again, _ = load_wave_model(tmp_path / "sharded")
    assert _same_weights(model, again)


def test_qwen2_audio_checkpoint_layouts(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "qa", recipe="last_token", use_beats=False, backbone="qwen2_audio", seed=2)
    keys = load_file(str(d / "model.safetensors")).keys()
    assert any(k.startswith("language_model.model.") for k in keys)  # written in the released 4.x layout
    base, cfg = load_wave_model(d)
    assert cfg.backbone == "qwen2_audio" and cfg.recipe.name == "last_token"
    _rewrite(d, lambda t: {("model." + k[len("language_model."):].replace("model.", "language_model.", 1)
                            if k.startswith("language_model.") else "model." + k): v for k, v in t.items()})
    assert any(k.startswith("model.language_model.") for k in load_file(str(d / "model.safetensors")))
    m5, _ = load_wave_model(d)
    assert _same_weights(base, m5)


@pytest.mark.parametrize("damage, message", [
    ("missing", r"missing tensors \(1\): model\.norm\.weight"),
    ("shape", r"mis-shaped tensors \(1\): classify_linear\.2\.weight: checkpoint \[3, 3\]"),
    ("unexpected", r"unexpected tensors \(1\): foo\.bar"),
])
def test_bad_tensors_are_listed(wave_dir, tmp_path, damage, message):
    bad = _copy(wave_dir, tmp_path / damage)

    def edit(t):
        if damage == "missing":
            del t["model.norm.weight"]
        elif damage == "shape":
            t["classify_linear.2.weight"] = torch.zeros(3, 3)
        else:
            t["foo.bar"] = torch.zeros(1)
        return t

    _rewrite(bad, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        load_wave_model(bad)
    assert str(bad) in str(info.value)


def test_all_problems_in_one_error(wave_dir, tmp_path):
    bad = _copy(wave_dir, tmp_path / "many")

    def edit(t):
        del t["model.norm.weight"]
        t["visual.merger.ln_q.weight"] = torch.zeros(7)
        t["zzz"] = torch.zeros(1)
        return t

    _rewrite(bad, edit)
    with pytest.raises(CheckpointError) as info:
        load_wave_model(bad)
    text = str(info.value)
    assert "model.norm.weight" in text and "visual.merger.ln_q.weight" in text and "zzz" in text


def test_wrong_model_type_and_unreadable_files(wave_dir, tmp_path):
    wrong = _copy(wave_dir, tmp_path / "wrong")
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["model_type"] = "llama"
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        load_wave_model(wrong)

    garbled = _copy(wave_dir, tmp_path / "garbled")
    (garbled / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is unreadable"):
        load_wave_model(garbled)

    truncated = _copy(wave_dir, tmp_path / "truncated")
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_wave_model(truncated)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((wave_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_wave_model(empty)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_wave_model(tmp_path / "does-not-exist")


class _Payload:
    """Unpickling this would create a file: proof that a loader executed a checkpoint's code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("where", ["pytorch_model.bin", "BEATs_iter3_plus_AS2M.pt"])
def test_loading_never_unpickles_objects(thinker_dir, wave_dir, tmp_path, where):
    marker = tmp_path / "pwned"
    if where == "pytorch_model.bin":
        d = _copy(thinker_dir, tmp_path / "bin")
        (d / "model.safetensors").unlink()
        torch.save({"model.norm.weight": _Payload(str(marker))}, d / where)
        with pytest.raises(CheckpointError, match="weights_only=True"):
            load_wave_model(d)
    else:
        d = make_tiny_checkpoint(tmp_path / "beats", use_beats=True, beats_in_safetensors=False)
        torch.save({"cfg": {}, "model": {"x": _Payload(str(marker))}}, d / where)
        with pytest.raises(CheckpointError):
            load_wave_model(d)
    assert not marker.exists(), "a pickled object was executed"


def test_plain_bin_checkpoint_loads_with_weights_only(thinker_dir, tmp_path):
    d = _copy(thinker_dir, tmp_path / "plainbin")
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    a, _ = load_wave_model(thinker_dir)
    b, _ = load_wave_model(d)
    assert _same_weights(a, b)


def test_released_wave_layout_written_by_transformers_4_51(tmp_path):
    """config.json as the reference code writes it (4.51: rope_scaling, in_chans, the authors' absolute
    beats_path, no wave_rt section), an lm_head in the safetensors, BEATs beside them as a .pt."""
    src = make_tiny_checkpoint(tmp_path / "ours", recipe="all_layer", use_beats=True, seed=8, beats_in_safetensors=False)
    ours, _ = load_wave_model(src)
    d = _copy(src, tmp_path / "released")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["wave_rt"]
    text = cfg["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_scaling"] = {"mrope_section": rope["mrope_section"], "rope_type": "default", "type": "default"}
    text["rope_theta"] = rope["rope_theta"]
    cfg["vision_config"].update(in_chans=3, embed_dim=cfg["vision_config"]["hidden_size"], spatial_patch_size=14)
    cfg["audio_config"]["beats_path"] = "/mnt/sh/mmvision/home/someone/BEATs_iter3_plus_AS2M.pt"
    cfg["transformers_version"] = "4.51.3"
    (d / "config.json").write_text(json.dumps(cfg))
    _rewrite(d, lambda t: {**t, "lm_head.weight": torch.zeros(cfg["text_config"]["vocab_size"], 64)})
    released, config = load_wave_model(d)
    assert config.recipe.name == "all_layer" and config.use_beats
    assert config.text_config.rope_parameters["mrope_section"] == rope["mrope_section"]
    assert _same_weights(ours, released)


@pytest.mark.parametrize(("saved", "asked"), [("bfloat16", torch.float32), ("float32", torch.bfloat16)])
def test_the_asked_dtype_wins_over_the_sub_configs_dtype(wave_dir, tmp_path, saved, asked):
    # transformers writes a dtype into every sub-config it saves; its _from_config built the decoder and towers
    # in that dtype over the one asked for (fp32 asked, bf16 built: 7e-3 off; bf16 asked, fp32 built: 2x memory)
    d = _copy(wave_dir, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    for sub in ("text_config", "audio_config", "vision_config"):
        cfg[sub]["torch_dtype"] = saved
    (d / "config.json").write_text(json.dumps(cfg))
    from wave_rt.config import WaveConfig
    from wave_rt.model.wave_model import WaveModel

    model, _ = load_wave_model(d, dtype=asked)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {asked}
    config = WaveConfig.from_pretrained(d)
    before = config.fingerprint()
    WaveModel.build(config, dtype=asked, init="empty")
    assert config.fingerprint() == before  # building never rewrites the config that archives are matched by
    if asked == torch.float32:
        assert _same_weights(model, load_wave_model(wave_dir, dtype=torch.float32)[0])


def test_an_explicit_beats_path_wins_over_the_safetensors_copy(wave_dir, tmp_path):
    from wave_rt.model.beats import load_beats_state_dict

    other = make_tiny_checkpoint(tmp_path / "other", recipe="all_layer", use_beats=True, seed=2,
                                 beats_in_safetensors=False) / "BEATs_iter3_plus_AS2M.pt"
    model, _ = load_wave_model(wave_dir, beats_path=other)
    _, state = load_beats_state_dict(other)
    assert torch.equal(model.beats.state_dict()["patch_embedding.weight"], state["patch_embedding.weight"])
    with pytest.raises(CheckpointError, match="does not exist"):
        load_wave_model(wave_dir, beats_path=tmp_path / "nonexistent.pt")


@pytest.mark.parametrize("override", [{"recipe": "last_token"}, {"preset": "lco-omni"}])
def test_a_recipe_override_leaves_the_unused_head_unread(wave_dir, override):
    # WAVE's fusion MLP was refused as "unexpected tensors" under recipe="last_token": the README's override failed
    enc = WaveEncoder.from_pretrained(wave_dir, **override)
    assert (enc.config.recipe.name == "last_token") if "recipe" in override else (enc.config.preset == "lco-omni")
    if "recipe" in override:  # text targets take the final-layer last token under both recipes
        import numpy as np

        np.testing.assert_allclose(enc.encode(TEXTS), WaveEncoder.from_pretrained(wave_dir).encode(TEXTS), atol=1e-6)
    with pytest.raises(CheckpointError, match="mis-shaped"):  # another head of the same name is still refused
        load_wave_model(wave_dir, recipe="last_layer")


def test_an_index_naming_a_tensor_its_shard_lacks_is_a_checkpoint_error(wave_dir, tmp_path):
    from wave_rt.model.loading import save_wave_model

    model, _ = load_wave_model(wave_dir)
    out = save_wave_model(model, tmp_path / "sharded", tokenizer_dir=wave_dir, max_shard_bytes=200_000)
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{shard.name}: cannot read tensor {name}"):
        load_wave_model(out)
