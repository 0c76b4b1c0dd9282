"""The one FLOP model: hand-counted small cases, real tokens only, the trimmed last layer, window sums."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import tiny_thinker_config_dict
from torch import nn

from wave_rt.config import WaveConfig
from wave_rt.model import flops as fl
from wave_rt.model.wave_model import WaveModel


@pytest.fixture(scope="module")
def model(tiny_token_ids):
    return WaveModel.build(WaveConfig.from_dict(tiny_thinker_config_dict(tiny_token_ids)), seed=0)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_decoder_flops_by_hand(model):
    lm = model.model
    shape = fl.DecoderShape.of(lm)
    p = _params(lm) - lm.embed_tokens.weight.numel()
    assert shape.nonembedding_params == p and shape.layers == len(lm.layers)
    width = lm.layers[0].self_attn.q_proj.out_features
    lengths = [3, 17]
    expected = sum(2 * p * t + 2 * len(lm.layers) * t * t * width for t in lengths)
    assert fl.decoder_flops(lengths, shape) == expected
    # trimmed last layer: one layer's work for all tokens except its K/V projections, plus the full attention
    layer = lm.layers[-1]
    kv = _params(layer.self_attn.k_proj) + _params(layer.self_attn.v_proj)
    saved = sum(2 * (_params(layer) - kv) * (t - 1) + 2 * t * t * width - 4 * t * width for t in lengths)
    assert fl.decoder_flops(lengths, shape, last_layer_trimmed=True) == pytest.approx(expected - saved)
    # bidirectional recipes (mean pooling over every token): the whole square, no trimmed last layer
    full = sum(2 * p * t + 4 * len(lm.layers) * t * t * width for t in lengths)
    assert fl.decoder_flops(lengths, shape, causal=False) == full
    assert fl.decoder_flops(lengths, shape, last_layer_trimmed=True, causal=False) == full
    # quadratic in the item length: one item of 2T costs more than two items of T (why padding/packing matters)
    assert fl.decoder_flops([20], shape) > fl.decoder_flops([10, 10], shape)


def test_encoder_flops_count_windows(model):
    tower = model.audio_tower
    win = 2 * tower.config.n_window
    one = fl.whisper_flops([win], tower)
    assert fl.whisper_flops([win, win], tower) == pytest.approx(2 * one)
    # one segment of two windows = two segments of one window (attention is per window)
    assert fl.whisper_flops([2 * win], tower) == pytest.approx(2 * one, rel=1e-9)
    visual = model.visual
    g = fl.vision_flops([(2, 8, 8)], visual)
    assert g == pytest.approx(2 * fl.vision_flops([(1, 8, 8)], visual))
    assert fl.vision_flops([(1, 16, 16)], visual) > 4 * fl.vision_flops([(1, 8, 8)], visual) * 0.99


def test_mfu_padding_and_datasheet():
    assert fl.mfu(2e12, 1.0, 4.0) == pytest.approx(0.5)
    assert fl.mfu(1.0, 1.0, None) is None
    assert fl.padding_fraction(100, 143) == pytest.approx(1.43)
    assert fl.datasheet_peak("NVIDIA H100 80GB HBM3") == 989.0 and fl.datasheet_peak("cpu") is None
    assert fl.measure_gemm_tflops(torch.device("cpu")) is None


def test_beats_flops_leave_out_the_unused_predictor():
    # a fine-tuned checkpoint carries the AudioSet classifier; the embedding forward never runs it
    import dataclasses

    from wave_rt.model.beats import BEATsConfig, BEATsEncoder

    cfg = BEATsConfig.tiny()
    with_head = BEATsEncoder(cfg)
    without = BEATsEncoder(dataclasses.replace(cfg, finetuned_model=False))
    assert with_head.predictor is not None and without.predictor is None
    assert fl.beats_flops([8, 40], with_head) == fl.beats_flops([8, 40], without) > 0
