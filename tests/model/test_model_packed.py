"""The packed forward (one variable-length stream, varlen attention, trimmed last layer, host-side tables)
equals the padded reference forward; it holds no padding and makes no host sync; the varlen encoder
attention equals transformers' own towers."""

from __future__ import annotations

import pytest
import torch
import wave_reference as ref
from test_model_reference import OMNI_CASES, build_cases, omni_model, rel
from torch.utils._python_dispatch import TorchDispatchMode

from wave_rt.config import WaveConfig
from wave_rt.model.batch import ItemInputs, PackedBatch, collate, collate_packed
from wave_rt.model.positions import SequenceBuilder
from wave_rt.model.wave_model import WaveModel

TOL = 1e-5


def packed(model: WaveModel, items: list[ItemInputs]) -> PackedBatch:
    cfg = model.config
    return collate_packed(items, audio_token_id=cfg.token_id("audio"), video_token_id=cfg.token_id("video"),
                          stack_mel=cfg.backbone == "qwen2_audio", tower_inputs=model.tower_inputs)


def long_text(ids: dict[str, int], n: int, use_head: bool) -> ItemInputs:
    sb = SequenceBuilder()
    sb.text([(7 * k) % 90 + 10 for k in range(n)] + [ids["<|im_end|>"]])
    t_ids, t_pos = sb.build()
    return ItemInputs(t_ids, t_pos, use_head)


# every recipe the packed path runs: the WAVE-family cases and the presets' recipes (issue 17), Omni-Embed-Nemotron's
# bidirectional attention + mean pooling included
PACKED_CASES = OMNI_CASES + [("lco_omni", False), ("e5_omni", False), ("mean_bidirectional", False)]


@pytest.fixture(scope="module", params=PACKED_CASES, ids=[f"{r}{'+beats' if b else ''}" for r, b in PACKED_CASES])
def omni(request, tiny_token_ids, whisper_fe):
    recipe, use_beats = request.param
    model = omni_model(tiny_token_ids, recipe, use_beats)
    items = [c.item for c in build_cases(model, tiny_token_ids, whisper_fe)]
    # very different lengths: 2-token and 300-token texts beside the media items
    items += [long_text(tiny_token_ids, 300, True), long_text(tiny_token_ids, 1, False)]
    return model, items


def test_packed_equals_padded_reference_mixed_batch(omni, tiny_token_ids):
    model, items = omni
    pad = tiny_token_ids["<|endoftext|>"]
    assert len({it.num_tokens for it in items}) == len(items), "lengths must all differ"
    with torch.no_grad():
        padded = model(collate(items, pad))
        ours = model(packed(model, items))
    assert ours.shape == padded.shape
    for k in range(len(items)):
        assert rel(ours[k], padded[k]) <= TOL, (k, rel(ours[k], padded[k]))


def test_packed_batch_invariance_and_batch_of_one(omni, tiny_token_ids):
    model, items = omni
    pad = tiny_token_ids["<|endoftext|>"]
    with torch.no_grad():
        together = model(packed(model, list(reversed(items)))).flip(0)
        for k, item in enumerate(items):
            alone = model(packed(model, [item]))[0]
            unbatched = model(collate([item], pad))[0]
            assert rel(alone, unbatched) <= TOL, (k, rel(alone, unbatched))
            assert rel(together[k], alone) <= TOL, (k, rel(together[k], alone))


def test_qwen2_audio_packed_equals_padded(tiny_token_ids, whisper_fe):
    from model_signals import qwen2_audio_item
    from tiny_checkpoints import tiny_qwen2_audio_config_dict

    ids = tiny_token_ids
    model = WaveModel.build(WaveConfig.from_dict(tiny_qwen2_audio_config_dict(ids)), seed=3)
    items = [long_text(ids, 40, False)]
    items += [qwen2_audio_item(ids, seconds, seed)[0] for seconds, seed in ((2.7, 4), (6.1, 5))]
    batch = packed(model, items)
    with torch.no_grad():
        padded = model(collate(items, ids["<|endoftext|>"], stack_mel=True))
        with HostSyncSpy() as spy:
            ours = model(batch)
    assert spy.seen == []
    for k in range(len(items)):
        assert rel(ours[k], padded[k]) <= TOL


