"""trainable = "heads" (only the fusion head trains): text targets skip the head, so their chunks have no graph.
GradCache skips their backward and still equals the full-batch graph (float64), also under FSDP2 on one rank
where the step's last chunks have no graph (the deferred reduce must still happen); the Trainer runs such
steps; data that reaches nothing trainable is a typed error at the first step, before anything is written."""

from __future__ import annotations

import io

import pytest
import torch
from train_helpers import pair_items, train_config, write_text_pairs

from wave_rt.embed.processor import WaveProcessor, load_tokenizer
from wave_rt.model.loading import load_wave_model
from wave_rt.train.adapters import set_trainable
from wave_rt.train.encode import embed_items
from wave_rt.train.gradcache import chunked, full_batch_step, gradcache_step
from wave_rt.train.objective import ContrastiveLoss
from wave_rt.train.recipes import get_train_recipe

B = 7
HEADS = {"name": "wave", "trainable": "heads", "one_task_per_batch": False}


def _heads_model(ckpt, dtype=torch.float64):
    recipe = get_train_recipe("wave", {"trainable": "heads"})
    model, config = load_wave_model(ckpt, dtype=dtype)
    names = set_trainable(model, recipe)
    model.train()
    processor = WaveProcessor(config, load_tokenizer(ckpt))
    return model, names, processor


def _grads(model, params=None) -> dict[str, torch.Tensor]:
    from wave_rt.train.sharding import full_tensor

    params = dict(model.named_parameters()) if params is None else params
    return {n: full_tensor(p.grad).detach().clone() for n, p in params.items() if p.requires_grad and p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def test_heads_only_text_targets_gradcache_equals_full_batch(tiny_ckpts):
    model, names, processor = _heads_model(tiny_ckpts["all_layer"])
    assert names and all(n.startswith("classify_linear.") for n in names)
    loss = ContrastiveLoss(0.05).double()
    queries, targets = pair_items(B, seed=1)  # text and audio queries (through the head), text targets (not)
    prepared = ([processor.prepare(q) for q in queries], [processor.prepare(t) for t in targets])
    pad = processor.ids["pad"]

    def run(step, chunk, **kw):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        value = step(lambda c: embed_items(model, c, pad), [chunked(prepared[0], chunk), chunked(prepared[1], chunk)],
                     loss, **kw)
        return value, _grads(model)

    with torch.no_grad():
        assert not embed_items(model, prepared[1][:2], pad).requires_grad  # text targets reach no head
    ref_loss, ref = run(full_batch_step, B)
    assert ref.keys() == set(names) and all(g.abs().max() > 0 for g in ref.values())
    for chunk in (1, 3, B):
        calls: list[bool] = []
        got_loss, got = run(gradcache_step, chunk, before_backward=calls.append)
        assert _rel(got_loss, ref_loss) <= 1e-12, chunk
        assert got.keys() == ref.keys()
        for n in ref:
            assert _rel(got[n], ref[n]) <= 1e-10, (chunk, n)
        # only the query chunks ran a backward; the last call (the zero re-run) is the only one flagged last
        assert len(calls) == len(chunked(prepared[0], chunk)) + 1 and calls[-1] and not any(calls[:-1]), (chunk, calls)


def test_heads_only_fsdp2_one_rank_reduces_after_gradless_last_chunks(tiny_ckpts):
    """FSDP2 reduces the accumulated gradients only in a backward flagged last; the target chunks (the step's
    last) have no graph, so without the zero re-run the head's gradient would never reach the sharded
    parameters' .grad, which the optimizer holds (model.named_parameters() shows the root's unsharded ones
    until it reshards)."""
    import torch.distributed as dist

    from wave_rt.train.sharding import init_single_rank_group, set_gradient_sync, shard_model

    queries, targets = pair_items(6, seed=4)
    loss = ContrastiveLoss(0.05)

    def grads(sharded: bool) -> dict[str, torch.Tensor]:
        model, _, processor = _heads_model(tiny_ckpts["all_layer"], dtype=torch.float32)
        if sharded:
            shard_model(model, torch.device("cpu"))
        params = dict(model.named_parameters())  # as the optimizer gets them: sharded DTensors under FSDP2
        prepared = ([processor.prepare(q) for q in queries], [processor.prepare(t) for t in targets])
        sides = [chunked(prepared[0], 4), chunked(prepared[1], 4)]
        encode = lambda c: embed_items(model, c, processor.ids["pad"], device=torch.device("cpu"))  # noqa: E731
        if sharded:
            gradcache_step(encode, sides, loss, before_backward=lambda last: set_gradient_sync(model, last))
        else:
            full_batch_step(encode, sides, loss)
        return _grads(model, params)

    want = grads(sharded=False)
    init_single_rank_group("gloo")
    try:
        got = grads(sharded=True)
    finally:
        dist.destroy_process_group()
    assert want and got.keys() == want.keys()
    for n in want:
        assert _rel(got[n], want[n]) <= 1e-5, n


def test_trainer_heads_only_with_text_targets(tiny_ckpts, tmp_path):
    from safetensors.torch import load_file

    from wave_rt.train import fit

    manifest = tmp_path / "pairs.jsonl"
    write_text_pairs(manifest, 12)
    cfg = train_config(tiny_ckpts["all_layer"], manifest, tmp_path / "run", recipe=HEADS,
                       data={"batch_size": 6, "chunk_size": 2}, optim={"max_steps": 2})
    cfg["recipe"] = dict(HEADS)
    result = fit(cfg)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    before = load_file(str(tiny_ckpts["all_layer"] / "model.safetensors"))
    after = load_file(str(result.final_model / "model.safetensors"))
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k].to(before[k].dtype))}
    assert changed and all(k.startswith("classify_linear.") for k in changed), sorted(changed)[:5]


