"""Reference formulations for the model tests, built from the upstream transformers modules.

The reference path is what WAVE's own code does: the transformers thinker with
`output_hidden_states=True`, the last position of `hidden_states[1:]`, the same fusion MLP; BEATs
features merged the reference way (pad/truncate to 2N, AvgPool1d(2, 2), LayerNorm, projector,
token interleave with cat + view), and WAVE's token-run based RoPE for doubled audio-visual input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def hf_thinker(model):
    """A transformers Qwen2_5OmniThinkerForConditionalGeneration holding `model`'s weights."""
    import transformers

    cfg = model.config.hf_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    targets = set(hf.state_dict())
    sd = {}
    for k, v in model.state_dict().items():
        if not k.startswith(("model.", "audio_tower.", "visual.")):
            continue
        for cand in (("model.language_model." + k[6:]) if k.startswith("model.") else None, "model." + k, k):
            if cand in targets:
                sd[cand] = v
                break
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    return hf


def hf_qwen2_audio(model):
    import transformers

    cfg = model.config.hf_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = transformers.Qwen2AudioForConditionalGeneration(cfg).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("model."):
            sd["model.language_model." + k[len("model."):]] = v
        else:
            sd["model." + k] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    return hf


def last_token_states(hidden_states) -> torch.Tensor:
    """[B, L, D]: the last position of every entry of hidden_states[1:] (27 raw + final-norm at 7B)."""
    return torch.stack([h[:, -1] for h in hidden_states[1:]], dim=1)


def apply_reference_head(model, head: str, layer_states: torch.Tensor) -> torch.Tensor:
    if head == "none":
        return layer_states[:, -1]
    if head == "eos_projection":
        return model.eos_proj(layer_states[:, -1])
    if head == "last_layer":
        return model.classify_linear(layer_states[:, -1])
    if head == "all_layer":
        return model.classify_linear(torch.cat([layer_states[:, i] for i in range(layer_states.shape[1])], dim=-1))
    raise ValueError(head)


def reference_beats_merge(model, whisper: torch.Tensor, fbanks: list[torch.Tensor], n_per_segment: list[int]) -> torch.Tensor:
    """WAVE's merge: per segment BEATs features padded/truncated to 2N, AvgPool1d(2,2), LN, projector,
    then Whisper/BEATs interleaved token by token."""
    pooler = nn.AvgPool1d(2, stride=2)
    pooled = []
    for fbank, n in zip(fbanks, n_per_segment):
        feat, _ = model.beats(fbank[None], padding_mask=None)
        feat = feat[0]
        if feat.size(0) < 2 * n:
            feat = F.pad(feat, (0, 0, 0, 2 * n - feat.size(0)))
        elif feat.size(0) > 2 * n:
            feat = feat[: 2 * n]
        pooled.append(pooler(feat.transpose(0, 1)).transpose(0, 1))
    beats = model.beats_proj(model.beats_ln(torch.cat(pooled)))
    if model.config.beats_only:
        return beats
    return torch.cat([whisper.unsqueeze(1), beats.unsqueeze(1)], dim=1).view(-1, whisper.size(-1))


def wave_rope_index(input_ids, video_grid_thw, second_per_grid, n_audio_doubled, cfg, spatial_merge=2):
    """WAVE's get_rope_index for ONE audio-visual sequence (no padding): audio positions arange(2N),
    chunks read from the runs of video/audio tokens in input_ids (restated from the reference code)."""
    video_id, audio_id = cfg.token_id("video"), cfg.token_id("audio")
    vbos = cfg.token_id("vision_bos")
    ids = input_ids.tolist()
    pps = cfg.hf_config.position_id_per_seconds
    start = ids.index(vbos)  # <|vision_bos|><|audio_bos|> follow the leading text
    pos = [torch.arange(start).view(1, -1).expand(3, -1)]
    st = start
    pos.append(torch.tensor([[st], [st], [st]]))
    pos.append(torch.tensor([[st], [st], [st]]))
    st_idx = st + 1
    t, h, w = (int(x) for x in video_grid_thw)
    t_index = (torch.arange(t) * torch.tensor(second_per_grid).float() * pps).long()
    gh, gw = h // spatial_merge, w // spatial_merge
    vpos = torch.stack([
        t_index.view(-1, 1).expand(-1, gh * gw).flatten(),
        torch.arange(gh).view(1, -1, 1).expand(t, -1, gw).flatten(),
        torch.arange(gw).view(1, 1, -1).expand(t, gh, -1).flatten(),
    ]) + st_idx
    apos = torch.arange(n_audio_doubled).view(1, -1).expand(3, -1) + st_idx
    # runs of consecutive video / audio tokens, in order
    runs = []
    for tok in ids:
        if tok in (video_id, audio_id):
            if runs and runs[-1][0] == tok:
                runs[-1][1] += 1
            else:
                runs.append([tok, 1])
    vp = ap = 0
    for tok, n in runs:
        if tok == video_id:
            pos.append(vpos[:, vp: vp + n])
            vp += n
        else:
            pos.append(apos[:, ap: ap + n])
            ap += n
    end = int(pos[-1].max()) + 1  # the last chunk's, as WAVE's `llm_pos_ids_list[-1].max() + 1`
    pos.append(torch.tensor([[end], [end], [end]]))
    pos.append(torch.tensor([[end], [end], [end]]))
    consumed = sum(p.shape[1] for p in pos)
    rest = len(ids) - consumed
    pos.append(torch.arange(rest).view(1, -1).expand(3, -1) + end + 1)
    return torch.cat(pos, dim=1)


def thinker_inner(hf):
    """The module owning get_*_features / get_rope_index / audio_tower / visual: hf.model on transformers
    with Qwen2_5OmniThinkerModel (>= 5.2x), the ForConditionalGeneration itself before (5.17)."""
    return hf.model if hasattr(hf.model, "language_model") else hf


def thinker_lm(hf):
    """The decoder (Qwen2_5OmniThinkerTextModel) under either layout."""
    inner = thinker_inner(hf)
    return inner.language_model if inner is not hf else hf.model
