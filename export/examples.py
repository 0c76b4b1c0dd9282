"""Example inputs for tracing: real processor output for synthetic media, so every stage is traced on
the tensors it will see at run time (shapes >= 2 on every dynamic axis, so nothing specializes to 0/1)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from wave_rt.model.wave_model import WaveModel


def example_items(seed: int = 0) -> list[Any]:
    import wave_rt

    rng = np.random.default_rng(seed)
    audio = [wave_rt.Audio((0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32), sample_rate=16000)
             for s in (1.3, 2.7)]
    video = [wave_rt.Video(rng.integers(0, 255, (n, 56, 84, 3), dtype=np.uint8), fps=2.0) for n in (4, 6)]
    text = ["an example text target", wave_rt.Text("a query", side="query")]
    return audio + video + text


def example_inputs(model: WaveModel, tokenizer: Any, device: str | torch.device = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """{stage: {input name: tensor}} built through the processor and the stages' host-side bookkeeping."""
    from wave_rt.embed.processor import WaveProcessor
    from wave_rt.export.runtime import StageInputs
    from wave_rt.model.batch import collate

    processor = WaveProcessor(model.config, tokenizer)
    items = example_items()
    prepared = [processor.prepare(it, index=i).inputs for i, it in enumerate(items)]
    pad = processor.ids["pad"]
    host = StageInputs(model.config, model.model.embed_tokens.weight.detach().to("cpu"))
    out: dict[str, dict[str, torch.Tensor]] = {}
    audio = collate(prepared[0:2], pad)
    video = collate(prepared[2:4], pad)
    mixed = collate(prepared, pad)
    if audio.mel is not None:
        out["audio_tower"] = host.audio_tower(audio)
    if audio.fbank is not None:
        out["beats"] = host.beats(audio)
    out["vision"] = host.vision(video)
    embeds = host.token_embeddings(mixed)
    out["decoder"] = host.decoder(mixed, embeds)
    return {s: {k: v.to(device) for k, v in d.items()} for s, d in out.items()}
