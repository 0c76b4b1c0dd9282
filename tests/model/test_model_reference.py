"""Our embedding == the reference formulation (transformers thinker with output_hidden_states=True,
the last token of hidden_states[1:], the same head), for every modality and recipe, on tiny random
fp32 models. Also batch invariance (alone vs inside a left-padded mixed batch)."""

from __future__ import annotations

import pytest
import torch
import wave_reference as ref
from model_signals import noise, qwen2_audio_item
from tiny_checkpoints import tiny_qwen2_audio_config_dict, tiny_thinker_config_dict

from wave_rt.config import WaveConfig
from wave_rt.embed.processor import whisper_tokens
from wave_rt.model.batch import AudioSegmentInputs, ItemInputs, collate
from wave_rt.model.positions import SequenceBuilder, VideoGrid
from wave_rt.model.wave_model import WaveModel

TOL = 1e-5

# (recipe, use_beats): every pooling recipe on the Omni thinker, WAVE with and without BEATs.
OMNI_CASES = [
    ("all_layer", True),
    ("all_layer", False),
    ("last_layer", True),
    ("last_token", False),
    ("eos_projection", False),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def omni_model(ids, recipe: str, use_beats: bool, seed: int = 0) -> WaveModel:
    data = tiny_thinker_config_dict(ids)
    ours = {"recipe": recipe}
    if recipe in ("all_layer", "last_layer"):
        data.update(train_classify=True, classify_type=recipe)
    if use_beats:
        from wave_rt.model.beats import BEATsConfig

        data["audio_config"]["beats_path"] = "BEATs_iter3_plus_AS2M.pt"
        ours["beats"] = BEATsConfig.tiny().to_dict()
    if recipe == "eos_projection":
        ours["projection_dim"] = 48
    data["wave_rt"] = ours
    return WaveModel.build(WaveConfig.from_dict(data), seed=seed)


class Case:
    """One item in both forms: our ItemInputs, and the kwargs/inputs the reference path needs."""

    def __init__(self, name: str, item: ItemInputs, hf_kwargs: dict, fbanks=None, n_segments=None, av=None):
        self.name, self.item, self.hf_kwargs = name, item, hf_kwargs
        self.fbanks, self.n_segments, self.av = fbanks, n_segments, av


def build_cases(model: WaveModel, ids: dict[str, int], fe) -> list[Case]:
    cfg = model.config
    A, V = ids["<|AUDIO|>"], ids["<|VIDEO|>"]
    im_end = ids["<|im_end|>"]
    repeat = 2 if cfg.dual_audio else 1
    gen = torch.Generator().manual_seed(7)
    cases = []

    # text target (plain str side) and text query
    for name, use_head, toks in (("text_target", False, [40, 41, 42, 43, 44]), ("text_query", True, [50, 51, 52])):
        sb = SequenceBuilder()
        sb.text(toks + [im_end])
        t_ids, t_pos = sb.build()
        cases.append(Case(name, ItemInputs(t_ids, t_pos, use_head), {}))

    # audio: two segments would need > 300 s; one 3.3 s segment keeps the test fast
    wav = noise(3.3, seed=1)
    f = fe(wav, sampling_rate=16000, return_attention_mask=True, return_tensors="pt", padding="max_length")
    L = int(f["attention_mask"].sum())
    n = whisper_tokens(L)
    fbank = torch.randn(1 + (wav.size - 400) // 160, 128, generator=gen) if cfg.use_beats else None
    sb = SequenceBuilder()
    sb.text([60, 61])
    sb.audio(n * repeat, audio_id=A, bos_id=ids["<|audio_bos|>"], eos_id=ids["<|audio_eos|>"])
    sb.text([62, 63, im_end])
    a_ids, a_pos = sb.build()
    item = ItemInputs(a_ids, a_pos, True, audio=[AudioSegmentInputs(f["input_features"][0][:, :L], L, n, fbank)])
    cases.append(Case("audio", item, dict(input_features=f["input_features"], feature_attention_mask=f["attention_mask"]),
                      fbanks=[fbank], n_segments=[n]))

    # silent video, two second-per-grid values (the temporal position index scales with it)
    for name, grid in (("video", VideoGrid(3, 4, 6, 1.0)), ("video_long", VideoGrid(2, 6, 4, 2.0))):
        pv = torch.randn(grid.t * grid.h * grid.w, 1176, generator=gen)
        sb = SequenceBuilder()
        sb.video(grid, video_id=V, bos_id=ids["<|vision_bos|>"], eos_id=ids["<|vision_eos|>"], position_id_per_seconds=25)
        sb.text([70, 71, im_end])
        v_ids, v_pos = sb.build()
        item = ItemInputs(v_ids, v_pos, True, pixel_values=pv, grid_thw=(grid.t, grid.h, grid.w))
        cases.append(Case(name, item, dict(pixel_values_videos=pv, video_grid_thw=torch.tensor([[grid.t, grid.h, grid.w]]),
                                           video_second_per_grid=torch.tensor([grid.second_per_grid]))))

    # audio-visual: 5.2 s of audio, 5 temporal patches
    wav = noise(5.2, seed=2)
    f = fe(wav, sampling_rate=16000, return_attention_mask=True, return_tensors="pt", padding="max_length")
    L = int(f["attention_mask"].sum())
    n = whisper_tokens(L)
    fbank = torch.randn(1 + (wav.size - 400) // 160, 128, generator=gen) if cfg.use_beats else None
    grid = VideoGrid(5, 4, 4, 1.0)
    pv = torch.randn(grid.t * grid.h * grid.w, 1176, generator=gen)
    sb = SequenceBuilder()
    sb.text([80])
    sb.audio_visual(grid, n, audio_repeat=repeat, rule="wave" if cfg.wave_chunking else "transformers",
                    video_id=V, audio_id=A, vision_bos_id=ids["<|vision_bos|>"], vision_eos_id=ids["<|vision_eos|>"],
                    audio_bos_id=ids["<|audio_bos|>"], audio_eos_id=ids["<|audio_eos|>"],
                    position_id_per_seconds=25, seconds_per_chunk=2)
    sb.text([81, 82, im_end])
    av_ids, av_pos = sb.build()
    item = ItemInputs(av_ids, av_pos, True, audio=[AudioSegmentInputs(f["input_features"][0][:, :L], L, n, fbank)],
                      pixel_values=pv, grid_thw=(grid.t, grid.h, grid.w))
    cases.append(Case("av", item, dict(input_features=f["input_features"], feature_attention_mask=f["attention_mask"],
                                       pixel_values_videos=pv, video_grid_thw=torch.tensor([[grid.t, grid.h, grid.w]]),
                                       video_second_per_grid=torch.tensor([1.0]), use_audio_in_video=True),
                      fbanks=[fbank], n_segments=[n], av=(grid, n * repeat)))
    return cases


def reference_embedding(model: WaveModel, hf, case: Case) -> torch.Tensor:
    cfg = model.config
    ids = case.item.input_ids[None].to(model.device)
    mask = torch.ones_like(ids)
    head = cfg.recipe.head if case.item.use_head else cfg.recipe.text_target_head
    with torch.no_grad():
        if not cfg.use_beats or case.fbanks is None:
            out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, **case.hf_kwargs)
            layer_states = ref.last_token_states(out.hidden_states)
        else:
            kw = case.hf_kwargs
            embeds = ref.thinker_inner(hf).get_input_embeddings()(ids)
            whisper = ref.thinker_inner(hf).get_audio_features(kw["input_features"], kw["feature_attention_mask"]).last_hidden_state
            audio = ref.reference_beats_merge(model, whisper, case.fbanks, case.n_segments)
            embeds = embeds.masked_scatter((ids == cfg.token_id("audio")).unsqueeze(-1), audio)
            if "pixel_values_videos" in kw:
                video = torch.cat(ref.thinker_inner(hf).get_video_features(kw["pixel_values_videos"], kw["video_grid_thw"]).pooler_output)
                embeds = embeds.masked_scatter((ids == cfg.token_id("video")).unsqueeze(-1), video)
            if case.av is not None:
                grid, n2 = case.av
                pos = ref.wave_rope_index(ids[0].cpu(), (grid.t, grid.h, grid.w), grid.second_per_grid, n2, cfg)[:, None]
            else:
                pos = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)  # audio-only: sequential
            pos = pos.to(model.device)
            out = ref.thinker_lm(hf)(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                          output_hidden_states=True)
            layer_states = ref.last_token_states(out.hidden_states)
        return ref.apply_reference_head(model, head, layer_states)


@pytest.fixture(scope="module", params=OMNI_CASES, ids=[f"{r}{'+beats' if b else ''}" for r, b in OMNI_CASES])
def omni(request, tiny_token_ids, whisper_fe):
    recipe, use_beats = request.param
    model = omni_model(tiny_token_ids, recipe, use_beats)
    hf = ref.hf_thinker(model)
    return model, hf, build_cases(model, tiny_token_ids, whisper_fe)


def test_equals_reference_each_modality(omni, tiny_token_ids):
    model, hf, cases = omni
    pad = tiny_token_ids["<|endoftext|>"]
    for case in cases:
        with torch.no_grad():
            ours = model(collate([case.item], pad))
        expected = reference_embedding(model, hf, case)
        assert ours.shape == expected.shape
        assert rel(ours, expected) <= TOL, (case.name, rel(ours, expected))


def test_batch_invariance(omni, tiny_token_ids):
    """Each item alone equals the same item inside one left-padded batch of all modalities and lengths."""
    model, _, cases = omni
    pad = tiny_token_ids["<|endoftext|>"]
    lengths = {c.item.num_tokens for c in cases}
    assert len(lengths) > 3, "the batch must mix lengths"
    with torch.no_grad():
        together = model(collate([c.item for c in reversed(cases)], pad)).flip(0)
        for k, case in enumerate(cases):
            alone = model(collate([case.item], pad))[0]
            assert rel(together[k], alone) <= TOL, (case.name, rel(together[k], alone))


def test_reference_positions_are_what_transformers_computes(tiny_token_ids, whisper_fe):
    """Without BEATs our structural positions equal transformers' get_rope_index on the same ids."""
    model = omni_model(tiny_token_ids, "last_token", False)
    hf = ref.hf_thinker(model)
    for case in build_cases(model, tiny_token_ids, whisper_fe):
        kw = case.hf_kwargs
        ids = case.item.input_ids[None]
        audio_lens = kw["feature_attention_mask"].sum(-1) if "feature_attention_mask" in kw else None
        pos, _ = ref.thinker_inner(hf).get_rope_index(
            ids, None, kw.get("video_grid_thw"), torch.ones_like(ids), kw.get("use_audio_in_video", False),
            audio_lens, kw.get("video_second_per_grid"))
        assert torch.equal(pos[:, 0], case.item.position_ids), case.name


def test_qwen2_audio_last_token_equals_reference(tiny_token_ids, whisper_fe):
    """Vela's recipe on the Qwen2-Audio backbone: final-layer last token of transformers' model."""

    data = tiny_qwen2_audio_config_dict(tiny_token_ids)
    model = WaveModel.build(WaveConfig.from_dict(data), seed=3)
    hf = ref.hf_qwen2_audio(model)
    ids = tiny_token_ids
    pad = ids["<|endoftext|>"]
    items, expected = [], []
    for seconds, seed in ((2.7, 4), (6.1, 5)):
        item, f = qwen2_audio_item(ids, seconds, seed)
        a_ids = item.input_ids
        items.append(item)
        with torch.no_grad():
            out = hf(input_ids=a_ids[None], attention_mask=torch.ones(1, len(a_ids), dtype=torch.long),
                     input_features=f["input_features"], feature_attention_mask=f["attention_mask"],
                     output_hidden_states=True)
        expected.append(out.hidden_states[-1][0, -1])
    with torch.no_grad():
        together = model(collate(items, pad, stack_mel=True))
        for k, item in enumerate(items):
            alone = model(collate([item], pad, stack_mel=True))[0]
            assert rel(alone, expected[k]) <= TOL
            assert rel(together[k], expected[k]) <= TOL
