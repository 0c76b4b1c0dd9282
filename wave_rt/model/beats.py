"""BEATs audio encoder (Chen et al. 2022, microsoft/unilm `beats/`), the second audio tower of WAVE.

Input: a normalized 128-bin Kaldi fbank [B, T, 128] (wave_rt.media.beats_fbank computes it; 100 frames/s).
Conv2d 16x16 patches (stride 16) -> LayerNorm(512) -> Linear(512, 768) -> grouped conv positional
embedding (weight-normalized, kernel 128, 16 groups, GELU, added) -> LayerNorm -> 12 post-LN deep-norm
layers with a bucketed, query-gated relative position bias. Tokens are time-major: for every 16-frame
time patch its 8 frequency patches, so T frames give (T // 16) * 8 tokens (10.24 s -> 512).

Padding. forward() takes a frame mask (True = padding, right padding) and returns the same tokens on
the valid positions as the item run alone (batch invariance), which is how WAVE runs BEATs (one segment
at a time, no mask). The reference's own mask handling is not batch invariant and is not copied:
  - it maps frames to tokens by folding the frame mask into N equal runs (`view(B, N, -1).all(-1)`),
    about 2 frames per token, which does not follow the time-major patch layout: tokens from a time
    patch that is only partly valid (and would not exist for the item alone) stay unmasked;
  - its softmax subtracts a row max taken over padded keys too (then masks them), so huge padded
    logits can underflow the valid ones.
Here a token is padding when any frame of its 16-frame time patch is padding, padded tokens are zeroed
before the positional convolution (as the reference does, so the convolution sees exactly the zeros it
would see past the end of the unpadded item), masked as keys, and zeroed in the output.

State dict: exactly the released BEATs_iter3_plus_AS2M checkpoint's keys and shapes (loads with
strict=True). The checkpoint ties one relative-position table across all layers and stores a copy under
every `encoder.layers.N.self_attn.relative_attention_bias.weight`; the layers here hold their own copies
(safetensors cannot store tied tensors) and only layer 0's is read, as in the reference. The loader
refuses a checkpoint whose copies differ.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wave_rt.errors import CheckpointError, InputError
from wave_rt.model.beats_attention import ACTIVATIONS, BEATsEncoderLayer, TrimLast, WeightNormConv1d

FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
SIDECAR_SUFFIX = ".json"
_METADATA_KEY = "beats_cfg"


@dataclass
class BEATsConfig:
    """The released checkpoint's `cfg` (same field names as the reference BEATsConfig); defaults are
    those of BEATs_iter3_plus_AS2M. Unknown keys are kept in `extra` and written back by to_dict()."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 0.6
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = True
    predictor_dropout: float = 0.0
    predictor_class: int = 527
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> BEATsConfig:
        bad_keys = [k for k in cfg if not isinstance(k, str)]
        if bad_keys:
            raise TypeError(f"BEATs cfg keys must be strings, found {bad_keys!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = dict(cfg.get("extra") or {})
        extra.update({k: v for k, v in cfg.items() if k not in known and k != "extra"})
        return cls(**{k: v for k, v in cfg.items() if k in known}, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def tiny(cls) -> BEATsConfig:
        """A few-thousand-parameter config for tests: every feature of the full model is on."""
        return cls(
            embed_dim=24,
            encoder_layers=2,
            encoder_embed_dim=32,
            encoder_ffn_embed_dim=48,
            encoder_attention_heads=4,
            conv_pos=16,
            conv_pos_groups=4,
            num_buckets=32,
            max_distance=64,
            predictor_class=5,
        )

    def problems(self) -> list[str]:
        """Why this config cannot be built (empty when it can)."""
        out = []
        positive = ("input_patch_size", "embed_dim", "encoder_layers", "encoder_embed_dim",
                    "encoder_ffn_embed_dim", "encoder_attention_heads", "conv_pos", "conv_pos_groups")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                out.append(f"{name} must be a positive integer, got {value!r}")
        if out:
            return out
        if self.encoder_embed_dim % self.encoder_attention_heads:
            out.append(f"encoder_embed_dim {self.encoder_embed_dim} not divisible by "
                       f"encoder_attention_heads {self.encoder_attention_heads}")
        if self.encoder_embed_dim % self.conv_pos_groups:
            out.append(f"encoder_embed_dim {self.encoder_embed_dim} not divisible by conv_pos_groups {self.conv_pos_groups}")
        if self.activation_fn not in ACTIVATIONS:
            out.append(f"activation_fn {self.activation_fn!r} not supported (supported: {sorted(ACTIVATIONS)})")
        if self.layer_norm_first and self.deep_norm:
            out.append("deep_norm and layer_norm_first cannot both be set (the reference forbids it)")
        if self.relative_position_embedding and not (
            isinstance(self.num_buckets, int) and self.num_buckets >= 4
            and isinstance(self.max_distance, int) and self.max_distance > self.num_buckets // 4
        ):
            out.append(f"relative position needs num_buckets >= 4 and max_distance > num_buckets // 4, "
                       f"got {self.num_buckets}, {self.max_distance}")
        if self.finetuned_model and (not isinstance(self.predictor_class, int) or self.predictor_class <= 0):
            out.append(f"predictor_class must be a positive integer, got {self.predictor_class!r}")
        return out

    def num_tokens(self, frames: int, mel_bins: int = 128) -> int:
        """Tokens for `frames` fbank frames: whole time patches only, times the frequency patches."""
        return (frames // self.input_patch_size) * (mel_bins // self.input_patch_size)


class BEATsTransformer(nn.Module):
    """The `encoder.*` part: positional convolution, layer norm and the layer stack."""

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        c = cfg.encoder_embed_dim
        self.dropout = cfg.dropout
        self.layer_norm_first = cfg.layer_norm_first
        self.relative_position_embedding = cfg.relative_position_embedding
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(c, cfg.conv_pos, cfg.conv_pos_groups), TrimLast(cfg.conv_pos), nn.GELU()
        )
        self.layers = nn.ModuleList(
            BEATsEncoderLayer(
                c,
                cfg.encoder_ffn_embed_dim,
                cfg.encoder_attention_heads,
                dropout=cfg.dropout,
                attention_dropout=cfg.attention_dropout,
                activation_dropout=cfg.activation_dropout,
                activation_fn=cfg.activation_fn,
                layer_norm_first=cfg.layer_norm_first,
                deep_norm=cfg.deep_norm,
                encoder_layers=cfg.encoder_layers,
                has_relative_attention_bias=cfg.relative_position_embedding,
                num_buckets=cfg.num_buckets,
                max_distance=cfg.max_distance,
                gru_rel_pos=cfg.gru_rel_pos,
            )
            for _ in range(cfg.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(c)
        if cfg.relative_position_embedding:
            with torch.no_grad():  # the reference ties one table; start the per-layer copies equal
                for layer in self.layers[1:]:
                    layer.self_attn.relative_attention_bias.weight.copy_(
                        self.layers[0].self_attn.relative_attention_bias.weight
                    )
        if cfg.deep_norm:
            beta = math.pow(8 * cfg.encoder_layers, -0.25)
            for layer in self.layers:
                attn = layer.self_attn
                nn.init.xavier_normal_(attn.k_proj.weight, gain=1.0)
                nn.init.xavier_normal_(attn.q_proj.weight, gain=1.0)
                for weight in (attn.v_proj.weight, attn.out_proj.weight, layer.fc1.weight, layer.fc2.weight):
                    nn.init.xavier_normal_(weight, gain=beta)

    def forward(self, x: Tensor, token_padding: Tensor | None, query_block: int | None) -> Tensor:
        key_bias = None
        if token_padding is not None:
            x = x.masked_fill(token_padding.unsqueeze(-1), 0.0)
            # A row with no valid token (an all-padding item) keeps every key so its softmax stays finite;
            # its outputs are zeroed by the caller anyway.
            has_valid = (~token_padding).any(dim=1, keepdim=True)
            masked = token_padding & has_valid
            key_bias = torch.zeros(masked.shape, dtype=x.dtype, device=x.device)
            key_bias = key_bias.masked_fill(masked, float("-inf"))[:, None, None, :]
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, self.dropout, self.training)
        bias = self.layers[0].self_attn.relative_bias_by_offset(x.shape[1]) if self.relative_position_embedding else None
        for layer in self.layers:
            x = layer(x, bias, key_bias, query_block)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATsEncoder(nn.Module):
    """BEATs feature extractor; forward() returns the reference's extract_features(feature_only=True)."""

    def __init__(self, cfg: BEATsConfig | None = None, query_block: int | None = 4096) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else BEATsConfig()
        problems = cfg.problems()
        if problems:
            raise ValueError("invalid BEATs config: " + "; ".join(problems))
        self.cfg = cfg
        # Attention processes queries in blocks of this many rows (bounds the [B, H, rows, N] bias for
        # long audio); None = one block, which is what an export with a dynamic length should trace.
        self.query_block = query_block
        patch = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=patch, stride=patch, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) if cfg.embed_dim != cfg.encoder_embed_dim else None
        )
        self.encoder = BEATsTransformer(cfg)
        if cfg.finetuned_model:
            self.predictor_dropout = nn.Dropout(cfg.predictor_dropout)
            self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)
        else:
            self.predictor = None

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def token_padding_mask(self, padding_mask: Tensor, mel_bins: int) -> Tensor:
        """Frame mask [B, T] (True = padding) -> token mask [B, (T // p) * (mel_bins // p)]: a token is
        padding when any frame of its time patch is; frames past the last whole patch are dropped."""
        p = self.cfg.input_patch_size
        # A strided conv counts padded frames per patch and drops the trailing partial patch exactly as the
        # patch embedding does, without a slice or pool whose bounds an exporter would specialize on.
        ones = torch.ones(1, 1, p, dtype=torch.float32, device=padding_mask.device)
        per_patch = F.conv1d(padding_mask.to(torch.float32).unsqueeze(1), ones, stride=p).squeeze(1) > 0
        b, patches = per_patch.shape
        return per_patch.unsqueeze(-1).expand(b, patches, mel_bins // p).reshape(b, patches * (mel_bins // p))

    def forward(self, fbank: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """fbank [B, T, 128] normalized, padding_mask [B, T] bool (True = padding) or None ->
        (tokens [B, N, encoder_embed_dim] with N = (T // 16) * 8, token padding mask [B, N] or None).
        Computes in the module's dtype; padded tokens come back as zeros."""
        p = self.cfg.input_patch_size
        if fbank.dim() != 3 or fbank.shape[1] < p or fbank.shape[2] < p or fbank.shape[2] % p:
            raise InputError(f"BEATs fbank of shape {tuple(fbank.shape)}",
                             f"expected [batch, frames >= {p}, mel bins (a multiple of {p})]")
        if padding_mask is not None and tuple(padding_mask.shape) != tuple(fbank.shape[:2]):
            raise InputError(f"BEATs padding mask of shape {tuple(padding_mask.shape)}",
                             f"expected [batch, frames] = {tuple(fbank.shape[:2])}")
        x = self.patch_embedding(fbank.to(self.dtype).unsqueeze(1))  # [B, E, T // p, F // p]
        x = x.flatten(2).transpose(1, 2)  # [B, N, E], time-major: frequency patches vary fastest
        x = self.layer_norm(x)
        token_padding = None
        if padding_mask is not None:
            token_padding = self.token_padding_mask(padding_mask.to(torch.bool), fbank.shape[2])
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        x = F.dropout(x, self.cfg.dropout_input, self.training)
        x = self.encoder(x, token_padding, self.query_block)
        if token_padding is not None:
            x = x.masked_fill(token_padding.unsqueeze(-1), 0.0)
        return x, token_padding

    def classify(self, tokens: Tensor, token_padding: Tensor | None = None) -> Tensor:
        """AudioSet tag probabilities [B, predictor_class] of a fine-tuned model, as the reference's
        extract_features without feature_only: sigmoid of the token logits averaged over valid tokens."""
        if self.predictor is None:
            raise ValueError("this BEATs config has no predictor (finetuned_model is False)")
        logits = self.predictor(self.predictor_dropout(tokens))
        if token_padding is None:
            return torch.sigmoid(logits.mean(dim=1))
        keep = (~token_padding).unsqueeze(-1).to(logits.dtype)
        return torch.sigmoid((logits * keep).sum(dim=1) / keep.sum(dim=1))


# ---------------------------------------------------------------------- checkpoints


def _expected_shapes(cfg: BEATsConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = BEATsEncoder(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def check_beats_state_dict(cfg: BEATsConfig, state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Raise CheckpointError listing every missing, unexpected, mis-shaped or non-tensor entry, and
    relative-position table copies that differ (the reference ties them into one table)."""
    problems = cfg.problems()
    if problems:
        raise CheckpointError(path, "unsupported BEATs cfg: " + "; ".join(problems))
    expected = _expected_shapes(cfg)
    not_tensor = [k for k, v in state.items() if not isinstance(v, Tensor)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(shape)}"
             for k, shape in expected.items()
             if k in state and isinstance(state[k], Tensor) and tuple(state[k].shape) != shape]
    out = []
    if not_tensor:
        out.append(f"entries that are not tensors: {_listing(not_tensor)}")
    if missing:
        out.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
    if unexpected:
        out.append(f"unexpected tensors ({len(unexpected)}): {_listing(unexpected)}")
    if wrong:
        out.append(f"mis-shaped tensors ({len(wrong)}): {_listing(wrong)}")
    if not out and cfg.relative_position_embedding:
        name = "encoder.layers.{}.self_attn.relative_attention_bias.weight"
        first = state[name.format(0)]
        differ = [name.format(i) for i in range(1, cfg.encoder_layers) if not torch.equal(state[name.format(i)], first)]
        if differ:
            out.append(f"relative position tables differ from layer 0's (the reference ties them): {_listing(differ)}")
    if out:
        raise CheckpointError(path, "; ".join(out))


def _read_cfg_json(path: Path, text: str) -> dict[str, Any]:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(path, f"BEATs config is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(path, f"BEATs config must be a JSON object, found {type(cfg).__name__}")
    return cfg


def _load_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError for damaged files
        raise CheckpointError(path, f"unreadable safetensors file: {exc}") from None
    sidecar = path.with_suffix(SIDECAR_SUFFIX)
    if sidecar.is_file():
        return _read_cfg_json(sidecar, sidecar.read_text()), state
    if _METADATA_KEY in metadata:
        return _read_cfg_json(path, metadata[_METADATA_KEY]), state
    raise CheckpointError(path, f"no BEATs config: expected the sidecar {sidecar.name} (or '{_METADATA_KEY}' metadata)")


def _load_pickled(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except Exception as exc:  # UnpicklingError for arbitrary objects, RuntimeError for damaged archives, ...
        raise CheckpointError(
            path, f"refused or unreadable (loaded with weights_only=True; arbitrary pickles are never executed): {exc}"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("cfg"), dict) or not isinstance(obj.get("model"), dict):
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(path, f"expected the released layout {{'cfg': dict, 'model': state_dict}}, found {found}")
    return obj["cfg"], obj["model"]


def load_beats_state_dict(path: str | os.PathLike[str]) -> tuple[BEATsConfig, dict[str, Tensor]]:
    """Read a BEATs checkpoint: the released pickled {'cfg', 'model'} file (torch.load with
    weights_only=True) or a .safetensors file with its config in `<stem>.json` beside it (or in the
    file's metadata). Returns (config, state dict on CPU in the stored dtype), checked against the
    module's keys and shapes; raises CheckpointError naming the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found" if not path.exists() else "not a file")
    raw_cfg, state = _load_safetensors(path) if path.suffix == ".safetensors" else _load_pickled(path)
    try:
        cfg = BEATsConfig.from_dict(raw_cfg)
    except TypeError as exc:
        raise CheckpointError(path, f"bad BEATs cfg: {exc}") from None
    check_beats_state_dict(cfg, state, path)
    return cfg, dict(state)


def save_beats_safetensors(
    cfg: BEATsConfig, state: dict[str, Tensor], dst: str | os.PathLike[str]
) -> Path:
    """Write `state` as safetensors with the config both in the `<stem>.json` sidecar and in the metadata.
    Tied tensors are cloned: safetensors stores each name on its own."""
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(dst, "destination must end in .safetensors")
    text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata={_METADATA_KEY: text, "format": "pt"})
    dst.with_suffix(SIDECAR_SUFFIX).write_text(text + "\n")
    return dst


def convert_beats_checkpoint(src_pt: str | os.PathLike[str], dst_safetensors: str | os.PathLike[str]) -> Path:
    """One-time conversion of the released .pt to `dst` (.safetensors) + `<stem>.json`; returns dst."""
    cfg, state = load_beats_state_dict(src_pt)
    return save_beats_safetensors(cfg, state, dst_safetensors)


def load_beats_encoder(
    path: str | os.PathLike[str], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> BEATsEncoder:
    """A frozen BEATsEncoder in eval mode with the checkpoint's weights (strict load)."""
    cfg, state = load_beats_state_dict(path)
    with torch.device("meta"):
        model = BEATsEncoder(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def read_beats_config(path: str | os.PathLike[str]) -> BEATsConfig:
    """A BEATs checkpoint's config without reading its weights: the sidecar or metadata of a .safetensors
    file; for the pickled release, torch.load memory-maps the archive (mmap=True), so tensors stay on disk."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found" if not path.exists() else "not a file")
    if path.suffix == ".safetensors":
        sidecar = path.with_suffix(SIDECAR_SUFFIX)
        if sidecar.is_file():
            raw = _read_cfg_json(sidecar, sidecar.read_text())
        else:
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as handle:
                    metadata = handle.metadata() or {}
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(path, f"unreadable safetensors file: {exc}") from None
            if _METADATA_KEY not in metadata:
                raise CheckpointError(path, f"no BEATs config: expected the sidecar {sidecar.name} "
                                            f"(or '{_METADATA_KEY}' metadata)")
            raw = _read_cfg_json(path, metadata[_METADATA_KEY])
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # UnpicklingError, RuntimeError for damaged or legacy (non-zip) archives
            raise CheckpointError(path, f"refused or unreadable (weights_only=True, mmap=True): {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("cfg"), dict):
            raise CheckpointError(path, "expected the released layout {'cfg': dict, 'model': state_dict}")
        raw = obj["cfg"]
    try:
        return BEATsConfig.from_dict(raw)
    except TypeError as exc:
        raise CheckpointError(path, f"bad BEATs cfg: {exc}") from None
