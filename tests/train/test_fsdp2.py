"""FSDP2 (run.distributed = "fsdp2", torch.distributed.fsdp.fully_shard on a gloo CPU mesh): two ranks
sharding the LoRA model equal one unsharded process on the concatenated batch (losses, the gathered gradients
of every trainable tensor at each step, the parameters after 3 steps, the merged final model) through the
GradCache path with the reduce-scatter deferred to the last chunk, with a reduce-scatter after every chunk and
activation checkpointing, and through the one-chunk path (two forwards before one backward); a checkpoint
written under FSDP2 resumes exactly; bf16 MixedPrecisionPolicy keeps fp32 master weights and gradients.
On a CUDA machine (marked gpu; the `train` stage of bench/gpu_session.sh runs it): the Trainer on one NCCL
rank with FSDP2, bf16 MixedPrecisionPolicy, activation checkpointing and GradCache against the unsharded
bf16-autocast Trainer, then checkpoint, resume and the merged final model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import pair_items, perturb_lora, rel, run_workers, train_config, write_text_pairs

pytest.importorskip("peft")

# Variants of the two-rank run; every rank holds 4 rows of each side per step.
VARIANTS = {
    "gradcache": {"data": {"chunk_size": 3}},  # chunks of 3 + 1 rows: unsharded accumulation, one reduce
    "every-chunk+checkpointing": {"data": {"chunk_size": 2},
                                  "run": {"fsdp_sync_every_chunk": True, "gradient_checkpointing": True}},
    "one-chunk": {"data": {"chunk_size": 4}},  # the plain full-batch step
}


@pytest.fixture(scope="module")
def runs(tiny_ckpts, tmp_path_factory):
    """run(tag, world, sections, *worker args, out=tag) -> rank 0's record, the run folder tmp/out; each
    tag runs once."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    manifest = tmp / "pairs.jsonl"
    write_text_pairs(manifest, 24)
    done: dict[str, dict] = {}

    def run(tag: str, world: int, sections: dict, *extra: str, out: str | None = None) -> dict:
        if tag not in done:
            cfg = train_config(tiny_ckpts["all_layer"], manifest, tmp / (out or tag), **sections)
            done[tag] = run_workers(cfg, tmp, tag, world, *extra)
            done[tag]["dir"] = tmp / (out or tag)
        return done[tag]

    run.reference = lambda: run("one", 1, {"data": {"batch_size": 8, "chunk_size": 4}}, "--final")
    return run


def _fsdp_sections(variant: str) -> dict:
    sections = {name: dict(values) for name, values in VARIANTS[variant].items()}
    sections.setdefault("data", {})["batch_size"] = 4
    sections.setdefault("run", {})["distributed"] = "fsdp2"
    return sections


