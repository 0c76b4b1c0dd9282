"""WaveModel: the backbone's encoders and decoder (from transformers), BEATs, the dual-audio merge and
the pooling heads, with an embedding forward that keeps only what an embedding needs.

State-dict names follow the released WAVE checkpoint (transformers 4.51/4.52 thinker layout):
`model.*` (decoder), `audio_tower.*`, `visual.*`, `beats.*`, `beats_ln.*`, `beats_proj.{0,2}.*`,
`classify_linear.{0,2}.*`; ALM2Vec's projection is `eos_proj.*`; Qwen2-Audio keeps
`multi_modal_projector.*`. There is no `lm_head`: embeddings never need the 152k-vocab logits.

The forward differs from `thinker(..., output_hidden_states=True)` in three ways that matter at 7B:
the last-token row of every decoder layer is copied into a [B, L, D] buffer as the layer finishes
(the full [L, B, T, D] stack is never kept), the final norm runs on those rows only, and there is no
LM head, KV cache or generation state.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from wave_rt.config import OMNI_THINKER, QWEN2_AUDIO, WaveConfig
from wave_rt.model.batch import PackedBatch, PaddedBatch
from wave_rt.model.midashenglm import MIDASHENGLM
from wave_rt.model.packed_decoder import packed_pooled_states

BEATS_WIDTH = 768


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] (1 = real) -> bool [B, 1, T, T], True = may attend.

    Causal and key-padding masked; the diagonal is always open so that the (left) padding rows attend
    to themselves instead of to nothing, which would make SDPA produce NaN rows that then poison the
    values every later layer reads. Real tokens never see padding keys, so outputs are unaffected."""
    T = attention_mask.shape[-1]
    idx = torch.arange(T, device=attention_mask.device)
    causal = idx.view(1, T) <= idx.view(T, 1)
    allowed = causal.view(1, 1, T, T) & attention_mask.bool().view(-1, 1, 1, T)
    return allowed | torch.eye(T, dtype=torch.bool, device=attention_mask.device).view(1, 1, T, T)


