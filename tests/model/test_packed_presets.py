"""Every preset runs the packed hot path, and it equals the padded reference forward (fp32, tiny random weights):
for each preset and each modality its model embeds, in mixed-length batches with odd lengths, through the
preset's own processor and templates. Bidirectional + mean pooling (Omni-Embed-Nemotron) on the packed path is
batch- and padding-invariant, and the packed forward leaves no preallocated row unwritten. encode() takes the
packed path for every preset (checked by counting which forward ran, not by timing).

The audio-visual item of the `wave` preset goes through the packed path in test_model_packed (its hand-built AV
case); here the processor would need an encoded media file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_checkpoints import make_tiny_checkpoint
from torch.overrides import TorchFunctionMode

from wave_rt import Audio, Text, Video
from wave_rt.embed.encoder import WaveEncoder
from wave_rt.model.batch import PackedBatch, PaddedBatch
from wave_rt.model.embedder_presets import PRESETS, get_preset

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# (checkpoint kind, preset= argument: None where the checkpoint's layout names the preset)
CHECKPOINTS = {
    "wave": (dict(recipe="all_layer", use_beats=True), None),
    "vela": (dict(recipe="last_token", use_beats=False, backbone="qwen2_audio"), "vela"),
    "alm2vec": (dict(recipe="eos_projection", use_beats=False, backbone="midashenglm"), None),
    "lco-omni": (dict(recipe="last_token", use_beats=False), "lco-omni"),
    "e5-omni": (dict(recipe="last_token", use_beats=False), "e5-omni"),
    "omni-embed-nemotron": (dict(recipe="last_token", use_beats=False), "omni-embed-nemotron"),
}


@pytest.fixture(scope="module", params=sorted(PRESETS))
def encoder(request, tmp_path_factory) -> WaveEncoder:
    name = request.param
    kw, preset = CHECKPOINTS[name]
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(name.replace("-", "_")), seed=11, **kw)
    enc = WaveEncoder.from_pretrained(path, device="cpu", dtype="fp32", preset=preset)
    assert enc.config.preset == name
    return enc


def _items(modalities: tuple[str, ...]) -> list:
    """One item per modality with media of odd lengths, plus texts of very different (odd) token counts and both
    sides, so that every batch mixes lengths and heads."""
    rng = np.random.default_rng(3)
    out: list = ["a", Text("the quick brown fox jumps over the lazy dog " * 9 + "again", side="query"),
                 "three short words"]
    if "audio" in modalities:
        out += [Audio((0.3 * rng.standard_normal(n)).astype(np.float32), sample_rate=16000) for n in (27_777, 43_217)]
    if "video" in modalities:
        out.append(Video(rng.integers(0, 255, size=(5, 56, 84, 3), dtype=np.uint8), fps=2.0))
    return out


class _Counter:
    """Counts the packed and padded forwards a model runs (which path encode() took)."""

    def __init__(self, model, monkeypatch) -> None:
        self.seen: list[str] = []
        forward = type(model).forward

        def spy(this, batch):
            self.seen.append("packed" if isinstance(batch, PackedBatch) else "padded")
            assert isinstance(batch, (PackedBatch, PaddedBatch))
            return forward(this, batch)

        monkeypatch.setattr(type(model), "forward", spy)


def test_packed_equals_padded_for_every_modality(encoder):
    preset = get_preset(encoder.config.preset)
    items = _items(preset.modalities)
    prepared = [encoder.prepare(it) for it in items]
    lengths = [p.num_tokens for p in prepared]
    assert len(set(lengths)) == len(lengths) and any(n % 2 for n in lengths), lengths
    assert encoder.packed, f"{preset.name} must run the packed path"
    padded_enc = WaveEncoder(encoder.model, encoder.processor, packed=False)
    ours = encoder.embed_prepared(prepared, normalize=False)
    reference = padded_enc.embed_prepared(prepared, normalize=False)
    assert ours.shape == reference.shape == (len(items), encoder.dim)
    for k, it in enumerate(items):
        assert rel(ours[k], reference[k]) <= TOL, (preset.name, type(it).__name__, rel(ours[k], reference[k]))


def test_encode_takes_the_packed_path(encoder, monkeypatch):
    items = _items(get_preset(encoder.config.preset).modalities)
    counter = _Counter(encoder.model, monkeypatch)
    encoder.encode(items, normalize=False, convert_to="torch")
    assert counter.seen and set(counter.seen) == {"packed"}, counter.seen
    counter.seen.clear()
    WaveEncoder(encoder.model, encoder.processor, packed=False).encode(items[:2], convert_to="torch")
    assert set(counter.seen) == {"padded"}  # the counter tells the two paths apart


class _PoisonEmpty(TorchFunctionMode):
    """Every uninitialised allocation (torch.empty*, Tensor.new_empty) comes back full of NaN: a row the code
    allocates but never writes then shows up in the output."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.empty, torch.empty_like, torch.Tensor.new_empty) and out.is_floating_point():
            out.fill_(math.nan)
        return out