def _merged(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp2_two_gloo_ranks_equal_one_process(runs, variant):
    one = runs.reference()
    two = runs(variant, 2, _fsdp_sections(variant), "--final")
    assert len(one["losses"]) == len(two["losses"]) == 3
    for a, b in zip(two["losses"], one["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (two["losses"], one["losses"])
    for step, (ga, gb) in enumerate(zip(two["grads"], one["grads"])):
        assert ga.keys() == gb.keys() and "loss.log_temperature" in ga
        assert any(".lora_B." in name for name in ga) and any(name.startswith("classify_linear") for name in ga)
        for name in gb:
            assert ga[name].shape == gb[name].shape, name  # gathered whole, not a shard
            assert gb[name].abs().max() > 0 or "lora_A" in name  # B = 0 at step 0 leaves A's gradient zero
            assert rel(ga[name], gb[name]) <= 1e-4, (step, name)
    # the same tolerance as the DDP test: Adam turns fp32 reduction-order differences on near-zero gradients
    # into differences of order lr * 1e-3
    for name in one["params"]:
        assert rel(two["params"][name], one["params"][name]) <= 1e-4, name
    a, b = _merged(two["dir"]), _merged(one["dir"])
    assert a.keys() == b.keys() and not any(".lora_" in name for name in a)
    for name in b:
        assert (a[name] - b[name]).abs().max() <= 1e-4 * max(1.0, float(b[name].abs().max())), name


def test_fsdp2_one_process_without_torchrun(runs):
    """`wave-rt train` with distributed = "fsdp2" and no torchrun: a one-rank group and mesh of its own; the
    same losses and parameters as the unsharded process."""
    one = runs.reference()
    sections = _fsdp_sections("gradcache")
    sections["data"]["batch_size"] = 8
    alone = runs("alone", 1, sections)
    for a, b in zip(alone["losses"], one["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (alone["losses"], one["losses"])
    for name in one["params"]:
        assert rel(alone["params"][name], one["params"][name]) <= 1e-4, name


def test_fsdp2_checkpoint_resumes_exactly(runs):
    """Two FSDP2 ranks stop right after step 2's checkpoint; a new pair of ranks resumes from it; step 3 and
    the parameters after it equal the uninterrupted FSDP2 run's (optimizer state, scheduler and positions
    restored through the state-dict API, every shard rebuilt from the whole tensors, and each rank's own RNG
    state: with LoRA dropout on, the ranks' generators drift apart as they mask different rows)."""
    sections = _fsdp_sections("gradcache")
    sections["recipe"] = {"lora_dropout": 0.2}
    whole = runs("whole-dropout", 2, sections)
    stopped = runs("stopped", 2, sections, "--stop-after", "2")
    assert len(stopped["losses"]) == 2
    for a, b in zip(stopped["losses"], whole["losses"][:2]):
        assert abs(a - b) <= 1e-6 * abs(b)
    from wave_rt.train.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(stopped["dir"])
    assert ckpt is not None and ckpt.name == "step-00000002"
    tensors, state, meta = load_checkpoint(ckpt)
    assert meta["distributed"] == "fsdp2" and meta["world_size"] == 2
    for name, value in tensors.items():  # whole tensors in the safetensors file, not rank 0's shard
        assert value.shape == whole["params"][name].shape, name
    assert set(state["optimizer"]["state"]) == {f"model.{n}" if not n.startswith("loss.") else n for n in tensors}

    resumed = runs("resumed", 2, sections, "--resume", out="stopped")
    assert len(resumed["losses"]) == 1  # steps 1 and 2 came from the checkpoint
    assert abs(resumed["losses"][0] - whole["losses"][2]) <= 1e-6 * abs(whole["losses"][2])
    for name, value in whole["params"].items():
        assert rel(resumed["params"][name], value) <= 1e-6, name


def _lora_model(ckpt: Path):
    """(the tiny checkpoint with the WAVE recipe's LoRA, perturbed so B != 0, in train mode; its processor)."""
    from wave_rt.embed.processor import WaveProcessor, load_tokenizer
    from wave_rt.model.loading import load_wave_model
    from wave_rt.train.adapters import add_lora, set_trainable
    from wave_rt.train.recipes import get_train_recipe

    recipe = get_train_recipe("wave", {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    torch.manual_seed(0)
    model, cfg = load_wave_model(ckpt, device="cpu", dtype=torch.float32, recipe=recipe.pooling)
    add_lora(model, recipe)
    perturb_lora(model)
    set_trainable(model, recipe)
    return model.train(), WaveProcessor(cfg, load_tokenizer(ckpt))


def test_fsdp2_bf16_mixed_precision_keeps_fp32_master_weights(tiny_ckpts):
    """shard_model(param_dtype=bf16) on one rank: the forward and backward run in bf16 (the loss differs
    from fp32's by bf16 rounding only), the sharded parameters, their gradients and the clipped norm stay
    fp32, and every trainable tensor gets a gradient close to the fp32 one."""
    import torch.distributed as dist

    from wave_rt.train.encode import embed_items
    from wave_rt.train.objective import ContrastiveLoss
    from wave_rt.train.sharding import clip_grad_norm, full_tensor, init_single_rank_group, shard_model

    def build():
        return _lora_model(tiny_ckpts["all_layer"])

    queries, targets = pair_items(6, seed=5)
    loss_fn = ContrastiveLoss(0.05)

    def step(model, proc):
        q = embed_items(model, [proc.prepare(x) for x in queries], proc.ids["pad"], device=torch.device("cpu"),
                        dtype=torch.float32)
        t = embed_items(model, [proc.prepare(x) for x in targets], proc.ids["pad"], device=torch.device("cpu"),
                        dtype=torch.float32)
        loss = loss_fn(q, t)
        loss.backward()
        return loss.detach()

    ref_model, proc = build()
    ref_loss = step(ref_model, proc)
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters() if p.requires_grad}

    init_single_rank_group("gloo")
    try:
        model, proc = build()
        shard_model(model, torch.device("cpu"), param_dtype=torch.bfloat16)
        loss = step(model, proc)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable.keys() == ref_grads.keys()
        assert loss != ref_loss and abs(float(loss - ref_loss)) <= 3e-2 * abs(float(ref_loss))
        for name, p in trainable.items():
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
            g = full_tensor(p.grad)
            cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0)
            assert cos > 0.98 or ref_grads[name].abs().max() == 0, (name, float(cos))
        ref_norm = torch.nn.utils.get_total_norm([g for g in ref_grads.values()])
        norm = clip_grad_norm(list(trainable.values()), 1e-3)
        assert norm.dtype == torch.float32 and abs(float(norm - ref_norm)) <= 3e-2 * float(ref_norm)
        clipped = torch.nn.utils.get_total_norm([full_tensor(p.grad) for p in trainable.values()])
        assert abs(float(clipped) - 1e-3) <= 1e-6
    finally:
        dist.destroy_process_group()



def test_fsdp2_bf16_gradcache_with_deferred_sync_and_an_unused_tower(tiny_ckpts):
    """bf16 MixedPrecisionPolicy (a reduce dtype set) + GradCache with the reduce-scatter deferred to the last
    chunk, on a text-only batch that never runs the audio tower: FSDP2's post-backward of a chunk without
    gradient sync reads every unit's unsharded parameter, which a unit that never ran did not have
    (AttributeError '_unsharded_param'; it killed the CUDA Trainer test on an H200). Two steps; each step's
    gradients match the unsharded fp32 full-batch step's (bf16 rounding apart)."""
    import torch.distributed as dist

    from wave_rt.train.encode import embed_items
    from wave_rt.train.gradcache import full_batch_step, gradcache_step
    from wave_rt.train.objective import ContrastiveLoss
    from wave_rt.train.sharding import full_tensor, init_single_rank_group, set_gradient_sync, shard_model

    def build():
        return _lora_model(tiny_ckpts["all_layer"])

    loss_fn = ContrastiveLoss(0.05)
    batches = [pair_items(6, seed=s) for s in (11, 12)]

    def grads_of(model, proc, sharded: bool) -> list[dict[str, torch.Tensor]]:
        def encode(chunk):
            return embed_items(model, [proc.prepare(x) for x in chunk], proc.ids["pad"], device=torch.device("cpu"),
                               dtype=torch.float32)

        out = []
        for queries, targets in batches:
            model.zero_grad(set_to_none=True)
            sides = [[queries[:4], queries[4:]], [targets[:4], targets[4:]]]
            if sharded:
                gradcache_step(encode, sides, loss_fn, before_backward=lambda last: set_gradient_sync(model, last))
            else:
                full_batch_step(encode, sides, loss_fn)
            out.append({n: full_tensor(p.grad).float().clone() for n, p in model.named_parameters()
                        if p.requires_grad and p.grad is not None})
        return out

    ref_model, proc = build()
    assert ref_model.audio_tower is not None
    want = grads_of(ref_model, proc, sharded=False)
    init_single_rank_group("gloo")
    try:
        model, proc = build()
        shard_model(model, torch.device("cpu"), param_dtype=torch.bfloat16)
        got = grads_of(model, proc, sharded=True)
    finally:
        dist.destroy_process_group()
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys() and any(".lora_B." in n for n in g), (step, sorted(set(g) ^ set(w)))
        for name in w:
            cos = torch.nn.functional.cosine_similarity(g[name].flatten(), w[name].flatten(), dim=0)
            assert cos > 0.98 or w[name].abs().max() == 0, (step, name, float(cos))


@pytest.mark.gpu
def test_fsdp2_cuda_nccl_bf16_trainer_matches_unsharded(tiny_ckpts, tmp_path):
    """What the CPU cannot check: NCCL collectives, units loaded on the CPU and moved to the GPU as they are
    sharded, MixedPrecisionPolicy on CUDA kernels. One rank (a mesh of 1, as `wave-rt train` without
    torchrun builds it) against the unsharded Trainer with bf16 autocast on the same batches: both compute
    in bf16, so the losses agree to bf16 rounding; parameters stay fp32 DTensors on the GPU; a checkpoint
    resumes to the same next loss; the merged final model loads."""
    import json

    import torch.distributed as dist

    from wave_rt.train.config import TrainConfig
    from wave_rt.train.trainer import Trainer

    manifest = tmp_path / "pairs.jsonl"
    write_text_pairs(manifest, 24)

    def config(tag: str, **run: object) -> TrainConfig:
        cfg = train_config(tiny_ckpts["all_layer"], manifest, tmp_path / tag, data={"batch_size": 8, "chunk_size": 3},
                           run={"device": "cuda", "bf16": True, "gradient_checkpointing": True, **run})
        return TrainConfig.from_dict(json.loads(json.dumps(cfg)))

    ref = Trainer(config("ddp"))
    ref_losses = [ref.train_step()["loss"] for _ in range(3)]
    try:
        sharded = Trainer(config("fsdp2", distributed="fsdp2"))
        assert dist.get_backend() == "nccl"
        losses = []
        for _ in range(3):
            losses.append(sharded.train_step()["loss"])
            if sharded.step == 2:
                sharded.save()
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 3e-2 * abs(b), (losses, ref_losses)
        for name, p in sharded.trainable_tensors().items():
            if not name.startswith("loss."):
                assert type(p).__name__ == "DTensor" and p.dtype == torch.float32 and p.device.type == "cuda", name
        final = sharded.save_final()
        resumed = Trainer(config("fsdp2", distributed="fsdp2"))
        assert resumed.resume() and resumed.step == 2
        assert abs(resumed.train_step()["loss"] - losses[2]) <= 1e-2 * abs(losses[2])
    finally:
        dist.destroy_process_group()
    import wave_rt

    enc = wave_rt.WaveEncoder.from_pretrained(str(final), device="cuda")
    vectors = enc.encode(["a red circle moving to the left"])
    assert vectors.shape[0] == 1 and float(abs(vectors).sum()) > 0
