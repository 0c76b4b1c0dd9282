"""MiDashengLM, ALM2Vec's backbone: the Dasheng audio encoder, a frame-stacking projector and a Qwen2.5 decoder.

Layout of the released checkpoint (read from the public vLLM and SGLang `midashenglm.py`; config.json
`model_type` "midashenglm"): `audio_encoder.*` (see wave_rt.model.dasheng), `audio_projector.net.{0,2}.*`
(Linear(k * D_audio, H) -> GELU -> Linear(H, H), k = `subsample_factor` = 5), `decoder.model.*` (a Qwen2
decoder, transformers' Qwen2Model) and `decoder.lm_head.*` (never loaded). Config: `audio_encoder_config`,
`text_config` (qwen2), `subsample_factor`, `audio_token_id`.

Audio tokens: frames // 4 // 5 per clip (one per 200 ms), at least one; the prompt carries
`<|audio_bos|>` + that many `<|AUDIO|>` + `<|audio_eos|>`. The decoder uses 1-D RoPE.

The projector's bias is an open point between the two public ports (vLLM builds it with a bias, SGLang
without and skips bias tensors on load): we build it with a bias unless the checkpoint has none
(`wave_rt.projector_bias`, set by the loader from the keys it finds).
"""

from __future__ import annotations

from typing import Any

import torch

from wave_rt.model.dasheng import DashengConfig, DashengEncoder, FrameStackProjector

MIDASHENGLM = "midashenglm"


def midashenglm_hf_config(data: dict[str, Any]) -> Any:
    """A transformers PretrainedConfig for MiDashengLM (not in transformers): holds the Qwen2 text config."""
    from transformers import PretrainedConfig, Qwen2Config

    class MiDashengLMConfig(PretrainedConfig):
        model_type = MIDASHENGLM

        def get_text_config(self, *args: Any, **kwargs: Any) -> Any:
            return self.text_config

        def to_dict(self) -> dict[str, Any]:
            out = super().to_dict()
            out["text_config"] = self.text_config.to_dict()
            return out

    text = dict(data.get("text_config") or {})
    text.setdefault("model_type", "qwen2")
    rest = {k: v for k, v in data.items() if k not in ("text_config", "model_type")}
    cfg = MiDashengLMConfig(**rest)
    cfg.text_config = Qwen2Config(**{k: v for k, v in text.items() if k != "model_type"})
    cfg.audio_encoder_config = DashengConfig.from_dict(data.get("audio_encoder_config")).to_dict()
    cfg.subsample_factor = int(data.get("subsample_factor", 5))
    return cfg


def build_midashenglm(model: torch.nn.Module, hf_config: Any, projector_bias: bool = True) -> None:
    """Attach MiDashengLM's modules to `model` under its canonical names (`model` = the Qwen2 decoder)."""
    from transformers import Qwen2Model

    # the caller's default dtype, not the one transformers-saved sub-configs name (WaveModel does the same)
    model.model = Qwen2Model._from_config(hf_config.text_config, dtype=torch.get_default_dtype())
    audio_cfg = DashengConfig.from_dict(hf_config.audio_encoder_config)
    model.audio_encoder = DashengEncoder(audio_cfg)
    model.audio_projector = FrameStackProjector(audio_cfg.embed_dim, int(hf_config.text_config.hidden_size),
                                                k=int(hf_config.subsample_factor), bias=projector_bias)


def encode_dasheng_audio(model: torch.nn.Module, mel: torch.Tensor, mel_lens: torch.Tensor,
                         audio_tokens: torch.Tensor) -> torch.Tensor:
    """Concatenated log-mel [64, sum(frames)] of every clip -> projected audio tokens [sum(tokens), H].

    Clips are padded to the longest (padding keys masked), encoded, frame-stacked, and each clip keeps its
    first `audio_tokens[i]` rows, as the reference keeps frames // 4 // 5 rows per clip."""
    encoder: DashengEncoder = model.audio_encoder
    lens = mel_lens.tolist()
    n, t_max = len(lens), max(lens)
    padded = mel.new_zeros(n, mel.shape[0], t_max)
    for i, clip in enumerate(torch.split(mel, lens, dim=1)):
        padded[i, :, : clip.shape[1]] = clip
    valid = DashengEncoder.valid_patches(mel_lens.to(mel.device), encoder.cfg.frames_per_patch)
    tokens = model.audio_projector(encoder(padded, valid))
    keep = torch.arange(tokens.shape[1], device=tokens.device).view(1, -1) < audio_tokens.to(tokens.device).view(-1, 1)
    if int(audio_tokens.max()) > tokens.shape[1]:
        raise ValueError(f"audio placeholders ask for {int(audio_tokens.max())} tokens, the encoder gave {tokens.shape[1]}")
    return tokens[keep]

