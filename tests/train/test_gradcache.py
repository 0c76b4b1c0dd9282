"""GradCache equals the uncached full-batch computation: loss and every trainable gradient, float64,
for each recipe (WAVE fusion head, Vela last token, ALM2Vec EOS projection with learnable temperature and
false-negative margin) and chunk sizes 1, 3 and B; dropout masks replayed per chunk."""

from __future__ import annotations

import pytest
import torch
from train_helpers import pair_items, perturb_lora

from wave_rt.embed.processor import WaveProcessor, load_tokenizer
from wave_rt.model.loading import load_wave_model
from wave_rt.train.adapters import add_lora, set_trainable
from wave_rt.train.encode import embed_items
from wave_rt.train.gradcache import chunked, full_batch_step, gradcache_step
from wave_rt.train.objective import ContrastiveLoss
from wave_rt.train.recipes import get_train_recipe
from wave_rt.train.trainer import enable_activation_checkpointing

B = 7


def _setup(tiny_ckpts, recipe_name: str, dtype=torch.float64, lora_dropout: float = 0.0, attn_dropout: float = 0.0):
    pytest.importorskip("peft", reason="LoRA recipes need peft (a dev dependency: pip install peft)")
    recipe = get_train_recipe(recipe_name, {"lora_r": 4, "lora_alpha": 8, "lora_dropout": lora_dropout})
    ckpt = tiny_ckpts[recipe.pooling]
    model, config = load_wave_model(ckpt, dtype=dtype)
    config.text_config.attention_dropout = attn_dropout
    add_lora(model, recipe)
    model.to(dtype)
    perturb_lora(model)
    names = set_trainable(model, recipe)
    model.train()
    loss = ContrastiveLoss(recipe.temperature, recipe.learnable_temperature, recipe.symmetric,
                           recipe.false_negative_margin).to(dtype)
    processor = WaveProcessor(config, load_tokenizer(ckpt))
    queries, targets = pair_items(B, seed=1, with_audio=not recipe.text_only)
    prepared = ([processor.prepare(q) for q in queries], [processor.prepare(t) for t in targets])
    pad = processor.ids["pad"]
    return model, loss, prepared, pad, names


def _grads(model, loss) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for n, p in loss.named_parameters():
        out["loss." + n] = p.grad.detach().clone()
    return out


def _zero(model, loss) -> None:
    for p in list(model.parameters()) + list(loss.parameters()):
        p.grad = None


def _run(step, model, loss, prepared, pad, chunk: int, seed: int = 0):
    _zero(model, loss)
    torch.manual_seed(seed)
    sides = [chunked(prepared[0], chunk), chunked(prepared[1], chunk)]
    value = step(lambda c: embed_items(model, c, pad), sides, loss)
    return value, _grads(model, loss)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("recipe_name", ["wave", "vela", "alm2vec"])
def test_gradcache_equals_full_batch_float64(tiny_ckpts, recipe_name):
    model, loss, prepared, pad, names = _setup(tiny_ckpts, recipe_name)
    ref_loss, ref_grads = _run(full_batch_step, model, loss, prepared, pad, chunk=B)
    assert any(".lora_A" in n for n in names) and any(".lora_B" in n for n in names)
    if recipe_name == "wave":
        assert any(n.startswith("classify_linear.") for n in names)
    if recipe_name == "alm2vec":
        assert any(n.startswith("eos_proj.") for n in names) and "loss.log_temperature" in ref_grads
    assert not any(n.startswith(("audio_tower.", "visual.")) for n in names)  # encoders frozen
    for g in ref_grads.values():
        assert g.abs().max() > 0  # every gradient is non-trivial, so equality means something
    for chunk in (1, 3, B):
        got_loss, got_grads = _run(gradcache_step, model, loss, prepared, pad, chunk=chunk)
        assert _rel(got_loss, ref_loss) <= 1e-6, (chunk, float(got_loss), float(ref_loss))
        assert got_grads.keys() == ref_grads.keys()
        for n in ref_grads:
            assert _rel(got_grads[n], ref_grads[n]) <= 1e-6, (recipe_name, chunk, n)


def test_gradcache_replays_dropout_per_chunk(tiny_ckpts):
    """With dropout on, the cached gradient belongs to the re-run forward only if the masks match: GradCache
    equals the graph-keeping run of the same chunks from the same seed, and differs from a run whose
    chunks draw different masks (so the check would catch a missing RNG replay)."""
    model, loss, prepared, pad, _ = _setup(tiny_ckpts, "wave", lora_dropout=0.3, attn_dropout=0.2)
    ref_loss, ref_grads = _run(full_batch_step, model, loss, prepared, pad, chunk=3, seed=5)
    got_loss, got_grads = _run(gradcache_step, model, loss, prepared, pad, chunk=3, seed=5)
    assert _rel(got_loss, ref_loss) <= 1e-6
    for n in ref_grads:
        assert _rel(got_grads[n], ref_grads[n]) <= 1e-6, n
    other_loss, _ = _run(full_batch_step, model, loss, prepared, pad, chunk=3, seed=6)
    assert _rel(other_loss, ref_loss) > 1e-6  # dropout really is active


def test_gradcache_float32_kernel_matches_float64():
    """The production path (float32, the info_nce kernel) against the float64 reference on the same
    embeddings: a plain linear encoder, so that only the loss path differs."""
    torch.manual_seed(0)
    w64 = torch.randn(16, 12, dtype=torch.float64, requires_grad=True)
    xq, xd = torch.randn(11, 16, dtype=torch.float64), torch.randn(11, 16, dtype=torch.float64)
    loss64 = ContrastiveLoss(0.05, learnable_temperature=True, false_negative_margin=0.2).double()

    def enc(w):
        return lambda x: torch.nn.functional.normalize(x @ w, dim=-1)

    ref = full_batch_step(enc(w64), [chunked(xq, 11), chunked(xd, 11)], loss64)
    w32 = w64.detach().float().requires_grad_(True)
    loss32 = ContrastiveLoss(0.05, learnable_temperature=True, false_negative_margin=0.2)
    got = gradcache_step(enc(w32), [chunked(xq.float(), 4), chunked(xd.float(), 4)], loss32)
    assert abs(float(got) - float(ref)) <= 1e-5 * abs(float(ref))
    assert _rel(w32.grad.double(), w64.grad) <= 1e-4
    assert _rel(loss32.log_temperature.grad.double(), loss64.log_temperature.grad) <= 1e-4


def _saved_bytes(model, items, pad) -> int:
    """Bytes autograd keeps for the backward of one graph forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        embed_items(model, items, pad)
    return total[0]


def test_gradient_checkpointing_keeps_gradients(tiny_ckpts):
    """run.gradient_checkpointing recomputes the decoder layers in the backward: less kept for the backward,
    the same loss and gradients."""
    model, loss, prepared, pad, _ = _setup(tiny_ckpts, "wave")
    ref_loss, ref_grads = _run(gradcache_step, model, loss, prepared, pad, chunk=3)
    kept = _saved_bytes(model, prepared[0], pad)
    enable_activation_checkpointing(model)
    assert _saved_bytes(model, prepared[0], pad) < kept
    got_loss, got_grads = _run(gradcache_step, model, loss, prepared, pad, chunk=3)
    assert _rel(got_loss, ref_loss) <= 1e-12
    for n in ref_grads:
        assert _rel(got_grads[n], ref_grads[n]) <= 1e-10, n
