"""MiDashengLM (ALM2Vec's backbone): a tiny checkpoint in the released key layout loads (with clear errors for
missing/extra tensors), and the ALM2Vec embedding through WaveEncoder equals a reference built from MiDashengLM's
published inference path: the dasheng package's encoder, the frame-stacking projector as vLLM/SGLang restate
it, transformers' Qwen2Model with output_hidden_states=True, the hidden state at the appended EOS, the projection."""

from __future__ import annotations

import json

import dasheng_reference as dref
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import build_tiny_tokenizer, tiny_midashenglm_config_dict

from wave_rt import Audio, Text
from wave_rt.config import WaveConfig
from wave_rt.embed.encoder import WaveEncoder
from wave_rt.errors import CheckpointError
from wave_rt.media.features_dasheng import dasheng_frontend_buffers, dasheng_log_mel
from wave_rt.model.dasheng import DashengConfig
from wave_rt.model.loading import load_wave_model, save_wave_model
from wave_rt.model.wave_model import WaveModel

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _released_checkpoint(out, *, eos_proj: bool, seed: int = 0):
    """Write config.json exactly as MiDashengLM's (no wave_rt section) and safetensors in the released names,
    including the front-end buffers and decoder.lm_head.weight, plus ALM2Vec's eos_proj.* when asked."""
    ids = build_tiny_tokenizer(out)
    data = tiny_midashenglm_config_dict(ids)
    model = WaveModel.build(WaveConfig.from_dict(data), seed=seed)
    window, fb = dasheng_frontend_buffers()
    with torch.no_grad():
        model.audio_encoder.front_end[0].spectrogram.window.copy_(window)
        model.audio_encoder.front_end[0].mel_scale.fb.copy_(fb)
        bn = model.audio_encoder.init_bn
        bn.running_mean.normal_(-40, 10)
        bn.running_var.uniform_(30, 80)
    save_wave_model(model, out)
    tensors = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed + 1)
    tensors["decoder.lm_head.weight"] = torch.randn(320, 64, generator=gen)
    if eos_proj:
        tensors["eos_proj.weight"] = torch.randn(48, 64, generator=gen) / 8
        tensors["eos_proj.bias"] = torch.randn(48, generator=gen) / 8
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(data))
    return ids, tensors


def test_saved_names_are_the_released_layout(tmp_path):
    _, tensors = _released_checkpoint(tmp_path, eos_proj=False)
    prefixes = {k.split(".")[0] for k in tensors}
    assert prefixes == {"audio_encoder", "audio_projector", "decoder"}
    for key in ("audio_encoder.front_end.0.mel_scale.fb", "audio_encoder.front_end.0.spectrogram.window",
                "audio_encoder.init_bn.running_var", "audio_encoder.patch_embed.proj.weight",
                "audio_encoder.time_pos_embed", "audio_encoder.freq_pos_embed", "audio_encoder.blocks.1.attn.qkv.weight",
                "audio_encoder.blocks.0.ls1.gamma", "audio_encoder.blocks.0.mlp.fc2.bias", "audio_encoder.norm.weight",
                "audio_projector.net.0.weight", "audio_projector.net.2.weight",
                "decoder.model.embed_tokens.weight", "decoder.model.layers.3.self_attn.q_proj.bias",
                "decoder.model.norm.weight", "decoder.lm_head.weight"):
        assert key in tensors, key


def test_released_layout_loads_and_round_trips(tmp_path):
    _, tensors = _released_checkpoint(tmp_path, eos_proj=False)
    model, config = load_wave_model(tmp_path)
    assert config.backbone == "midashenglm" and config.recipe.name == "last_token"
    assert config.preset is None  # a plain MiDashengLM is not ALM2Vec
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.2.mlp.up_proj.weight"], tensors["decoder.model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(sd["audio_encoder.blocks.1.attn.qkv.weight"], tensors["audio_encoder.blocks.1.attn.qkv.weight"])
    assert not any("lm_head" in k for k in sd)