class WaveModel(nn.Module):
    def __init__(self, config: WaveConfig) -> None:
        super().__init__()
        self.config = config
        hf = config.hf_config
        if config.backbone == OMNI_THINKER:
            from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as omni

            from wave_rt.model.varlen import register_encoder_attention

            # transformers builds a sub-model in its config's dtype (checkpoints saved by transformers name one
            # in every sub-config) over the default dtype the caller asked for: pass the asked one explicitly, on
            # a copy, since _from_config writes it into the config (whose contents the fingerprint hashes)
            dtype = torch.get_default_dtype()
            self.model = omni.Qwen2_5OmniThinkerTextModel._from_config(copy.deepcopy(hf.text_config), dtype=dtype)
            # The towers run one varlen attention call per layer over their windows: a registered function
            # whose name contains "flash" selects transformers' cu_seqlens branch. It is set after
            # construction (at init transformers would look for the flash_attn package) on copies of the
            # configs, so that a transformers module built from the same hf_config keeps its own choice.
            self.audio_tower = omni.Qwen2_5OmniAudioEncoder._from_config(copy.deepcopy(hf.audio_config), dtype=dtype)
            self.visual = omni.Qwen2_5OmniVisionEncoder._from_config(copy.deepcopy(hf.vision_config), dtype=dtype)
            varlen = register_encoder_attention()
            for tower in (self.audio_tower, self.visual):
                tower.config._attn_implementation = varlen
        elif config.backbone == QWEN2_AUDIO:
            from transformers import AutoModel
            from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioMultiModalProjector

            dtype = torch.get_default_dtype()  # over the sub-configs' own dtype, as above
            self.model = AutoModel.from_config(copy.deepcopy(hf.text_config), dtype=dtype)
            self.audio_tower = AutoModel.from_config(copy.deepcopy(hf.audio_config), dtype=dtype)
            self.multi_modal_projector = Qwen2AudioMultiModalProjector(hf)
        elif config.backbone == MIDASHENGLM:
            from wave_rt.model.midashenglm import build_midashenglm

            build_midashenglm(self, hf, projector_bias=config.projector_bias)
        else:  # pragma: no cover - WaveConfig validates model types
            raise ValueError(config.backbone)

        if config.use_beats:
            from wave_rt.model.beats import BEATsConfig, BEATsEncoder

            beats_cfg = BEATsConfig.from_dict(config.beats) if config.beats else BEATsConfig()
            config.beats = beats_cfg.to_dict()
            audio_out = int(hf.audio_config.output_dim)
            self.beats = BEATsEncoder(beats_cfg)
            self.beats_ln = nn.LayerNorm(beats_cfg.encoder_embed_dim)
            self.beats_proj = nn.Sequential(
                nn.Linear(beats_cfg.encoder_embed_dim, audio_out), nn.GELU(), nn.Linear(audio_out, audio_out)
            )

        d, n_layers = config.hidden_size, config.num_layers
        heads = {config.recipe.head, config.recipe.text_target_head}
        if "all_layer" in heads:
            self.classify_linear = nn.Sequential(nn.Linear(d * n_layers, d), nn.GELU(), nn.Linear(d, d))
        elif "last_layer" in heads:
            self.classify_linear = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        if "eos_projection" in heads:
            self.eos_proj = nn.Linear(d, config.embedding_dim)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        config: WaveConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        init: str = "random",
        seed: int | None = None,
    ) -> WaveModel:
        """Construct directly on `device` in `dtype` (like transformers' from_pretrained, buffers such as
        RoPE frequencies stay float32). init="empty" skips weight initialisation (weights are loaded next);
        init="random" runs the backbone's own initialisation, seeded when `seed` is given."""
        from transformers.initialization import no_init_weights

        skip = no_init_weights() if init == "empty" else contextlib.nullcontext()
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng, torch.device(device), _default_dtype(dtype), skip:
            if seed is not None:
                torch.manual_seed(seed)
            model = cls(config)
        return model.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ------------------------------------------------------------------ encoders (tensor in, tensor out)
    def encode_whisper(self, mel: torch.Tensor, mel_lens: torch.Tensor,
                       tower_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """Omni audio tower on concatenated log-mel [128, sum(frames)] -> [sum(tokens), D]. `tower_kwargs`:
        the window tables precomputed on the host (`tower_inputs`), so the tower reads nothing back."""
        aftercnn = (mel_lens - 1) // 2 + 1
        out = self.audio_tower(
            input_features=mel.to(self.audio_tower.conv1.weight.dtype), feature_lens=mel_lens, aftercnn_lens=aftercnn,
            **dict(tower_kwargs or {}),
        )
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def encode_qwen2_audio(self, mel: torch.Tensor, mel_lens: torch.Tensor, audio_tokens: torch.Tensor,
                           keep_index: torch.Tensor | None = None) -> torch.Tensor:
        """Qwen2-Audio tower on [n, 128, 3000] padded log-mel -> projected valid tokens [sum(tokens), D].
        `keep_index` (rows of the flattened output, fixed at collation) avoids a data-dependent selection."""
        n, _, frames = mel.shape
        after_conv = (mel_lens - 1) // 2 + 1
        max_len = (frames - 2) // 2 + 1
        valid = torch.arange(max_len, device=mel.device).view(1, -1) < after_conv.view(-1, 1)
        # Bidirectional mask over the padded frames, as Qwen2AudioModel builds it (additive, dtype min).
        dtype = self.audio_tower.conv1.weight.dtype
        add = torch.zeros((n, 1, max_len, max_len), dtype=dtype, device=mel.device)
        add.masked_fill_(~valid.view(n, 1, 1, max_len), torch.finfo(dtype).min)
        out = self.audio_tower(mel.to(dtype), attention_mask=add)
        feats = self.multi_modal_projector(out.last_hidden_state)  # [n, 750, D]
        if keep_index is not None:
            return feats.reshape(-1, feats.shape[-1]).index_select(0, keep_index)
        keep = torch.arange(feats.shape[1], device=mel.device).view(1, -1) < audio_tokens.view(-1, 1)
        return feats[keep]

    def encode_beats(
        self, fbank: torch.Tensor, fbank_padding: torch.Tensor, audio_tokens: torch.Tensor, total: int | None = None
    ) -> torch.Tensor:
        """BEATs tokens of each segment, padded with zeros / truncated to exactly 2x the segment's Whisper
        tokens, averaged in pairs, then LayerNorm -> Linear -> GELU -> Linear: [sum(tokens), D].
        `total` = 2 * sum(audio_tokens) when the caller knows it on the host (no read-back)."""
        dtype = self.beats_ln.weight.dtype
        tokens, _ = self.beats(fbank.to(dtype), padding_mask=fbank_padding)
        n_seg, n_max, width = tokens.shape
        patch = int(self.beats.cfg.input_patch_size)
        valid = ((~fbank_padding).sum(1) // patch) * (fbank.shape[-1] // patch)
        want = 2 * audio_tokens
        total = int(want.sum()) if total is None else total
        seg = torch.repeat_interleave(torch.arange(n_seg, device=tokens.device), want, output_size=total)
        starts = torch.cumsum(want, 0) - want
        j = torch.arange(total, device=tokens.device) - torch.repeat_interleave(starts, want, output_size=total)
        flat = torch.cat([tokens.reshape(n_seg * n_max, width), tokens.new_zeros(1, width)])
        index = torch.where(j < valid[seg], seg * n_max + j, n_seg * n_max)
        pooled = flat[index].view(-1, 2, width).mean(dim=1)
        return self.beats_proj(self.beats_ln(pooled))

    def encode_audio(self, batch: PaddedBatch | PackedBatch) -> torch.Tensor:
        if self.config.backbone == MIDASHENGLM:
            from wave_rt.model.midashenglm import encode_dasheng_audio

            host = batch.audio_tower_kwargs if isinstance(batch, PackedBatch) else None
            return encode_dasheng_audio(self, batch.mel, batch.mel_lens, batch.audio_tokens, host)
        if self.config.backbone == QWEN2_AUDIO:
            keep = batch.audio_keep_index if isinstance(batch, PackedBatch) else None
            return self.encode_qwen2_audio(batch.mel, batch.mel_lens, batch.audio_tokens, keep)
        cfg = self.config
        packed = isinstance(batch, PackedBatch)
        tower_kwargs = batch.audio_tower_kwargs if packed else None
        whisper = None if cfg.beats_only else self.encode_whisper(batch.mel, batch.mel_lens, tower_kwargs)
        if not cfg.use_beats:
            return whisper
        beats = self.encode_beats(batch.fbank, batch.fbank_padding, batch.audio_tokens,
                                  total=batch.beats_tokens if packed else None)
        if whisper is None:
            return beats
        # WAVE interleaves token by token: w0, b0, w1, b1, ...
        return torch.stack([whisper, beats.to(whisper.dtype)], dim=1).reshape(-1, whisper.shape[-1])

    def encode_video(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                     tower_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        out = self.visual(pixel_values.to(self.visual.patch_embed.proj.weight.dtype), grid_thw=grid_thw,
                          **dict(tower_kwargs or {}))
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def embed_inputs(self, batch: PaddedBatch) -> torch.Tensor:
        """Token embeddings with the encoders' outputs scattered into their placeholder positions."""
        embeds = self.model.embed_tokens(batch.input_ids)
        if batch.mel is not None or batch.fbank is not None:
            audio = self.encode_audio(batch)
            mask = batch.input_ids == self.config.token_id("audio")
            _check_count(mask, audio, "audio")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), audio.to(embeds.dtype))
        if batch.pixel_values is not None:
            video = self.encode_video(batch.pixel_values, batch.grid_thw)
            mask = batch.input_ids == self.config.token_id("video")
            _check_count(mask, video, "video")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), video.to(embeds.dtype))
        return embeds

    # ------------------------------------------------------------------ packed batches (the hot path)
    @property
    def supports_packed(self) -> bool:
        """Every backbone and recipe has a packed path: the Omni thinker, Qwen2-Audio and MiDashengLM decoders
        (transformers' Qwen2-family layers), last-token or mean pooling, causal or bidirectional attention. A
        subclass or a future backbone whose decoder the packed path cannot run says False here and keeps the
        padded forward."""
        recipe = self.config.recipe
        return (self.config.backbone in (OMNI_THINKER, QWEN2_AUDIO, MIDASHENGLM)
                and recipe.pooling in ("last", "mean") and recipe.attention in ("causal", "bidirectional"))

    def tower_inputs(self, batch: PackedBatch) -> None:
        """Host side, at collation: the window tables the Omni towers would otherwise derive on the device
        with `.tolist()`/`.item()` (chunk lengths, cu_seqlens, max lengths, window order, rotary positions).
        Uses transformers' own helpers on CPU tensors; a no-op where this transformers lacks them. MiDashengLM:
        its clip lengths, kept rows and masked chunks (dasheng_host_inputs)."""
        if self.config.backbone == MIDASHENGLM and batch.mel is not None:
            from wave_rt.model.midashenglm import dasheng_host_inputs

            batch.audio_tower_kwargs = dasheng_host_inputs(self, batch.mel_lens, batch.audio_tokens)
        if self.config.backbone != OMNI_THINKER:
            return
        from wave_rt.model.tower_inputs import audio_tower_kwargs, vision_tower_kwargs

        if batch.mel is not None and not self.config.beats_only:
            batch.audio_tower_kwargs = audio_tower_kwargs(batch.mel, batch.mel_lens, self.audio_tower.config)
        if batch.pixel_values is not None:
            batch.vision_tower_kwargs = vision_tower_kwargs(batch.grid_thw, self.visual.config)

    def embed_packed(self, batch: PackedBatch) -> torch.Tensor:
        """[N, D] token embeddings of the packed stream with the encoders' outputs copied into their
        placeholder rows (row indices fixed at collation: no mask count read back)."""
        embeds = self.model.embed_tokens(batch.input_ids)
        if batch.mel is not None or batch.fbank is not None:
            audio = self.encode_audio(batch)
            embeds = _place(embeds, batch.audio_index, audio, "audio")
        if batch.pixel_values is not None:
            video = self.encode_video(batch.pixel_values, batch.grid_thw, batch.vision_tower_kwargs)
            embeds = _place(embeds, batch.video_index, video, "video")
        return embeds

    def forward_packed(self, batch: PackedBatch) -> torch.Tensor:
        """Unnormalised embeddings [B, embedding_dim] of a packed batch; no host sync on CUDA."""
        if not self.supports_packed:
            raise NotImplementedError(f"no packed path for backbone {self.config.backbone!r} with recipe "
                                      f"{self.config.recipe.name!r}; collate a PaddedBatch instead")
        embeds = self.embed_packed(batch)
        recipe = self.config.recipe
        layer_states = packed_pooled_states(self.model, embeds, batch.position_ids, batch.cu_seqlens, batch.last_index,
                                    batch.lengths, self.config.uses_mrope, pooling=recipe.pooling,
                                    attention=recipe.attention)
        if batch.head_mode == "head":
            return self.apply_head(recipe.head, layer_states)
        if batch.head_mode == "target":
            return self.apply_head(recipe.text_target_head, layer_states)
        return self.pool(layer_states, batch.use_head, all_same=False)

    # ------------------------------------------------------------------ decoder + heads (export-ready)
    def last_token_states(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Run the decoder and return the last position's hidden state after every layer: [B, L, D].

        Entries 0..L-2 are raw layer outputs, entry L-1 is the final-norm output, i.e. exactly
        `hidden_states[1:]` of transformers' output_hidden_states at the last position. Rows must be
        left-padded. attention_mask=None means no row is padded (plain causal attention)."""
        lm = self.model
        layers = lm.layers
        B, _, D = inputs_embeds.shape
        layer_states = inputs_embeds.new_empty(B, len(layers), D)
        pos = position_ids if self.config.uses_mrope else position_ids[0]
        position_embeddings = lm.rotary_emb(inputs_embeds, pos)
        mask = causal_padding_mask(attention_mask) if attention_mask is not None else None
        h = inputs_embeds
        for i, layer in enumerate(layers):
            out = layer(h, attention_mask=mask, position_embeddings=position_embeddings, use_cache=False)
            h = out[0] if isinstance(out, tuple) else out
            if i < len(layers) - 1:
                layer_states[:, i] = h[:, -1]
        layer_states[:, -1] = lm.norm(h[:, -1:]).squeeze(1)
        return layer_states

    def apply_head(self, head: str, layer_states: torch.Tensor) -> torch.Tensor:
        if head == "none":
            return layer_states[:, -1]
        if head == "eos_projection":
            return self.eos_proj(layer_states[:, -1])
        if head == "last_layer":
            return self.classify_linear(layer_states[:, -1])
        if head == "all_layer":
            first, act, second = self.classify_linear
            hidden = _fused_first_layer(layer_states, first.weight, first.bias)
            if hidden is None:
                hidden = act(first(layer_states.reshape(layer_states.shape[0], -1)))
            return second(hidden)
        raise ValueError(f"unknown head {head!r}")

    def pool(self, layer_states: torch.Tensor, use_head: torch.Tensor, all_same: bool | None = None) -> torch.Tensor:
        """Per row: the recipe's head (media, text queries) or the text-target head (plain strings).
        `all_same` (host-side knowledge of use_head) lets a uniform batch skip the unused head."""
        recipe = self.config.recipe
        if recipe.head == recipe.text_target_head or all_same is True:
            head = recipe.head if (recipe.head == recipe.text_target_head or bool(use_head[0])) else recipe.text_target_head
            return self.apply_head(head, layer_states)
        a = self.apply_head(recipe.head, layer_states)
        b = self.apply_head(recipe.text_target_head, layer_states)
        return torch.where(use_head.view(-1, 1), a, b.to(a.dtype))

    def forward_core(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        use_head: torch.Tensor,
    ) -> torch.Tensor:
        """The export-ready part: embeddings in, unnormalised embeddings out, no Python decisions on data."""
        recipe = self.config.recipe
        if recipe.pooling != "last" or recipe.attention != "causal":
            # Refuse rather than export a last-token causal graph for a mean/bidirectional recipe.
            raise NotImplementedError(f"recipe {recipe.name!r} (pooling={recipe.pooling}, attention={recipe.attention}) "
                                      "has no export graph yet; use forward()")
        layer_states = self.last_token_states(inputs_embeds, attention_mask, position_ids)
        if recipe.head == recipe.text_target_head:
            return self.apply_head(recipe.head, layer_states)
        a = self.apply_head(recipe.head, layer_states)
        b = self.apply_head(recipe.text_target_head, layer_states)
        return torch.where(use_head.view(-1, 1), a, b.to(a.dtype))

    def forward(self, batch: PaddedBatch | PackedBatch) -> torch.Tensor:
        """Unnormalised embeddings [B, embedding_dim] for a collated batch already on this model's device:
        a PackedBatch runs the packed varlen path, a PaddedBatch the padded reference path."""
        if isinstance(batch, PackedBatch):
            return self.forward_packed(batch)
        embeds = self.embed_inputs(batch)
        recipe = self.config.recipe
        if recipe.pooling != "last" or recipe.attention != "causal":
            from wave_rt.model.pooling import pooled_decoder_states

            pooled = pooled_decoder_states(self.model, embeds, batch.attention_mask, batch.position_ids,
                                           pooling=recipe.pooling, attention=recipe.attention,
                                           mrope=self.config.uses_mrope)
            uses = batch.use_head
            return self.pool(pooled.unsqueeze(1), uses, all_same=bool(uses.all()) or not bool(uses.any()))
        layer_states = self.last_token_states(embeds, batch.attention_mask if batch.padded else None, batch.position_ids)
        uses = batch.use_head
        all_same = bool(uses.all()) or not bool(uses.any())
        return self.pool(layer_states, uses, all_same=all_same)


def _place(embeds: torch.Tensor, index: torch.Tensor | None, feats: torch.Tensor, what: str) -> torch.Tensor:
    if index is None:
        raise ValueError(f"packed batch has {what} inputs but no {what} placeholder rows (collate_packed needs "
                         f"the {what} token id)")
    if index.shape[0] != feats.shape[0]:  # shapes only: both known without reading the device
        raise ValueError(f"{what} placeholders ({index.shape[0]}) and {what} encoder tokens ({feats.shape[0]}) disagree")
    return embeds.index_copy(0, index, feats.to(embeds.dtype))


def _check_count(mask: torch.Tensor, feats: torch.Tensor, what: str) -> None:
    n = int(mask.sum())
    if n != feats.shape[0]:
        raise ValueError(f"{what} placeholders ({n}) and {what} encoder tokens ({feats.shape[0]}) disagree")


def _fused_first_layer(layer_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor | None:
    """GELU(concat(layer_states) @ W1.T + b1) through wave_rt.kernels.layer_fusion_mlp on CUDA (which picks, per
    layout, the cuBLAS GEMM on the free [B, L*D] view or the split-K Triton kernel); None elsewhere (on the
    CPU, layer_states.reshape(B, L*D) is already a free view and one GEMM is the fastest path)."""
    if not layer_states.is_cuda:
        return None
    if weight.dtype != layer_states.dtype or (bias is not None and bias.dtype != layer_states.dtype):
        # training keeps the head in fp32 under bf16 autocast: nn.Linear lets autocast cast it; the kernel
        # takes one dtype
        return None
    try:
        from wave_rt.kernels import layer_fusion_mlp
    except ImportError:
        return None
    return layer_fusion_mlp(layer_states, weight, bias)
