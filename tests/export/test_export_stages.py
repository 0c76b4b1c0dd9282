"""The export-friendly stage modules compute what the runtime's modules compute (eager, no export): the
chunked audio tower vs transformers' Qwen2.5-Omni audio tower, BEATs + merge vs WaveModel.encode_beats, the
vision stage vs transformers' vision tower, on lengths and grids chosen to hit chunk edges."""

from __future__ import annotations

import pytest
import torch
from wave_rt.export.stages import StageInputs, stage_specs

from wave_rt.embed.processor import whisper_tokens
from wave_rt.model.batch import AudioSegmentInputs, ItemInputs, collate
from wave_rt.model.loading import load_wave_model


@pytest.fixture(scope="module")
def model(wave_checkpoint):
    return load_wave_model(wave_checkpoint)[0]


@pytest.fixture(scope="module")
def stages(model):
    return {s.name: s for s in stage_specs(model)}


def _audio_batch(model, frames: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in frames:
        samples = n * 160
        seg = AudioSegmentInputs(torch.randn(128, n, generator=g), n, whisper_tokens(n),
                                 torch.randn(1 + (samples - 400) // 160, 128, generator=g))
        rows.append(ItemInputs(torch.zeros(3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long), True, audio=[seg]))
    return collate(rows, 0)


# n_window = 50 in the tiny config: chunks of 100 frames. Exact multiples, one past, odd, very short.
@pytest.mark.parametrize("frames", [[100], [101, 37], [250, 199, 300], [7]])
def test_audio_tower_stage_equals_transformers(model, stages, frames):
    batch = _audio_batch(model, frames, seed=len(frames))
    host = StageInputs(model.config, model.model.embed_tokens.weight)
    with torch.no_grad():
        want = model.encode_whisper(batch.mel, batch.mel_lens)
        got = stages["audio_tower"].module(**host.audio_tower(batch))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("frames", [[100], [101, 37], [250, 199, 300]])
def test_beats_stage_equals_model(model, stages, frames):
    batch = _audio_batch(model, frames, seed=7)
    host = StageInputs(model.config, model.model.embed_tokens.weight)
    with torch.no_grad():
        want = model.encode_beats(batch.fbank, batch.fbank_padding, batch.audio_tokens)
        got = stages["beats"].module(**host.beats(batch))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("grids", [[(1, 2, 2)], [(2, 4, 6), (1, 8, 4)], [(3, 10, 6), (2, 2, 2), (1, 4, 12)]])
def test_vision_stage_equals_transformers(model, stages, grids):
    g = torch.Generator().manual_seed(len(grids))
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=g)
    grid = torch.tensor(grids)
    rows = [ItemInputs(torch.zeros(1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long), True)]
    batch = collate(rows, 0)
    batch.pixel_values, batch.grid_thw = pixels, grid
    host = StageInputs(model.config, model.model.embed_tokens.weight)
    with torch.no_grad():
        want = model.encode_video(pixels, grid)
        got = stages["vision"].module(**host.vision(batch))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