@pytest.mark.parametrize("edit, words", [
    ("drop:audio_encoder.blocks.1.attn.qkv.weight", ("missing", "audio_encoder.blocks.1.attn.qkv.weight")),
    ("drop:decoder.model.layers.0.self_attn.k_proj.weight", ("missing", "model.layers.0.self_attn.k_proj.weight")),
    ("add:audio_encoder.blocks.7.attn.qkv.weight", ("unexpected", "audio_encoder.blocks.7.attn.qkv.weight")),
    ("add:audio_projector.net.4.weight", ("unexpected", "audio_projector.net.4.weight")),
    ("shape:audio_projector.net.0.weight", ("mis-shaped", "audio_projector.net.0.weight")),
])
def test_missing_extra_misshaped_keys_raise_checkpoint_error(tmp_path, edit, words):
    _, tensors = _released_checkpoint(tmp_path, eos_proj=False)
    action, key = edit.split(":")
    if action == "drop":
        del tensors[key]
    elif action == "add":
        tensors[key] = torch.zeros(3)
    else:
        tensors[key] = torch.zeros(5, 5)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_wave_model(tmp_path)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_optional_buffers_and_bias_free_projector(tmp_path):
    _, tensors = _released_checkpoint(tmp_path, eos_proj=False)
    for k in [k for k in tensors if k.startswith("audio_encoder.front_end.") or k.endswith("num_batches_tracked")]:
        del tensors[k]
    for k in ("audio_projector.net.0.bias", "audio_projector.net.2.bias"):
        del tensors[k]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model, config = load_wave_model(tmp_path)
    assert config.projector_bias is False and model.audio_projector.net[0].bias is None


