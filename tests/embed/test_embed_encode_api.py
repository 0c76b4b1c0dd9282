"""encode(): order restored, single items, conversion, normalization, typed errors naming the item."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_checkpoints import make_tiny_checkpoint

import wave_rt
from wave_rt.embed.encoder import WaveEncoder, similarity
from wave_rt.errors import BatchTooLargeError, InputError, UnsupportedItemError

TEXTS = ["a dog barks in the distance", "rain", "an orchestra tunes up before the concert begins", "x" * 70,
         "two people talk", "wind through trees at night", "a", "glass breaks"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> WaveEncoder:
    return WaveEncoder.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("m"), use_beats=False, seed=3))


def test_order_restored_whatever_the_batching(encoder):
    alone = np.stack([encoder.encode(t) for t in TEXTS])
    for kwargs in ({}, {"batch_size": 3}, {"max_batch_tokens": 64}, {"max_batch_tokens": 1}):
        out = encoder.encode(TEXTS, **kwargs)
        assert out.shape == (len(TEXTS), encoder.dim)
        np.testing.assert_allclose(out, alone, rtol=0, atol=2e-6)


def test_normalize_and_conversions(encoder):
    out = encoder.encode(TEXTS, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    raw = encoder.encode(TEXTS, normalize=False, convert_to="torch")
    assert isinstance(raw, torch.Tensor) and raw.dtype == torch.float32
    np.testing.assert_allclose(torch.nn.functional.normalize(raw, dim=-1).numpy(), out, atol=1e-6)
    as_list = encoder.encode(TEXTS[:2], convert_to=None)
    assert isinstance(as_list, list) and len(as_list) == 2
    sim = similarity(out, out)
    assert sim.shape == (len(TEXTS), len(TEXTS)) and np.allclose(np.diag(sim), 1.0, atol=1e-5)
    assert isinstance(similarity(raw, raw), torch.Tensor)


def test_text_sides_and_instruction(encoder):
    target = encoder.encode("a dog barks")
    assert np.array_equal(target, encoder.encode("a dog barks", instruction="ignored for text targets"))
    q1 = encoder.encode(wave_rt.Text("a dog barks", side="query"), instruction="Find the sound of this.")
    q2 = encoder.encode(wave_rt.Text("a dog barks", side="query"), instruction="Retrieve a matching video.")
    assert not np.allclose(q1, target) and not np.allclose(q1, q2)


def test_template_tokens(encoder):
    p = encoder.prepare("hi")
    tok = encoder.processor.tokenizer
    assert tok.decode(p.inputs.input_ids.tolist(), skip_special_tokens=False) == "hi<|im_end|>"
    q = encoder.prepare(wave_rt.Text("hi", side="query"), instruction="Find it.")
    assert tok.decode(q.inputs.input_ids.tolist(), skip_special_tokens=False) == "Find it.\nhi<|im_end|>"
    assert p.inputs.input_ids[-1] == encoder.processor.ids["im_end"]


@pytest.mark.parametrize("bad, error, text", [
    (42, UnsupportedItemError, "item 2 42: unsupported item type int"),
    (wave_rt.Text(""), InputError, "empty text"),
    (wave_rt.Text("ok", side="middle"), InputError, "Text.side"),
    (wave_rt.Audio(np.zeros((2, 3, 4), dtype=np.float32), sample_rate=16000), InputError, "waveform must be"),
    (wave_rt.Audio(np.zeros(100, dtype=np.float32)), InputError, "sample_rate"),
    (wave_rt.Audio(np.array([0.0, np.nan], dtype=np.float32), sample_rate=16000), InputError, "NaN"),
    (wave_rt.Video(np.zeros((4, 8, 8), dtype=np.uint8)), InputError, "frames must be uint8"),
    (wave_rt.Audio(3.5), InputError, "source must be a path"),
])
def test_bad_items_raise_typed_errors_naming_them(encoder, bad, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")) as info:
        encoder.encode(["fine", "also fine", bad])
    assert info.value.index == 2


def test_packed_encode_equals_padded_encode(encoder):
    """encode() packs by default; the padded reference path gives the same embeddings, batch by batch."""
    padded = WaveEncoder(encoder.model, encoder.processor, weights_id="same", packed=False)
    assert encoder.packed and not padded.packed
    for kwargs in ({}, {"max_batch_tokens": 40}):
        np.testing.assert_allclose(encoder.encode(TEXTS, **kwargs), padded.encode(TEXTS, **kwargs), rtol=0, atol=2e-6)


def test_bad_call_arguments_are_clear_errors(encoder):
    with pytest.raises(UnsupportedItemError, match="got None"):
        encoder.encode(None)
    for kw in ({"max_batch_tokens": 0}, {"batch_size": -1}, {"max_batch_tokens": 1.5}, {"batch_size": True}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            encoder.encode(["a"], **kw)
    a = encoder.encode(["a", "b"])
    with pytest.raises(ValueError, match=r"\(2, 64\) and \(2, 32\)"):
        wave_rt.similarity(a, a[:, :32])


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("simulated"), BatchTooLargeError("no engine profile")])
def test_out_of_memory_lowers_the_cap_for_the_batches_after_it(encoder, monkeypatch, error):
    # a forward of more than 2 items "runs out of memory": the result is unchanged, and once the cap is lowered
    # the later batches go by it at once instead of each failing at full size first (8 failures, was)
    texts = [("word " * (i % 7 + 1)).strip() + f" {i}" for i in range(40)]
    want = encoder.encode(texts)
    failures, forwards = [], []
    real_launch = encoder.launch

    def items(batch):
        return int(batch.input_ids.shape[0]) if hasattr(batch, "input_ids") and batch.input_ids.dim() == 2 \
            else len(batch.cu_seqlens) - 1

    def launch(model_batch, normalize=True):
        n = items(model_batch)
        if n > 2:
            failures.append(n)
            raise error
        forwards.append(n)
        return real_launch(model_batch, normalize)

    monkeypatch.setattr(encoder, "launch", launch)
    monkeypatch.setattr(encoder, "embed_prepared", lambda batch, normalize=True: launch(encoder.stage(batch), normalize))
    got = encoder.encode(texts, batch_size=8)
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert sum(forwards) == len(texts)
    assert len(failures) <= 4, failures


def test_an_item_too_large_for_the_engine_alone_is_reported(encoder, monkeypatch):
    real_launch = encoder.launch

    def launch(model_batch, normalize=True):
        if int(model_batch.input_ids.numel()) > 40:
            raise BatchTooLargeError("decoder.plan: no optimization profile holds input shapes")
        return real_launch(model_batch, normalize)

    monkeypatch.setattr(encoder, "launch", launch)
    monkeypatch.setattr(encoder, "embed_prepared", lambda batch, normalize=True: launch(encoder.stage(batch), normalize))
    with pytest.raises(BatchTooLargeError, match="no optimization profile"):
        encoder.encode(["short", "word " * 60])
