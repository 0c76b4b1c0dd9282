"""Deferred features: a batch of prepared items that carry decoded waveforms and uint8 frames (WaveProcessor with
defer_features) -> the same items with their features, computed on one device in batched calls.

On a GPU this moves the feature work off the prepare stage's CPU (Whisper log-mel and BEATs fbank via torch.stft /
torch.fft, Pillow-exact bicubic resize, normalization and patch layout) into the model stage, right before
collation, so that collate / collate_packed see exactly the tensors the eager per-item path gives them. The CPU
path (WaveProcessor without defer_features) stays the reference and the fallback; tests hold the two equal.

One batched call per feature kind: every deferred audio segment of the batch goes through one whisper_log_mel and
one beats_fbank call (rows zero-padded to the longest, each row cut back to its own frame count, which is what the
per-item path computes); every video goes through one resize call per decoded frame size and one
normalize/patchify call per target size. Two exceptions keep padding waste bounded: rows whose length differs by
more than LENGTH_SPREAD times go to separate calls, and rows that reach the end of Whisper's 300 s window (which
make whisper_log_mel compute the whole window for every row of the call) get a call of their own.

Bytes held per deferred item instead of features (what the prepare stage's queues carry):
- audio: float32 samples at 16 kHz, 64,000 B/s, against 51,200 B/s of log-mel plus 51,200 B/s of fbank (WAVE with
  BEATs: 0.63x) or 51,200 B/s of log-mel alone (Whisper-only models: 1.25x, raw audio is the larger one).
- video: uint8 frames at their decoded size, 3 B per pixel, against 12 B per target pixel of float32 patches
  (1176 floats per 2 frames x 14 x 14 pixels): 4x smaller when frames are decoded at their target size, larger
  when the decoded frames exceed 4x the target area (1080p frames resized to the 176,400-pixel cap: 2.9x larger).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from wave_rt.config import WaveConfig
from wave_rt.media import features_audio as fa
from wave_rt.media import features_video as fv
from wave_rt.model.batch import AudioSegmentInputs, ItemInputs

LENGTH_SPREAD = 4.0  # longest / shortest row of one audio call: bounds the zero padding each call computes on
RESIZE_CHUNK = {"cpu": 8, "cuda": 32}  # frames per resize pass: bounds the int32 intermediates


def featurize_batch(items: Sequence[ItemInputs], config: WaveConfig, device: torch.device | str = "cpu",
                    cpu_native: bool = True) -> list[ItemInputs]:
    """Items with every deferred feature computed on `device` (float32 there; items without deferred parts are
    returned as they are). The result collates (collate / collate_packed) to the tensors of the eager path.
    `cpu_native`: on the CPU, videos go through the native fused kernel per video (the eager path's, much faster
    there than the torch resize) when it is built; False runs the batched torch path the GPU runs."""
    device = torch.device(device)
    out = [replace(it, audio=list(it.audio)) for it in items]
    _featurize_audio(out, config, device)
    _featurize_video(out, device, cpu_native and device.type == "cpu" and fv.has_native())
    return out


def _to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One host->device copy for many host tensors of one dtype (pinned and non-blocking on CUDA)."""
    if device.type == "cpu" or not tensors:
        return [t.to(device) for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = flat.pin_memory().to(device, non_blocking=True)
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _length_groups(lengths: list[int], full_chunk: list[bool]) -> list[list[int]]:
    """Row indices in calls: sorted by length, a new call where a row is LENGTH_SPREAD times the call's shortest
    or where Whisper's whole-window rows begin."""
    order = sorted(range(len(lengths)), key=lambda i: (full_chunk[i], lengths[i]))
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g and full_chunk[g[0]] == full_chunk[i] and lengths[i] <= LENGTH_SPREAD * max(1, lengths[g[0]]):
            g.append(i)
        else:
            groups.append([i])
    return groups


def _featurize_audio(items: list[ItemInputs], config: WaveConfig, device: torch.device) -> None:
    where = [(i, k) for i, it in enumerate(items) for k, s in enumerate(it.audio) if s.waveform is not None]
    if not where:
        return
    waves = _to_device([items[i].audio[k].waveform.to(torch.float32) for i, k in where], device)
    lengths = [int(w.numel()) for w in waves]
    mels: list[torch.Tensor | None] = [None] * len(waves)
    fbanks: list[torch.Tensor | None] = [None] * len(waves)
    for group in _length_groups(lengths, [fa.whisper_full_chunk(n) for n in lengths]):
        feats, _ = fa.whisper_log_mel([waves[j] for j in group])
        for r, j in enumerate(group):
            # The whole segment's frames: its valid frames (Qwen2-Audio: the padded 30 s window's frames).
            mels[j] = feats[r, :, : fa.whisper_frames(lengths[j])]
    if config.use_beats:
        for group in _length_groups(lengths, [False] * len(lengths)):
            rows = fa.beats_fbank([waves[j] for j in group])
            for r, j in enumerate(group):
                fbanks[j] = rows[r]
    for (i, k), mel, fbank in zip(where, mels, fbanks):
        seg = items[i].audio[k]
        items[i].audio[k] = AudioSegmentInputs(mel, seg.mel_len, seg.tokens, fbank)


def _featurize_video(items: list[ItemInputs], device: torch.device, native: bool) -> None:
    videos = [i for i, it in enumerate(items) if it.frames is not None]
    if not videos:
        return
    if native:
        for i in videos:
            it = items[i]
            t, (h, w) = fv.pad_temporal(it.frames).shape[0], it.frame_size
            out = torch.empty(t // fv.TEMPORAL * (h // fv.PATCH) * (w // fv.PATCH), fv.PATCH_DIM)
            items[i] = replace(it, pixel_values=fv.patchify_native(it.frames, h, w, out), frames=None, frame_size=None)
        return
    frames = _to_device([fv.pad_temporal(items[i].frames) for i in videos], device)
    # Resize: one call per (decoded size, target size); normalize + patchify: one call per target size.
    by_size: dict[tuple[tuple[int, int], tuple[int, int]], list[int]] = {}
    for j, i in enumerate(videos):
        by_size.setdefault(((int(frames[j].shape[1]), int(frames[j].shape[2])), items[i].frame_size), []).append(j)
    chunk = RESIZE_CHUNK.get(device.type, 8)
    resized: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for (_, (height, width)), group in by_size.items():
        x = torch.cat([frames[j] for j in group]) if len(group) > 1 else frames[group[0]]
        x = fv.resize_bicubic_pil(x, height, width, chunk=chunk)
        starts = 0
        for j in group:
            n = int(frames[j].shape[0])
            resized.setdefault((height, width), []).append((j, x[starts: starts + n]))
            starts += n
    pixels: dict[int, torch.Tensor] = {}
    for (height, width), parts in resized.items():
        x = torch.cat([p for _, p in parts]) if len(parts) > 1 else parts[0][1]
        patches = fv.normalize_patchify(x)
        per_frame_pair = (height // fv.PATCH) * (width // fv.PATCH)
        start = 0
        for j, p in parts:
            n = int(p.shape[0]) // fv.TEMPORAL * per_frame_pair
            pixels[j] = patches[start: start + n]
            start += n
    for j, i in enumerate(videos):
        items[i] = replace(items[i], pixel_values=pixels[j], frames=None, frame_size=None)
