"""The Dasheng audio encoder (MiDashengLM's audio tower), on log-mel features computed outside the module.

Structure (the `dasheng` package's AudioTransformerMAE_Encoder / MiDashengLM's DashengAudioTransformer):
BatchNorm over the 64 mel bins -> Conv2d patch embedding (64 x 4 patches, stride 4 in time: one token per
40 ms) -> per chunk of `target_length // 4` patches (10.08 s at the default 1008 frames) independently:
+ time and frequency position embeddings (the time embedding restarts in every chunk), pre-LN ViT blocks
(LayerNorm eps 1e-6, fused qkv, GELU MLP, optional LayerScale), final LayerNorm. Tokens are concatenated.

Padding: keys past an item's valid patches (`samples // 640`, i.e. `(mel_frames - 1) // 4`) are masked
additively with the dtype's minimum, as the reference does (a chunk that is all padding then averages its
values uniformly instead of producing NaN, again as the reference does). Valid tokens never see padding,
so a padded batch gives every item exactly what it gets alone.

State-dict names are MiDashengLM's released `audio_encoder.*` names (the module is mounted at
`audio_encoder`): `front_end.0.spectrogram.window`, `front_end.0.mel_scale.fb` (buffers kept only so the
checkpoint's layout round-trips; features are computed by wave_rt.media.features_dasheng), `init_bn.*`,
`patch_embed.proj.*`, `time_pos_embed`, `freq_pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,
norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*`, `norm.*`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DashengConfig:
    """MiDashengLM's `audio_encoder_config` (names as its config.json spells them)."""

    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None
    patch_size: list[int] = field(default_factory=lambda: [64, 4])
    patch_stride: list[int] = field(default_factory=lambda: [64, 4])
    target_length: int = 1008
    input_channels: int = 1
    n_mels: int = 64
    n_fft: int = 512
    win_length: int = 512
    hop_length: int = 160
    f_min: float = 0.0
    f_max: float = 8000.0
    center: bool = True
    sample_rate: int = 16000

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DashengConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def tiny(cls) -> DashengConfig:
        """Test-sized: 2 blocks of width 32, chunks of 40 frames (10 patches) so short clips span chunks."""
        return cls(embed_dim=32, depth=2, num_heads=4, target_length=40, init_values=0.5)

    @property
    def frames_per_patch(self) -> int:
        return int(self.patch_stride[1])

    @property
    def patches_per_chunk(self) -> int:
        return int(self.target_length) // self.frames_per_patch


class _Buffers(nn.Module):
    def __init__(self, **shapes: tuple[int, ...]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape))


def _front_end_layout(cfg: DashengConfig) -> nn.Sequential:
    """Holds `0.spectrogram.window` and `0.mel_scale.fb` so the released key names load and save unchanged."""
    mel = nn.Module()
    mel.spectrogram = _Buffers(window=(cfg.win_length,))
    mel.mel_scale = _Buffers(fb=(cfg.n_fft // 2 + 1, cfg.n_mels))
    return nn.Sequential(mel)


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, cfg: DashengConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = _LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLP(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = _LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), additive_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DashengEncoder(nn.Module):
    def __init__(self, cfg: DashengConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if list(cfg.patch_size) != list(cfg.patch_stride) or int(cfg.patch_size[0]) != int(cfg.n_mels):
            raise ValueError("only full-height, non-overlapping patches (Dasheng's 64 x 4) are supported, "
                             f"got patch_size={cfg.patch_size} patch_stride={cfg.patch_stride} n_mels={cfg.n_mels}")
        dim = cfg.embed_dim
        self.front_end = _front_end_layout(cfg)
        self.init_bn = nn.BatchNorm2d(cfg.n_mels, momentum=0.01)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.input_channels, dim, kernel_size=tuple(cfg.patch_size),
                                          stride=tuple(cfg.patch_stride))
        self.time_pos_embed = nn.Parameter(torch.randn(1, dim, 1, cfg.patches_per_chunk) * 0.02)
        self.freq_pos_embed = nn.Parameter(torch.randn(1, dim, 1, 1) * 0.02)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    @staticmethod
    def valid_patches(mel_frames: torch.Tensor, frames_per_patch: int = 4) -> torch.Tensor:
        """Patches whose keys are visible: samples // (hop * 4) == (frames - 1) // 4 for center=True frames."""
        return (mel_frames - 1) // frames_per_patch

    def forward(self, mel: torch.Tensor, valid_patches: torch.Tensor | None = None,
                min_valid: int | None = None) -> torch.Tensor:
        """mel [B, n_mels, frames] (dB) -> tokens [B, frames // 4, embed_dim]. valid_patches [B] masks padding
        keys; None means no item is padded. `min_valid` = valid_patches.min() known on the host: which chunks
        need a mask is then decided without reading the device."""
        dtype = self.time_pos_embed.dtype
        # BatchNorm over mel bins: the reference moves the bins into the channel axis (b 1 f t -> b f 1 t).
        x = self.init_bn(mel.to(dtype).unsqueeze(2)).transpose(1, 2)
        x = self.patch_embed.proj(x)  # [B, D, 1, T']
        B, D, _, T = x.shape
        step = self.cfg.patches_per_chunk
        outs = []
        for start in range(0, T, step):
            chunk = x[..., start: start + step]
            t = chunk.shape[-1]
            chunk = chunk + self.time_pos_embed[..., :t] + self.freq_pos_embed
            h = chunk.flatten(2).transpose(1, 2)  # [B, t, D]
            mask = None
            if valid_patches is not None:
                keys = torch.arange(start, start + t, device=x.device).view(1, t) < valid_patches.view(B, 1)
                padded = start + t > min_valid if min_valid is not None else not bool(keys.all())
                if padded:
                    mask = torch.zeros(B, 1, 1, t, dtype=h.dtype, device=h.device)
                    mask.masked_fill_(~keys.view(B, 1, 1, t), torch.finfo(h.dtype).min)
            for block in self.blocks:
                h = block(h, mask)
            outs.append(self.norm(h))
        return torch.cat(outs, dim=1)


class FrameStackProjector(nn.Module):
    """MiDashengLM's AudioProjectorSubsample: drop the trailing `T % k` tokens, stack k consecutive tokens
    ([B, T/k, k*D]), then Linear -> GELU -> Linear to the LLM width. Keys `net.0.*`, `net.2.*`."""

    def __init__(self, in_dim: int, out_dim: int, k: int = 5, bias: bool = True) -> None:
        super().__init__()
        self.k = k
        self.net = nn.Sequential(nn.Linear(in_dim * k, out_dim, bias=bias), nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        usable = T - T % self.k
        return self.net(x[:, :usable].reshape(B, usable // self.k, self.k * D))
