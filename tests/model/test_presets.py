"""Presets on a tiny random Qwen2.5-Omni thinker (fp32): for each of lco-omni, e5-omni and omni-embed-nemotron and
each modality it embeds, WaveEncoder's embedding equals a reference built from that model's published inference
path: the token sequence written out from the model card's template (compared id for id), run through transformers'
Qwen2_5OmniThinkerForConditionalGeneration with output_hidden_states=True, then the model's pooling (LCO:
hidden_states[-1][:, -1]; e5-omni: last token after the appended <|endoftext|>; Nemotron: a bidirectional mask on
the language model and the mean of hidden_states[-1] over the sequence). Also preset selection, detection, errors,
and batch/padding invariance of bidirectional + mean pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import wave_reference as ref
from tiny_checkpoints import make_tiny_checkpoint

from wave_rt import Audio, AudioVisual, Text, Video
from wave_rt.embed.encoder import WaveEncoder
from wave_rt.errors import CheckpointError, UnsupportedItemError
from wave_rt.model.embedder_presets import PRESETS, detect_preset, get_preset

TOL = 1e-5
CHAT_OPEN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
CHAT_CLOSE = "<|im_end|>\n<|im_start|>assistant\n"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def thinker_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("thinker"), recipe="last_token", use_beats=False, seed=5)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    from media_factory import write_video

    rng = np.random.default_rng(1)
    wav = (0.3 * rng.standard_normal(int(1.7 * 16000))).astype(np.float32)
    frames = rng.integers(0, 255, size=(4, 56, 56, 3), dtype=np.uint8)
    av = tmp_path_factory.mktemp("av") / "clip.mp4"
    write_video(av, np.repeat(frames, 5, axis=0), 10, audio=(0.3 * rng.standard_normal(2 * 44100)).astype(np.float32))
    return {"text": "a cat sits on the mat", "audio": Audio(wav, sample_rate=16000), "video": Video(frames, fps=2.0),
            "av": AudioVisual(str(av))}


# The model cards' templates, written out here independently of wave_rt's recipes ({m} = the media block).
CARD_TEMPLATES = {
    "lco-omni": {  # LCO-Embedding README: chat template + generation prompt; audio/video wording by analogy
        "text": CHAT_OPEN + "{t}\nSummarize the above text in one word:" + CHAT_CLOSE,
        "audio": CHAT_OPEN + "{m}\nSummarize the above audio in one word:" + CHAT_CLOSE,
        "video": CHAT_OPEN + "{m}\nSummarize the above video in one word:" + CHAT_CLOSE,
    },
    # e5-omni card: apply_chat_template(message, add_generation_prompt=True) + "<|endoftext|>"; passages and media
    # documents carry no prefix
    "e5-omni": {"text": CHAT_OPEN + "{t}" + CHAT_CLOSE + "<|endoftext|>",
                "audio": CHAT_OPEN + "{m}" + CHAT_CLOSE + "<|endoftext|>",
                "video": CHAT_OPEN + "{m}" + CHAT_CLOSE + "<|endoftext|>"},
    # Omni-Embed-Nemotron card: apply_chat_template(documents, add_generation_prompt=False); "passage: " text
    # ... and a document's video and audio as two items in that order, use_audio_in_video=False (not interleaved)
    "omni-embed-nemotron": {"text": CHAT_OPEN + "passage: {t}<|im_end|>\n", "audio": CHAT_OPEN + "{m}<|im_end|>\n",
                            "video": CHAT_OPEN + "{m}<|im_end|>\n", "av": CHAT_OPEN + "{m}<|im_end|>\n"},
}


def _reference_ids(tok, template: str, text: str, media_block: str) -> list[int]:
    return tok.encode(template.format(t=text, m=media_block), add_special_tokens=False).ids


def _reference_embedding(hf, cfg, preset: str, input_ids: torch.Tensor, kw: dict) -> torch.Tensor:
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        if preset != "omni-embed-nemotron":
            out = hf(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **kw)
            return out.hidden_states[-1][0, -1]
        # Bidirectional: the thinker's own embeddings, features and RoPE index, then the language model under a
        # 4-D all-visible mask (transformers passes a 4-D mask through unchanged), mean over hidden_states[-1].
        model = ref.thinker_inner(hf)
        embeds = model.get_input_embeddings()(input_ids)
        if "input_features" in kw:
            audio = model.get_audio_features(kw["input_features"], kw["feature_attention_mask"]).last_hidden_state
            embeds = embeds.masked_scatter((input_ids == cfg.token_id("audio")).unsqueeze(-1), audio)
        if "pixel_values_videos" in kw:
            video = torch.cat(model.get_video_features(kw["pixel_values_videos"], kw["video_grid_thw"]).pooler_output)
            embeds = embeds.masked_scatter((input_ids == cfg.token_id("video")).unsqueeze(-1), video)
        audio_lens = kw["feature_attention_mask"].sum(-1) if "feature_attention_mask" in kw else None
        pos, _ = model.get_rope_index(input_ids, None, kw.get("video_grid_thw"), mask, False, audio_lens,
                                      kw.get("video_second_per_grid"))
        T = input_ids.shape[1]
        full = torch.ones(1, 1, T, T, dtype=torch.bool)
        out = ref.thinker_lm(hf)(inputs_embeds=embeds, attention_mask=full, position_ids=pos,
                                   output_hidden_states=True)
        return out.hidden_states[-1][0].mean(dim=0)


def _case(enc, preset: str, modality: str, item):
    """(reference input_ids, reference kwargs) for one item, the media block sized from our prepared inputs."""
    tok = enc.processor.tokenizer
    prepared = enc.prepare(item).inputs
    template = CARD_TEMPLATES[preset][modality]
    if modality == "text":
        return _reference_ids(tok, template, item, ""), {}, prepared
    if modality == "audio":
        seg = prepared.audio[0]
        block = "<|audio_bos|>" + "<|AUDIO|>" * seg.tokens + "<|audio_eos|>"
        kw = dict(input_features=seg.mel[None], feature_attention_mask=torch.ones(1, seg.mel_len, dtype=torch.long))
        return _reference_ids(tok, template, "", block), kw, prepared
    t, h, w = prepared.grid_thw
    block = "<|vision_bos|>" + "<|VIDEO|>" * (t * (h // 2) * (w // 2)) + "<|vision_eos|>"
    kw = dict(pixel_values_videos=prepared.pixel_values, video_grid_thw=torch.tensor([[t, h, w]]),
              video_second_per_grid=torch.tensor([prepared.second_per_grid]))
    if modality == "av":  # the video item, then the audio item
        seg = prepared.audio[0]
        block += "<|audio_bos|>" + "<|AUDIO|>" * seg.tokens + "<|audio_eos|>"
        kw.update(input_features=seg.mel[None], feature_attention_mask=torch.ones(1, seg.mel_len, dtype=torch.long))
    return _reference_ids(tok, template, "", block), kw, prepared


@pytest.mark.parametrize("preset", ["lco-omni", "e5-omni", "omni-embed-nemotron"])
def test_preset_equals_published_inference_path(thinker_dir, items, preset):
    enc = WaveEncoder.from_pretrained(thinker_dir, device="cpu", dtype="fp32", preset=preset)
    assert enc.config.preset == preset and enc.config.recipe.name == get_preset(preset).recipe_name
    hf = ref.hf_thinker(enc.model)
    for modality in get_preset(preset).modalities:
        ids, kw, prepared = _case(enc, preset, modality, items[modality])
        assert prepared.input_ids.tolist() == ids, (preset, modality)
        expected = _reference_embedding(hf, enc.config, preset, torch.tensor([ids]), kw)
        got = enc.encode([items[modality]], normalize=False, convert_to="torch")[0]
        assert rel(got, expected) <= TOL, (preset, modality, rel(got, expected))


def test_bidirectional_mean_is_batch_and_padding_invariant(thinker_dir, items):
    enc = WaveEncoder.from_pretrained(thinker_dir, device="cpu", dtype="fp32", preset="omni-embed-nemotron")
    batch = [items["video"], items["text"], items["audio"], "short", Text("a much longer query text here", side="query")]
    together = enc.encode(batch, normalize=False, convert_to="torch", batch_size=len(batch))
    lengths = {enc.prepare(b).num_tokens for b in batch}
    assert len(lengths) == len(batch), "every row must have its own length so the batch is padded"
    for k, b in enumerate(batch):
        alone = enc.encode([b], normalize=False, convert_to="torch")[0]
        assert rel(together[k], alone) <= TOL, (k, rel(together[k], alone))
    # bidirectional really differs from causal (the option is not a no-op)
    causal = WaveEncoder.from_pretrained(thinker_dir, device="cpu", dtype="fp32", preset="e5-omni")
    assert rel(together[1], causal.encode(["a cat sits on the mat"], normalize=False, convert_to="torch")[0]) > 1e-3


def test_mean_pooling_excludes_padding_rows():
    from wave_rt.model.pooling import attention_mask_4d, pool_states

    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    h_poisoned = h.clone()
    h_poisoned[0, :2] = 1e6
    assert torch.allclose(pool_states(h_poisoned, mask, "mean")[0], h[0, 2:].mean(0))
    m = attention_mask_4d(mask, "bidirectional")
    assert m[0, 0, 2:, :2].sum() == 0 and m[0, 0, 2:, 2:].all() and m[1].all()
    c = attention_mask_4d(mask, "causal")
    assert not c[1, 0, 0, 1] and c[1, 0, 4, 0]


def test_detection_and_selection(tmp_path):
    wave = make_tiny_checkpoint(tmp_path / "wave", recipe="last_layer", use_beats=True)
    vela = make_tiny_checkpoint(tmp_path / "vela", recipe="last_token", use_beats=False, backbone="qwen2_audio")
    plain = make_tiny_checkpoint(tmp_path / "plain", recipe="last_token", use_beats=False)
    w = WaveEncoder.from_pretrained(wave, device="cpu", dtype="fp32")
    assert w.config.preset == "wave" and w.config.recipe.name == "last_layer"  # detection keeps the config's variant
    assert WaveEncoder.from_pretrained(vela, device="cpu", dtype="fp32").config.preset == "vela"
    assert WaveEncoder.from_pretrained(plain, device="cpu", dtype="fp32").config.preset is None
    assert detect_preset({"model_type": "qwen2_5_omni_thinker"}) is None
    assert detect_preset({"model_type": "midashenglm"}, ["eos_proj.weight"]) == "alm2vec"
    assert detect_preset({"model_type": "midashenglm"}, ["decoder.model.norm.weight"]) is None
    with pytest.raises(CheckpointError, match="runs on qwen2_audio"):
        WaveEncoder.from_pretrained(plain, device="cpu", dtype="fp32", preset="vela")
    with pytest.raises(CheckpointError, match="unknown preset"):
        WaveEncoder.from_pretrained(plain, device="cpu", dtype="fp32", preset="nope")
    # Omni-Embed-Nemotron's config.json names its own class (NVOmniEmbedConfig, a thinker config): it loads as a
    # thinker and selects its preset
    import json
    import shutil

    nemo = tmp_path / "nemotron"
    shutil.copytree(plain, nemo)
    cfg = json.loads((nemo / "config.json").read_text())
    cfg["model_type"] = "nvomniembed"
    (nemo / "config.json").write_text(json.dumps(cfg))
    n = WaveEncoder.from_pretrained(nemo, device="cpu", dtype="fp32")
    assert n.config.preset == "omni-embed-nemotron" and n.config.recipe.name == "mean_bidirectional"


def test_saved_preset_round_trips(thinker_dir, tmp_path):
    enc = WaveEncoder.from_pretrained(thinker_dir, device="cpu", dtype="fp32", preset="lco-omni")
    out = enc.save_pretrained(tmp_path / "saved")
    again = WaveEncoder.from_pretrained(out, device="cpu", dtype="fp32")
    assert again.config.preset == "lco-omni" and again.config.recipe.name == "lco_omni"
    a = enc.encode(["hello there"], convert_to="torch")
    b = again.encode(["hello there"], convert_to="torch")
    assert torch.equal(a, b)


def test_preset_refuses_modalities_its_model_does_not_embed(thinker_dir):
    enc = WaveEncoder.from_pretrained(thinker_dir, device="cpu", dtype="fp32", preset="lco-omni")
    with pytest.raises(UnsupportedItemError, match="lco-omni"):
        enc.prepare(AudioVisual("clip.mp4"))


def test_every_preset_documents_its_source():
    assert set(PRESETS) == {"wave", "vela", "alm2vec", "lco-omni", "e5-omni", "omni-embed-nemotron"}
    for p in PRESETS.values():
        assert p.source and "\n" not in p.source
        assert p.recipe.name == p.recipe_name


def test_wave_preset_equals_reference_path(tmp_path, items):
    """WAVE through WaveEncoder (detected preset): text target and BEATs dual audio against the reference path of
    test_model_reference (thinker hidden states + WAVE's merge + the fusion head); prompt ids written out here."""
    import test_model_reference as tmr

    wave_dir = make_tiny_checkpoint(tmp_path / "wave", recipe="all_layer", use_beats=True, seed=2)
    enc = WaveEncoder.from_pretrained(wave_dir, device="cpu", dtype="fp32")
    assert enc.config.preset == "wave"
    hf = ref.hf_thinker(enc.model)
    tok = enc.processor.tokenizer
    text = items["text"]
    t_item = enc.prepare(text).inputs
    assert t_item.input_ids.tolist() == tok.encode(text + "<|im_end|>", add_special_tokens=False).ids
    a_item = enc.prepare(items["audio"]).inputs
    seg = a_item.audio[0]
    block = "<|audio_bos|>" + "<|AUDIO|>" * (2 * seg.tokens) + "<|audio_eos|>"  # Whisper/BEATs interleaved: doubled
    assert a_item.input_ids.tolist() == tok.encode(block + "Please describe the audio.<|im_end|>",
                                                   add_special_tokens=False).ids
    cases = [
        tmr.Case("text", t_item, {}),
        tmr.Case("audio", a_item, dict(input_features=seg.mel[None],
                                       feature_attention_mask=torch.ones(1, seg.mel_len, dtype=torch.long)),
                 fbanks=[seg.fbank], n_segments=[seg.tokens]),
    ]
    got = enc.encode([text, items["audio"]], normalize=False, convert_to="torch")
    for k, case in enumerate(cases):
        expected = tmr.reference_embedding(enc.model, hf, case)[0]
        assert rel(got[k], expected) <= TOL, (case.name, rel(got[k], expected))


def test_vela_preset_equals_qwen2_audio_reference(tmp_path, items):
    vela_dir = make_tiny_checkpoint(tmp_path / "vela", recipe="last_token", use_beats=False, backbone="qwen2_audio")
    enc = WaveEncoder.from_pretrained(vela_dir, device="cpu", dtype="fp32", preset="vela")
    hf = ref.hf_qwen2_audio(enc.model)
    tok = enc.processor.tokenizer
    text = items["text"]
    a_item = enc.prepare(items["audio"]).inputs
    seg = a_item.audio[0]
    block = "<|audio_bos|>" + "<|AUDIO|>" * seg.tokens + "<|audio_eos|>"
    # Vela's prompts (DESIGN.md section 1): "{text}\nSummarize the above sentence in one word:" and
    # "<audio>Summarize the caption of the audio in one word:"
    refs = [
        (text, tok.encode(text + "\nSummarize the above sentence in one word:", add_special_tokens=False).ids, {}),
        (items["audio"], tok.encode(block + "Summarize the caption of the audio in one word:",
                                    add_special_tokens=False).ids,
         dict(input_features=seg.mel[None],
              feature_attention_mask=(torch.arange(seg.mel.shape[-1]) < seg.mel_len).long()[None])),
    ]
    got = enc.encode([r[0] for r in refs], normalize=False, convert_to="torch")
    for k, (item, ids, kw) in enumerate(refs):
        assert enc.prepare(item).inputs.input_ids.tolist() == ids
        with torch.no_grad():
            out = hf(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                     output_hidden_states=True, **kw)
        expected = out.hidden_states[-1][0, -1]
        assert rel(got[k], expected) <= TOL, (k, rel(got[k], expected))
