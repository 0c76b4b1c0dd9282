"""The embedding forward never keeps the full hidden-state stack, never has an LM head, no KV cache."""

from __future__ import annotations

import weakref

import torch
import wave_reference as ref
from tiny_checkpoints import tiny_thinker_config_dict

from wave_rt.config import WaveConfig
from wave_rt.model.batch import ItemInputs, collate
from wave_rt.model.positions import SequenceBuilder
from wave_rt.model.wave_model import WaveModel


class RetentionSpy:
    """Forward hooks on every decoder layer. When layer k runs, the outputs of layers <= k-2 must already
    be freed: a forward that keeps them (output_hidden_states, a list of layer outputs) is caught."""

    def __init__(self, layers) -> None:
        self.refs: list[weakref.ref] = []
        self.retained: list[int] = []
        self.handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module, args, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        k = len(self.refs)
        self.retained += [j for j, r in enumerate(self.refs[: max(0, k - 1)]) if r() is not None]
        self.refs.append(weakref.ref(out))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _model_and_batch(tiny_token_ids):
    data = tiny_thinker_config_dict(tiny_token_ids, layers=6)
    data.update(train_classify=True, classify_type="all_layer")
    model = WaveModel.build(WaveConfig.from_dict(data), seed=0)
    items = []
    for n in (40, 57, 33):
        sb = SequenceBuilder()
        sb.text(list(range(10, 10 + n)) + [tiny_token_ids["<|im_end|>"]])
        ids, pos = sb.build()
        items.append(ItemInputs(ids, pos, True))
    return model, collate(items, tiny_token_ids["<|endoftext|>"])


def test_forward_frees_each_layer_output(tiny_token_ids):
    model, batch = _model_and_batch(tiny_token_ids)
    spy = RetentionSpy(model.model.layers)
    try:
        with torch.no_grad():
            out = model(batch)
    finally:
        spy.remove()
    assert len(spy.refs) == len(model.model.layers)
    assert spy.retained == [], f"layer outputs kept alive: {sorted(set(spy.retained))}"
    assert out.shape == (3, model.config.hidden_size)


def test_spy_catches_output_hidden_states(tiny_token_ids):
    """The same spy flags transformers' output_hidden_states=True path, so the test above can fail."""
    model, batch = _model_and_batch(tiny_token_ids)
    hf = ref.hf_thinker(model)
    spy = RetentionSpy(ref.thinker_lm(hf).layers)
    try:
        with torch.no_grad():
            ref.thinker_lm(hf)(inputs_embeds=model.model.embed_tokens(batch.input_ids),
                                    attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                                    output_hidden_states=True)
    finally:
        spy.remove()
    assert spy.retained, "the spy must detect a forward that keeps every layer's hidden states"


def test_no_lm_head_and_no_cache(tiny_token_ids):
    model, batch = _model_and_batch(tiny_token_ids)
    vocab = model.config.text_config.vocab_size
    assert not hasattr(model, "lm_head")
    assert not any(name.startswith("lm_head") for name in model.state_dict())
    # the only vocab-sized tensor is the input embedding table
    vocab_sized = [n for n, p in model.named_parameters() if p.shape[0] == vocab]
    assert vocab_sized == ["model.embed_tokens.weight"]
    # any attempt to build a KV cache inside the layers would arrive as past_key_values
    seen = []
    handles = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("past_key_values")), with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    assert seen and all(p is None for p in seen)