def test_data_that_reaches_nothing_trainable_is_a_typed_error(tiny_ckpts, tmp_path):
    """Text pairs never run the audio tower: heads-only training of it cannot change the model."""
    from wave_rt.cli import run
    from wave_rt.train import fit
    from wave_rt.train.trainer import NothingTrainableError

    manifest = tmp_path / "pairs.jsonl"
    write_text_pairs(manifest, 12)
    recipe = dict(HEADS, train_modules=["audio_tower"])
    cfg = train_config(tiny_ckpts["all_layer"], manifest, tmp_path / "run", data={"batch_size": 6, "chunk_size": 2})
    cfg["recipe"] = recipe
    with pytest.raises(NothingTrainableError, match="reaches a trainable parameter") as info:
        fit(cfg)
    assert str(manifest) in str(info.value) and "audio_tower" in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()

    toml = tmp_path / "c.toml"
    toml.write_text(f'[model]\npath = "{tiny_ckpts["all_layer"]}"\n[recipe]\nname = "wave"\ntrainable = "heads"\n'
                    'train_modules = ["audio_tower"]\n[data]\ntrain = "pairs.jsonl"\nbatch_size = 6\nchunk_size = 2\n'
                    '[run]\nout_dir = "cli"\ndevice = "cpu"\nprogress = false\n')
    err = io.StringIO()
    assert run(["train", str(toml)], out=io.StringIO(), err=err) == 1
    line = err.getvalue()
    assert line.startswith("wave-rt train: error: ") and "reaches a trainable parameter" in line
    assert line.count("\n") == 1 and "Traceback" not in line


def test_heads_only_fsdp2_on_several_ranks_is_refused(tiny_ckpts, tmp_path, monkeypatch):
    from wave_rt.train.config import TrainConfig
    from wave_rt.train.trainer import Trainer, TrainSetupError

    manifest = tmp_path / "pairs.jsonl"
    write_text_pairs(manifest, 12)
    cfg = train_config(tiny_ckpts["all_layer"], manifest, tmp_path / "run", run={"distributed": "fsdp2"})
    cfg["recipe"] = dict(HEADS)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainSetupError, match="ddp"):
        Trainer(TrainConfig.from_dict(cfg))
    assert not (tmp_path / "run").exists()
