"""Qwen2-VL / Qwen2.5-Omni video features: smart resize to multiples of 28, bicubic resize, rescale 1/255,
CLIP normalization, temporal patch 2, spatial patch 14, 2x2 merge order.

The resize reproduces Pillow's BICUBIC filter bit for bit (8-bit fixed-point coefficients, horizontal pass
then vertical, each rounded to uint8), because that is what the reference pipeline ran: WAVE was trained with
transformers' PIL-based Qwen2VLImageProcessor. torch's own antialiased bicubic (what the torchvision-based
video processor uses) differs from it by 1-2 levels on about 1% of pixels, far beyond the 1e-5 budget.

The native extension (wave_rt._native.resize_normalize_patchify) fuses resize, normalization and the patch
layout in one multi-threaded pass; the torch implementation here is its reference and the GPU path."""

from __future__ import annotations

import functools
import importlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

PATCH = 14
MERGE = 2
TEMPORAL = 2
FACTOR = PATCH * MERGE
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH  # 1176
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_FPS = 2.0  # transformers' Qwen2.5-Omni processor assumes this when no fps is given

# Decode worker processes set this: their pixel values go to the parent through shared memory, so they are
# written there directly (torch would otherwise copy every tensor into shared memory when sending it: ~1/3
# of a worker's time on 6 s 320x240 clips, measured).
SHARED_OUTPUT = False

# Pillow's fixed-point layout for 8-bit images: coefficients scaled by 2**22, accumulators start at 2**21.
PRECISION_BITS = 32 - 8 - 2


@dataclass
class VideoFeatures:
    pixel_values_videos: torch.Tensor  # float32 [N, 1176], N = t * h * w patches
    video_grid_thw: torch.LongTensor  # [3]: (t, h, w) in patches
    video_second_per_grid: float  # temporal_patch_size / fps


MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses longer-to-shorter side ratios above this


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = 784,
                 max_pixels: int = 176400) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as those allow."""
    if min(height, width) <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio must be at most {MAX_ASPECT_RATIO}, got {height}x{width}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


# ---------------------------------------------------------------------------------------------- Pillow bicubic
def _bicubic(x: float) -> float:
    # Keys' cubic with a = -0.5, written in Pillow's evaluation order so doubles round identically.
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=256)
def bicubic_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's resampling table for one axis: (bounds int32 [out, 2] = (first tap, tap count),
    coefficients int32 [out, ksize] in 2**22 fixed point, zero past each tap count)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), dtype=np.int32)
    coeffs = np.zeros((out_size, ksize), dtype=np.int32)
    ss = 1.0 / filterscale
    one = float(1 << PRECISION_BITS)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights = [_bicubic((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = 0.0
        for w in weights:  # sequential sum, as Pillow adds them
            total += w
        for x, w in enumerate(weights):
            v = w / total if total != 0.0 else w
            coeffs[xx, x] = int(-0.5 + v * one) if v < 0 else int(0.5 + v * one)
        bounds[xx] = (xmin, xmax)
    return bounds, coeffs


def _resample_axis(x: torch.Tensor, axis: int, out_size: int) -> torch.Tensor:
    """One Pillow pass along `axis` of a uint8 tensor, exact integer arithmetic."""
    bounds, coeffs = bicubic_coefficients(x.shape[axis], out_size)
    dev = x.device
    first = torch.from_numpy(bounds[:, 0].astype(np.int64)).to(dev)
    ks = coeffs.shape[1]
    acc = None
    shape = [1] * x.ndim
    shape[axis] = out_size
    xi = x.to(torch.int32)
    limit = x.shape[axis] - 1
    for k in range(ks):
        w = torch.from_numpy(np.ascontiguousarray(coeffs[:, k])).to(dev)
        if not bool(w.any()):
            continue
        taps = xi.index_select(axis, torch.clamp(first + k, max=limit))
        term = taps * w.view(shape)
        acc = term if acc is None else acc.add_(term)
    if acc is None:
        acc = torch.zeros_like(xi.index_select(axis, first))
    acc += 1 << (PRECISION_BITS - 1)
    return torch.clamp(acc >> PRECISION_BITS, 0, 255).to(torch.uint8)


def vertical_first(h: int, w: int, height: int, width: int, order: str = "classic") -> bool:
    """Which pass Pillow runs first. Pillow <= 12 ("classic", what WAVE's reference pipeline ran) always
    resamples rows first; Pillow 13 ("pillow13") starts with columns when the height shrinks by more than
    twice as many pixels as the width. The two orders round the intermediate differently, so they differ
    by a few levels only on such tall-shrinking frames."""
    if order == "classic":
        return False
    if order == "pillow13":
        return (h - height) > 0 and (h - height) > 2 * (w - width)
    raise ValueError(f"order must be 'classic' or 'pillow13', got {order!r}")


def resize_bicubic_pil(frames: torch.Tensor, height: int, width: int, chunk: int = 8,
                       order: str = "classic") -> torch.Tensor:
    """uint8 [T, H, W, C] -> [T, height, width, C], equal to Pillow's Image.resize(..., BICUBIC) per frame.
    Works on any device; frames are processed `chunk` at a time to bound the int32 intermediates."""
    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    axes = [(2, width), (1, height)]
    if vertical_first(h, w, height, width, order):
        axes.reverse()
    outs = []
    for s in range(0, t, chunk):
        x = frames[s: s + chunk]
        for axis, size in axes:
            if x.shape[axis] != size:
                x = _resample_axis(x, axis, size)
        outs.append(x)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


@functools.lru_cache(maxsize=1)
def normalize_lut() -> np.ndarray:
    """float32 [3, 256]: the value transformers' numpy path gives a uint8 level per channel
    (rescale in float64 then float32, normalize in float32)."""
    levels = (np.arange(256, dtype=np.float64) * (1.0 / 255.0)).astype(np.float32)
    mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)[:, None]
    std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)[:, None]
    return np.ascontiguousarray((levels[None, :] - mean) / std, dtype=np.float32)


def pad_temporal(frames: torch.Tensor) -> torch.Tensor:
    """Repeat the last frame up to a multiple of the temporal patch, as transformers pads the time axis."""
    if frames.shape[0] % TEMPORAL:
        frames = torch.cat([frames, frames[-1:].expand(TEMPORAL - frames.shape[0] % TEMPORAL, -1, -1, -1)])
    return frames


def normalize_patchify(x: torch.Tensor) -> torch.Tensor:
    """Resized uint8 frames [T, H, W, 3] with T a multiple of the temporal patch -> float32 [N, 1176]: CLIP
    normalization by lookup and the patch layout. Patches are ordered by temporal patch first, so frames of
    several videos concatenated along T give the concatenation of their patches."""
    lut = torch.from_numpy(normalize_lut()).to(x.device)
    t, gh, gw = x.shape[0] // TEMPORAL, x.shape[1] // PATCH, x.shape[2] // PATCH
    # [T, H, W, C] -> values by channel lookup -> [t, tp, C, gh/m, m, p, gw/m, m, p]
    vals = torch.stack([lut[c][x[..., c].long()] for c in range(3)], dim=1)  # [T, C, H, W]
    vals = vals.view(t, TEMPORAL, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    vals = vals.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return vals.reshape(t * gh * gw, PATCH_DIM)


def patchify_reference(frames: torch.Tensor, height: int, width: int, order: str = "classic") -> torch.Tensor:
    """Torch path: resize + normalize + patch layout. uint8 [T, H, W, 3] -> float32 [N, 1176]."""
    return normalize_patchify(pad_temporal(resize_bicubic_pil(frames, height, width, order=order)))


@functools.lru_cache(maxsize=1)
def _native():
    # Cached: looked up once per process (every CPU video asks), so the fallback is also logged only once.
    # The extension is optional (setup.py installs without it when it fails to build), hence info, not warning.
    try:
        native = importlib.import_module("wave_rt._native")
    except ImportError as exc:
        log.info("wave_rt._native is not available (%s): CPU video preprocessing uses the torch implementation "
                 "(same values, slower)", exc)
        return None
    if not hasattr(native, "resize_normalize_patchify"):
        log.info("wave_rt._native (%s) has no resize_normalize_patchify (a stale build?): CPU video "
                 "preprocessing uses the torch implementation (same values, slower)", native.__file__)
        return None
    return native


def has_native() -> bool:
    """Whether the fused native kernel (wave_rt._native) is built."""
    return _native() is not None


def patchify_native(frames: torch.Tensor, height: int, width: int, out: torch.Tensor, order: str = "classic",
                    threads: int | None = None) -> torch.Tensor:
    """The fused native kernel: same result as patchify_reference, written into `out` (float32 [N, 1176])."""
    native = _native()
    if native is None:
        raise RuntimeError("wave_rt._native is not built: pip install -e .")
    _, h, w, _ = frames.shape
    hb, hc = bicubic_coefficients(w, width)
    vb, vc = bicubic_coefficients(h, height)
    native.resize_normalize_patchify(
        frames.contiguous().numpy(), height, width, normalize_lut(), hb, hc, vb, vc, out.numpy(),
        vertical_first(h, w, height, width, order), threads or torch.get_num_threads())
    return out


def video_grid(frames: torch.Tensor, fps: float | None, *, max_pixels: int = 176400,
               min_pixels: int = 784) -> tuple[int, int, tuple[int, int, int]]:
    """Check uint8 frames [T, H, W, 3] and give (target height, target width, (t, h, w) grid in patches): all
    that a video's tokens depend on, known before (and without) computing its pixel values."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {tuple(frames.shape)} {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("a video needs at least one frame")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    t, h, w, _ = frames.shape
    height, width = smart_resize(h, w, FACTOR, min_pixels, max_pixels)
    return height, width, (math.ceil(t / TEMPORAL), height // PATCH, width // PATCH)


def second_per_grid(fps: float | None) -> float:
    """Seconds per temporal patch of frames sampled at `fps` (None: the processor's default 2.0)."""
    return TEMPORAL / (fps if fps is not None else DEFAULT_FPS)


def _empty_pixels(n: int) -> torch.Tensor:
    if not SHARED_OUTPUT:
        return torch.empty((n, PATCH_DIM))
    storage = torch.UntypedStorage._new_shared(n * PATCH_DIM * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, (n, PATCH_DIM), (PATCH_DIM, 1))


def patchify_video(frames: torch.Tensor | np.ndarray, *, max_pixels: int = 176400, min_pixels: int = 784,
                   fps: float | None = None, out: torch.Tensor | None = None) -> VideoFeatures:
    """uint8 frames [T, H, W, 3] -> the Qwen2.5-Omni vision tower's video inputs.

    Equal to transformers' Qwen2-VL processing of the same frames (PIL bicubic). `fps` is the rate the frames
    were sampled at (VideoClip.fps); None means the processor's default 2.0. CPU frames use the native fused
    kernel when it is built; `out` may be a preallocated (e.g. pinned) float32 [N, 1176] CPU buffer to fill.
    CUDA frames are processed on the GPU."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    t, h, w, _ = frames.shape
    height, width, grid = video_grid(frames, fps, max_pixels=max_pixels, min_pixels=min_pixels)
    n = grid[0] * grid[1] * grid[2]
    if out is not None and (tuple(out.shape) != (n, PATCH_DIM) or out.dtype != torch.float32
                            or out.device.type != "cpu" or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous CPU float32 tensor of shape ({n}, {PATCH_DIM})")
    if frames.device.type == "cpu" and has_native():
        pixels = patchify_native(frames, height, width, out if out is not None else _empty_pixels(n))
    else:
        pixels = patchify_reference(frames, height, width)
        if out is not None:
            pixels = out.copy_(pixels)
    return VideoFeatures(
        pixel_values_videos=pixels,
        video_grid_thw=torch.tensor(grid, dtype=torch.long),
        video_second_per_grid=second_per_grid(fps),
    )