def _reference_alm2vec(ref_enc, model, ids, wav: np.ndarray | None, text_ids: list[int] | None) -> torch.Tensor:
    """MiDashengLM's published path with ALM2Vec's pooling, restated from vLLM/SGLang midashenglm.py."""
    import transformers

    hf = model.config.hf_config
    qwen = transformers.Qwen2Model(hf.text_config).eval()
    qwen.load_state_dict({k[len("model."):]: v for k, v in model.state_dict().items() if k.startswith("model.")})
    if wav is not None:
        n = wav.size
        n_tokens = max(1, int(1 + n / 160) // 4 // 5)  # calculate_mel_frames_dasheng
        seq = [ids["<|audio_bos|>"]] + [ids["<|AUDIO|>"]] * n_tokens + [ids["<|audio_eos|>"], ids["<|endoftext|>"]]
        mel = dasheng_log_mel(torch.from_numpy(wav))[None]
        enc = dref.reference_tokens(ref_enc, mel, torch.tensor([n]))  # [1, T, D]
        k = hf.subsample_factor
        enc = enc[:, : enc.shape[1] - enc.shape[1] % k]
        stacked = enc.reshape(1, -1, k * enc.shape[-1])
        audio = model.audio_projector.net(stacked)[0, :n_tokens]
    else:
        seq = text_ids + [ids["<|endoftext|>"]]
    input_ids = torch.tensor([seq])
    with torch.no_grad():
        embeds = qwen.embed_tokens(input_ids)
        if wav is not None:
            embeds = embeds.masked_scatter((input_ids == ids["<|AUDIO|>"]).unsqueeze(-1), audio)
        out = qwen(inputs_embeds=embeds, output_hidden_states=True)
        return model.eos_proj(out.hidden_states[-1][0, -1])


def test_alm2vec_equals_midashenglm_reference_path(tmp_path):
    ids, _ = _released_checkpoint(tmp_path, eos_proj=True, seed=3)
    enc = WaveEncoder.from_pretrained(tmp_path, device="cpu", dtype="fp32")
    assert enc.config.preset == "alm2vec" and enc.config.recipe.name == "eos_projection" and enc.dim == 48
    model = enc.model
    cfg = DashengConfig.from_dict(model.config.hf_config.audio_encoder_config)
    ref_enc = dref.reference_encoder(cfg)
    sd = {k[len("audio_encoder."):].replace("init_bn.", "init_bn.1."): v for k, v in model.state_dict().items()
          if k.startswith("audio_encoder.") and ".front_end." not in k}
    ref_enc.load_state_dict(sd, strict=True)  # dasheng's override returns nothing; strict raises on any mismatch

    rng = np.random.default_rng(0)
    wavs = [(0.3 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 43210, 27777)]
    text = "a dog barks twice"
    items = [Audio(w, sample_rate=16000) for w in wavs] + [text]
    ours = enc.encode(items, normalize=False, convert_to="torch")  # one padded batch of all four
    tok = enc.processor.tokenizer
    expected = [_reference_alm2vec(ref_enc, model, ids, w, None) for w in wavs]
    expected.append(_reference_alm2vec(ref_enc, model, ids, None, tok.encode(text, add_special_tokens=False).ids))
    for k, e in enumerate(expected):
        assert rel(ours[k], e) <= TOL, (k, rel(ours[k], e))
        alone = enc.encode([items[k]], normalize=False, convert_to="torch")[0]
        assert rel(alone, e) <= TOL, (k, rel(alone, e))


def test_midashenglm_refuses_video(tmp_path):
    from wave_rt import Video
    from wave_rt.errors import UnsupportedItemError

    _released_checkpoint(tmp_path, eos_proj=True)
    enc = WaveEncoder.from_pretrained(tmp_path, device="cpu", dtype="fp32")
    with pytest.raises(UnsupportedItemError):
        enc.encode([Video(np.zeros((4, 28, 28, 3), dtype=np.uint8), fps=2.0)])
    _ = Text  # Text(side="query") goes through the same template; covered by the processor tests


def test_short_clip_padded_as_midashenglm_does(tmp_path):
    """A 0.1 s clip is zero-padded to 3200 samples (MiDashengLM's processor), not to WAVE's 1 s."""
    ids, _ = _released_checkpoint(tmp_path, eos_proj=True, seed=4)
    enc = WaveEncoder.from_pretrained(tmp_path, device="cpu", dtype="fp32")
    wav = (0.3 * np.random.default_rng(2).standard_normal(1600)).astype(np.float32)
    seg = enc.prepare(Audio(wav, sample_rate=16000)).inputs.audio[0]
    padded = np.pad(wav, (0, 3200 - 1600))
    assert seg.mel_len == 1 + 3200 // 160 and seg.tokens == 1
    assert torch.allclose(seg.mel, dasheng_log_mel(torch.from_numpy(padded)))


def test_alm2vec_save_pretrained_round_trips(tmp_path):
    (tmp_path / "src").mkdir()
    _released_checkpoint(tmp_path / "src", eos_proj=True, seed=5)
    enc = WaveEncoder.from_pretrained(tmp_path / "src", device="cpu", dtype="fp32")
    out = enc.save_pretrained(tmp_path / "saved")
    names = load_file(str(out / "model.safetensors")).keys()
    assert any(k.startswith("decoder.model.") for k in names) and not any(k.startswith("model.") for k in names)
    again = WaveEncoder.from_pretrained(out, device="cpu", dtype="fp32")
    assert again.config.preset == "alm2vec" and again.dim == enc.dim
    wav = (0.3 * np.random.default_rng(3).standard_normal(20000)).astype(np.float32)
    items = [Audio(wav, sample_rate=16000), "a bell rings"]
    assert torch.equal(enc.encode(items, convert_to="torch"), again.encode(items, convert_to="torch"))


def test_packed_alm2vec_forward_reads_nothing_back_and_equals_padded(tmp_path):
    # clip lengths, the kept rows and which chunks need a padding mask are fixed at collation (they were read
    # back from the device: eight syncs per forward on CUDA)
    from test_model_packed import HostSyncSpy

    _released_checkpoint(tmp_path, eos_proj=True, seed=3)
    enc = WaveEncoder.from_pretrained(tmp_path, device="cpu", dtype="fp32")
    rng = np.random.default_rng(1)
    prepared = [enc.prepare(Audio((0.3 * rng.standard_normal(n)).astype(np.float32), sample_rate=16000))
                for n in (16000, 43210, 3200, 27777)] + [enc.prepare("a dog barks twice")]
    assert enc.packed
    batch = enc.stage(prepared)
    with torch.no_grad(), HostSyncSpy() as spy:
        packed = enc.model(batch)
    assert spy.seen == []
    from wave_rt.model.batch import collate

    with torch.no_grad():
        padded = enc.model(collate([p.inputs for p in prepared], enc.pad_token_id))
    for k in range(len(prepared)):
        assert rel(packed[k], padded[k]) <= TOL, k
