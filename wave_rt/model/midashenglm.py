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

import copy
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
    model.model = Qwen2Model._from_config(copy.deepcopy(hf_config.text_config), dtype=torch.get_default_dtype())
    audio_cfg = DashengConfig.from_dict(hf_config.audio_encoder_config)
    model.audio_encoder = DashengEncoder(audio_cfg)
    model.audio_projector = FrameStackProjector(audio_cfg.embed_dim, int(hf_config.text_config.hidden_size),
                                                k=int(hf_config.subsample_factor), bias=projector_bias)


def dasheng_host_inputs(model: torch.nn.Module, mel_lens: torch.Tensor, audio_tokens: torch.Tensor) -> dict[str, Any]:
    """Host side, at collation (CPU tensors): what encode_dasheng_audio would otherwise read back from the device
    (clip lengths, the padded token count, which rows each clip keeps, whether a chunk needs a padding mask)."""
    encoder: DashengEncoder = model.audio_encoder
    lens = tuple(int(x) for x in mel_lens.tolist())
    conv = encoder.patch_embed.proj
    t_max = max(lens)
    patches = (t_max + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
    per_clip = patches // model.audio_projector.k  # the projector's rows for the padded clip length
    want = [int(x) for x in audio_tokens.tolist()]
    if max(want) > per_clip:
        raise ValueError(f"audio placeholders ask for {max(want)} tokens, the encoder gives {per_clip}")
    valid = DashengEncoder.valid_patches(mel_lens.cpu(), encoder.cfg.frames_per_patch)
    keep = torch.cat([torch.arange(w) + i * per_clip for i, w in enumerate(want)])
    return {"dasheng_lens": lens, "dasheng_valid": valid, "dasheng_min_valid": int(valid.min()),
            "dasheng_keep_index": keep}


def encode_dasheng_audio(model: torch.nn.Module, mel: torch.Tensor, mel_lens: torch.Tensor,
                         audio_tokens: torch.Tensor, host: dict[str, Any] | None = None) -> torch.Tensor:
    """Concatenated log-mel [64, sum(frames)] of every clip -> projected audio tokens [sum(tokens), H].

    Clips are padded to the longest (padding keys masked), encoded, frame-stacked, and each clip keeps its
    first `audio_tokens[i]` rows, as the reference keeps frames // 4 // 5 rows per clip. `host`: the
    dasheng_host_inputs a packed batch fixed at collation (no read-back); None computes them here."""
    if host is None:
        host = dasheng_host_inputs(model, mel_lens.cpu(), audio_tokens.cpu())
    lens = host["dasheng_lens"]
    padded = mel.new_zeros(len(lens), mel.shape[0], max(lens))
    for i, clip in enumerate(torch.split(mel, lens, dim=1)):
        padded[i, :, : clip.shape[1]] = clip
    valid = host["dasheng_valid"].to(mel.device, non_blocking=True)
    tokens = model.audio_projector(model.audio_encoder(padded, valid, min_valid=host["dasheng_min_valid"]))
    keep = host["dasheng_keep_index"].to(tokens.device, non_blocking=True)
    return tokens.reshape(-1, tokens.shape[-1]).index_select(0, keep)