def test_packed_batches_hold_no_padding(tiny_token_ids, whisper_fe):
    model = omni_model(tiny_token_ids, "all_layer", True)
    items = [c.item for c in build_cases(model, tiny_token_ids, whisper_fe)] + [long_text(tiny_token_ids, 77, True)]
    batch = packed(model, items)
    real = sum(it.num_tokens for it in items)
    assert batch.input_ids.shape == (real,) and batch.position_ids.shape == (3, real)
    assert batch.num_tokens == real
    assert batch.last_index.tolist() == [sum(it.num_tokens for it in items[: k + 1]) - 1 for k in range(len(items))]
    padded = collate(items, tiny_token_ids["<|endoftext|>"])
    assert padded.input_ids.numel() > real  # the reference layout does pad this batch


class HostSyncSpy(TorchDispatchMode):
    """Records every op that needs a tensor's value on the host (what a CUDA host sync would be): scalar
    reads (.item(), int(), .tolist()) and ops whose output shape depends on data (nonzero, masked_select,
    boolean indexing, unique)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "masked_scatter", "unique", "item")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(s in name for s in self.SYNCING) or (
            "index" in name and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in _flat(args))
        ):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def test_spy_catches_the_padded_paths_syncs(tiny_token_ids, whisper_fe):
    """The spy is not blind: the padded reference path (mask counts, transformers' window splits) syncs."""
    model = omni_model(tiny_token_ids, "all_layer", True)
    items = [c.item for c in build_cases(model, tiny_token_ids, whisper_fe)]
    batch = collate(items, tiny_token_ids["<|endoftext|>"])
    with torch.no_grad(), HostSyncSpy() as spy:
        model(batch)
    assert spy.seen


@pytest.mark.parametrize("recipe,use_beats", [("all_layer", True), ("last_token", False), ("mean_bidirectional", False)])
def test_packed_forward_reads_nothing_back(tiny_token_ids, whisper_fe, recipe, use_beats):
    model = omni_model(tiny_token_ids, recipe, use_beats)
    items = [c.item for c in build_cases(model, tiny_token_ids, whisper_fe)]
    batch = packed(model, items)
    with torch.no_grad(), HostSyncSpy() as spy:
        model(batch)
    assert spy.seen == []


@pytest.mark.parametrize("recipe,use_beats", [("all_layer", True), ("eos_projection", False),
                                              ("mean_bidirectional", False)])
def test_packed_forward_runs_without_tensor_values(tiny_token_ids, whisper_fe, monkeypatch, recipe, use_beats):
    """The whole packed forward (towers, BEATs, decoder, heads) runs on the meta device, where no tensor has
    values: any .item()/.tolist()/int()/nonzero/boolean mask read would raise. The attention kernel is what
    runs on CUDA (varlen_attn), stood in for here by a shape-only function, since the CPU fallback slices by
    lengths it may read from host memory."""
    import copy

    from wave_rt.model import varlen

    model = omni_model(tiny_token_ids, recipe, use_beats)
    items = [c.item for c in build_cases(model, tiny_token_ids, whisper_fe)] + [long_text(tiny_token_ids, 30, False)]
    batch = packed(model, items).to("meta")
    meta_model = copy.deepcopy(model).to("meta")
    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        assert isinstance(max_q, int) and isinstance(max_k, int)
        calls.append(kw["window_size"])
        return torch.empty_like(q)

    monkeypatch.setattr(varlen, "backend_for", lambda device, dtype: "torch_varlen")
    monkeypatch.setattr(varlen, "_torch_varlen", lambda: (kernel, frozenset({"scale", "enable_gqa", "window_size"})))
    with torch.no_grad():
        out = meta_model(batch)
    assert out.shape == (len(items), model.config.embedding_dim) and out.is_meta
    n_layers = len(model.model.layers) + len(model.audio_tower.layers) + len(model.visual.blocks)
    assert len(calls) == n_layers  # one attention call per layer, in every tower and the decoder
    n_llm = len(model.model.layers)
    if model.config.recipe.attention == "causal":
        assert calls.count((-1, 0)) == n_llm - 1  # causal in all but the trimmed last layer
    else:  # bidirectional everywhere (mean pooling: the last layer runs on every token); the towers are too
        assert (-1, 0) not in calls and calls.count((-1, -1)) == len(calls)
    with pytest.raises((RuntimeError, NotImplementedError)):  # the padded path reads values (mask counts, splits)
        meta_model(collate(items, tiny_token_ids["<|endoftext|>"]).to("meta"))


@pytest.mark.parametrize("recipe", ["all_layer", "mean_bidirectional"])
def test_packed_decoder_exports_without_data_dependent_breaks(tiny_token_ids, recipe):
    """torch.export traces the packed decoder + heads with the batch's host-side lengths baked in: any
    read of cu_seqlens/last_index values inside would fail the trace."""
    model = omni_model(tiny_token_ids, recipe, False)
    items = [long_text(tiny_token_ids, n, n % 2 == 0) for n in (5, 40, 17)]
    b = packed(model, items)

    class Core(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids, position_ids, cu_seqlens, last_index, use_head):
            batch = PackedBatch(input_ids, position_ids, cu_seqlens, last_index, use_head, b.lengths, "mixed")
            return self.m.forward_packed(batch)

    args = (b.input_ids, b.position_ids, b.cu_seqlens, b.last_index, b.use_head)
    ep = torch.export.export(Core(), args, strict=False)
    with torch.no_grad():
        assert torch.allclose(ep.module()(*args), model(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", ["all_layer", "mean_bidirectional"])
def test_packed_gradients_equal_padded(tiny_token_ids, recipe):
    """Training goes through the packed path too: gradients flow and equal the padded path's."""
    model = omni_model(tiny_token_ids, recipe, False)
    items = [long_text(tiny_token_ids, n, True) for n in (9, 31, 4)]
    pad = tiny_token_ids["<|endoftext|>"]
    weights = [model.model.layers[0].self_attn.q_proj.weight, model.model.layers[-1].self_attn.k_proj.weight]
    weights += [model.classify_linear[0].weight] if hasattr(model, "classify_linear") else [model.model.norm.weight]
    grads = []
    for batch in (collate(items, pad), packed(model, items)):
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        model(batch).pow(2).sum().backward()
        grads.append([w.grad.clone() for w in weights])
    for w in weights:
        w.requires_grad_(False)
    for g_pad, g_packed in zip(*grads):
        assert g_pad.abs().sum() > 0
        assert rel(g_packed, g_pad) <= 1e-4


def _hf_towers(model: WaveModel):
    hf = ref.hf_thinker(model)
    assert ref.thinker_inner(hf).audio_tower.config._attn_implementation in ("sdpa", "eager")
    return ref.thinker_inner(hf).audio_tower, ref.thinker_inner(hf).visual


def test_varlen_encoders_equal_transformers_modules(tiny_token_ids, whisper_fe):
    """Our towers (registered varlen attention, host-side window tables) == transformers' sdpa towers on
    several segments / videos of different sizes."""
    from model_signals import noise

    from wave_rt.model.tower_inputs import audio_tower_kwargs, vision_tower_kwargs

    model = omni_model(tiny_token_ids, "last_token", False)
    audio, visual = _hf_towers(model)
    assert "flash" in model.audio_tower.config._attn_implementation
    mels, lens = [], []
    for seconds, seed in ((3.3, 1), (1.0, 2), (7.9, 3)):
        f = whisper_fe(noise(seconds, seed), sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
        L = int(f["attention_mask"].sum())
        mels.append(f["input_features"][0][:, :L])
        lens.append(L)
    mel, mel_lens = torch.cat(mels, dim=1), torch.tensor(lens)
    with torch.no_grad():
        expected = audio(input_features=mel, feature_lens=mel_lens).last_hidden_state
        plain = model.encode_whisper(mel, mel_lens)
        tabled = model.encode_whisper(mel, mel_lens, audio_tower_kwargs(mel, mel_lens, model.audio_tower.config))
    assert rel(plain, expected) <= TOL and rel(tabled, expected) <= TOL

    grid = torch.tensor([[3, 4, 6], [1, 10, 8], [2, 6, 4]])
    pv = torch.randn(int(grid.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = visual(pv, grid_thw=grid).pooler_output
        plain = model.encode_video(pv, grid)
        tabled = model.encode_video(pv, grid, vision_tower_kwargs(grid, model.visual.config))
    assert rel(plain, expected) <= TOL and rel(tabled, expected) <= TOL


def test_varlen_attention_backends_agree_with_dense_reference():
    """The per-sequence path (and the kernels, where present) == a float64 dense masked reference, GQA and
    the bottom-right causal alignment included."""
    from wave_rt.model.varlen import varlen_attention

    g = torch.Generator().manual_seed(0)
    lengths = (5, 1, 12)
    n, hq, hkv, d = sum(lengths), 4, 2, 8
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, 5, 6, 18], dtype=torch.int32)
    for causal in (True, False):
        out = varlen_attention(q, k, v, cu, cu, 12, 12, causal=causal, scale=d**-0.5, lengths_q=lengths,
                               lengths_k=lengths)
        seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
        allowed = seg.view(-1, 1) == seg.view(1, -1)
        if causal:
            allowed &= torch.arange(n).view(-1, 1) >= torch.arange(n).view(1, -1)
        kk, vv = (t.double().repeat_interleave(2, dim=1) for t in (k, v))
        s = torch.einsum("qhd,khd->hqk", q.double(), kk) * d**-0.5
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        expected = torch.einsum("hqk,khd->qhd", p, vv)
        assert (out.double() - expected).abs().max() < 1e-5
    # one query per sequence (the trimmed last layer): its last token over all of its keys
    last = cu[1:].long() - 1
    cu_last = torch.arange(4, dtype=torch.int32)
    out = varlen_attention(q[last], k, v, cu_last, cu, 1, 12, causal=True, scale=d**-0.5, lengths_q=(1, 1, 1),
                           lengths_k=lengths)
    full = varlen_attention(q, k, v, cu, cu, 12, 12, causal=True, scale=d**-0.5, lengths_q=lengths, lengths_k=lengths)
    assert torch.allclose(out, full[last], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recipe,use_beats", [("all_layer", True), ("mean_bidirectional", False)])
def test_packed_forward_makes_no_cuda_host_sync(tiny_token_ids, whisper_fe, dtype, recipe, use_beats):
    model = omni_model(tiny_token_ids, recipe, use_beats).to("cuda", dtype)
    items = [c.item for c in build_cases(model, tiny_token_ids, whisper_fe)] + [long_text(tiny_token_ids, 90, False)]
    batch = packed(model, items).to("cuda", dtype)
    with torch.no_grad():
        model(batch)  # warm-up: lazy inits (cuBLAS handles, kernels) may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        padded = model(collate(items, tiny_token_ids["<|endoftext|>"]).to("cuda", dtype))
    # low precision: the packed path is no further from the padded one than bf16/fp16 rounding allows
    cos = torch.nn.functional.cosine_similarity(out.float(), padded.float(), dim=-1)
    assert cos.min() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recipe,use_beats", [("all_layer", True), ("mean_bidirectional", False)])
def test_packed_low_precision_error_at_most_twice_padded(tiny_token_ids, whisper_fe, dtype, recipe, use_beats):
    """On CUDA (varlen kernels) the packed path's error against a float64 reference of the same weights is
    at most 2x the padded path's (dense-mask SDPA) in the same dtype, on one mixed batch."""
    from test_model_gpu import _copy_model

    base = omni_model(tiny_token_ids, recipe, use_beats, seed=21)
    exact = _copy_model(base, "cpu", torch.float64)
    fast = _copy_model(base, "cuda", dtype)
    items = [c.item for c in build_cases(exact, tiny_token_ids, whisper_fe)] + [long_text(tiny_token_ids, 200, False)]
    pad = tiny_token_ids["<|endoftext|>"]
    with torch.no_grad():
        want = exact(collate(items, pad).to("cpu", torch.float64))
        ours = fast(packed(fast, items).to("cuda", dtype)).double().cpu()
        plain = fast(collate(items, pad).to("cuda", dtype)).double().cpu()
    for k in range(len(items)):
        err_ours = (ours[k] - want[k]).abs().max().item()
        err_plain = (plain[k] - want[k]).abs().max().item()
        assert err_ours <= 2 * err_plain + 1e-6, (k, err_ours, err_plain)


def test_packed_mean_bf16_error_at_most_twice_padded_on_cpu(tiny_token_ids, whisper_fe):
    """The CPU form of the check above for bidirectional + mean pooling (per-item SDPA and the float32 segment
    mean against the padded path's dense mask and masked sum), bf16 against a float64 reference."""
    from test_model_gpu import _copy_model

    base = omni_model(tiny_token_ids, "mean_bidirectional", False, seed=21)
    exact = _copy_model(base, "cpu", torch.float64)
    fast = _copy_model(base, "cpu", torch.bfloat16)
    items = [c.item for c in build_cases(exact, tiny_token_ids, whisper_fe)] + [long_text(tiny_token_ids, 200, False)]
    pad = tiny_token_ids["<|endoftext|>"]
    with torch.no_grad():
        want = exact(collate(items, pad).to("cpu", torch.float64))
        ours = fast(packed(fast, items).to("cpu", torch.bfloat16)).double()
        plain = fast(collate(items, pad).to("cpu", torch.bfloat16)).double()
    for k in range(len(items)):
        err_ours = (ours[k] - want[k]).abs().max().item()
        err_plain = (plain[k] - want[k]).abs().max().item()
        assert err_ours <= 2 * err_plain + 1e-6, (k, err_ours, err_plain)