def test_packed_output_has_no_unwritten_rows(encoder):
    prepared = [encoder.prepare(it) for it in _items(get_preset(encoder.config.preset).modalities)]
    clean = encoder.embed_prepared(prepared, normalize=False)
    batch = encoder.stage(prepared)
    with torch.no_grad(), _PoisonEmpty():
        poisoned = encoder.model(batch)
    assert torch.isfinite(poisoned).all()
    assert torch.equal(poisoned.float(), clean)


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory) -> WaveEncoder:
    kw, preset = CHECKPOINTS["omni-embed-nemotron"]
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("nemotron"), seed=12, **kw)
    return WaveEncoder.from_pretrained(path, device="cpu", dtype="fp32", preset=preset)


def test_bidirectional_mean_packed_is_batch_and_padding_invariant(nemotron):
    """An item alone equals the same item in a mixed packed batch, in any order; and equals the padded forward of
    itself alone (no padding at all there): the packed path neither leaks across items nor depends on them."""
    assert nemotron.packed and nemotron.config.recipe.pooling == "mean"
    items = _items(("text", "audio", "video"))
    prepared = [nemotron.prepare(it) for it in items]
    together = nemotron.embed_prepared(prepared, normalize=False)
    backwards = nemotron.embed_prepared(prepared[::-1], normalize=False).flip(0)
    padded_enc = WaveEncoder(nemotron.model, nemotron.processor, packed=False)
    for k, p in enumerate(prepared):
        alone = nemotron.embed_prepared([p], normalize=False)[0]
        unpadded = padded_enc.embed_prepared([p], normalize=False)[0]
        assert rel(together[k], alone) <= TOL, (k, rel(together[k], alone))
        assert rel(backwards[k], alone) <= TOL, (k, rel(backwards[k], alone))
        assert rel(alone, unpadded) <= TOL, (k, rel(alone, unpadded))


def test_bidirectional_mean_differs_from_causal_last_on_the_packed_path(nemotron):
    """The options are not no-ops on the packed path: the same weights under causal + last give another vector,
    and so do bidirectional + last and causal + mean."""
    from dataclasses import replace

    prepared = [nemotron.prepare(it) for it in ["three short words", "a much longer text than that one is"]]
    batch = nemotron.stage(prepared)
    model = nemotron.model
    base = nemotron.config.recipe
    outs = {}
    try:
        for pooling in ("last", "mean"):
            for attention in ("causal", "bidirectional"):
                model.config.recipe = replace(base, pooling=pooling, attention=attention)
                with torch.no_grad():
                    outs[pooling, attention] = model(batch)
    finally:
        model.config.recipe = base
    keys = list(outs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert rel(outs[a], outs[b]) > 1e-3, (a, b)
