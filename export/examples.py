"""Example inputs for tracing, built from the config alone (no tokenizer, so a random-weight 7B config
exports the same way as a checkpoint): two audio segments, two videos, two left-padded token rows with
both heads. Every dynamic axis has size >= 2 in them, so nothing specializes to 0/1."""

from __future__ import annotations

import torch

from wave_rt.model.batch import AudioSegmentInputs, ItemInputs, collate
from wave_rt.model.wave_model import WaveModel


def example_inputs(model: WaveModel, device: str | torch.device = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """{stage: {input name: tensor}} through the stages' own host-side bookkeeping."""
    from wave_rt.export.stages import StageInputs

    from wave_rt.embed.processor import whisper_tokens

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    vocab = int(cfg.text_config.vocab_size)
    pad = int(cfg.text_config.pad_token_id or 0)
    segments = []
    for seconds in (1.3, 2.7):
        samples = int(seconds * 16000)
        frames = samples // 160
        fbank = torch.randn(1 + (samples - 400) // 160, 128, generator=g) if cfg.use_beats else None
        segments.append(AudioSegmentInputs(torch.randn(128, frames, generator=g), frames, whisper_tokens(frames), fbank))
    rows = []
    for k, n in enumerate((9, 13)):
        ids = torch.randint(0, vocab, (n,), generator=g)
        pos = torch.arange(n).view(1, -1).expand(3, n).clone()
        rows.append(ItemInputs(ids, pos, use_head=k == 0, audio=[segments[k]]))
    vids = []
    for t in (2, 3):
        grid = (t, 4, 6)
        vids.append(ItemInputs(rows[0].input_ids, rows[0].position_ids, True,
                               pixel_values=torch.randn(t * 4 * 6, 1176, generator=g), grid_thw=grid))
    host = StageInputs(cfg, model.model.embed_tokens.weight.detach().to("cpu"))
    audio = collate(rows, pad)
    video = collate(vids, pad)
    out: dict[str, dict[str, torch.Tensor]] = {}
    if not cfg.beats_only:
        out["audio_tower"] = host.audio_tower(audio)
    if cfg.use_beats:
        out["beats"] = host.beats(audio)
    out["vision"] = host.vision(video)
    out["decoder"] = host.decoder(audio, host.token_embeddings(audio))
    dtype = model.dtype
    return {s: {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in d.items()}
            for s, d in out.items()}
