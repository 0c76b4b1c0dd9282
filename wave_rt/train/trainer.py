"""fit(config): contrastive fine-tuning with GradCache, DDP or FSDP2 across ranks, checkpoints and exact resume.

Distributed: launched under torchrun (WORLD_SIZE > 1) it joins a process group (gloo on the CPU, NCCL on
GPUs). Each rank embeds its own slice of the global batch; the loss is info_nce_distributed (all ranks'
rows are negatives of each other), whose gradient with respect to a rank's embeddings is that rank's slice
of the global gradient. The parameter gradients are then summed over ranks, which gives the exact
global-loss gradient, so W ranks equal one process on the concatenated batch:
- distributed = "ddp": every rank holds the whole model; one all-reduce per trainable tensor per step, what
  DistributedDataParallel does (it averages). The model is not wrapped in DDP because GradCache runs
  several backward passes per step and the reduction must happen once, after the last.
- distributed = "fsdp2": the model is sharded with fully_shard (wave_rt.train.sharding): each GradCache
  chunk's forward and backward all-gather the layers they run; the chunks' gradients accumulate unsharded
  and are reduce-scattered once, in the last chunk's backward (run.fsdp_sync_every_chunk = true
  reduce-scatters after every chunk instead: sharded gradient memory, one reduce-scatter per chunk).
  Checkpoints and the final model gather the shards through torch.distributed.checkpoint's state-dict API.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from wave_rt.dtypes import resolve_device
from wave_rt.errors import WaveRTError
from wave_rt.train.adapters import add_lora, merge_lora, set_trainable
from wave_rt.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from wave_rt.train.config import TrainConfig
from wave_rt.train.data import BatchPlan, PairSource, load_pairs
from wave_rt.train.encode import embed_items
from wave_rt.train.gradcache import chunked, full_batch_step, gradcache_step
from wave_rt.train.objective import ContrastiveLoss
from wave_rt.train.recipes import TrainRecipe, get_train_recipe
from wave_rt.train.sharding import clip_grad_norm, init_single_rank_group, set_gradient_sync, shard_model

log = logging.getLogger(__name__)


class TrainSetupError(WaveRTError, ValueError):
    """A training run cannot start as configured; names what (run folder, manifest, config) and why."""

    def __init__(self, what: object, reason: str) -> None:
        self.what, self.reason = str(what), reason
        super().__init__(f"{self.what}: {reason}")


class RunExistsError(TrainSetupError):
    """A fresh run was pointed at a run folder that already holds a run."""


class NothingTrainableError(TrainSetupError):
    """The data never reaches a trainable parameter of this recipe (e.g. heads only, no item through them)."""


def previous_run(out_dir: str | os.PathLike[str]) -> list[str]:
    """What of an earlier run `out_dir` holds (empty: nothing, a fresh run may start there). A checkpoint is
    what a resume continues from (latest_checkpoint); the other traces would be mixed into or overwritten."""
    out = Path(out_dir)
    found = []
    latest = latest_checkpoint(out)
    if latest is not None:
        found.append(f"checkpoint {latest.name}")
    elif any(p.is_dir() for p in (out / "checkpoints").glob("step-*")):
        found.append("checkpoints/")
    for name in ("metrics.jsonl", "final"):
        if (out / name).exists():
            found.append(name)
    return found


@dataclass
class FitResult:
    out_dir: Path
    final_model: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def warmup_cosine(warmup: int, total: int, min_ratio: float):  # noqa: ANN201 - a LambdaLR factor
    """transformers' get_cosine_schedule_with_warmup (WAVE trains with it): linear from 0 over `warmup` steps,
    then a half cosine down to min_ratio at `total`."""
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return step / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _dist_setup(device_name: str, need_group: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world size, device). need_group: join a one-rank group when not launched by torchrun (FSDP2
    shards over a device mesh even on one rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_name != "auto":
        resolve_device(device_name)  # a device this machine lacks: a typed error before any process group
    if (world > 1 or need_group) and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
        if world > 1:
            dist.init_process_group(backend)
        else:
            init_single_rank_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and world > 1:
        device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    device = torch.device(device_name)
    if device.type == "cuda":
        if device.index is None:  # set_device (and NCCL, and the FSDP2 mesh) need an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return rank, world, device


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute every decoder layer in the backward instead of keeping its activations (non-reentrant
    torch.utils.checkpoint, RNG state preserved so dropout matches). WaveModel calls the layers itself,
    so transformers' own switch (which acts inside the HF model's forward loop) would not engage; each
    layer's forward is wrapped instead, leaving the module tree and state-dict names unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        inner = layer.forward

        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def _model_path(config: TrainConfig, rank: int) -> Path:
    if config.model.init_tiny:
        from wave_rt.model.demo_architecture import random_demo_checkpoint

        recipe = get_train_recipe(config.recipe["name"], _overrides(config))
        init = Path(config.run.out_dir) / "init"
        if rank == 0 and not (init / "config.json").exists():
            random_demo_checkpoint(init, recipe=recipe.pooling, use_beats=recipe.pooling in ("all_layer", "last_layer"),
                                   seed=config.model.tiny_seed)
        if dist.is_initialized():
            dist.barrier()
        return init
    if config.model.path in ("demo", ""):
        from wave_rt.model.demo import demo_checkpoint

        return demo_checkpoint()
    return Path(config.model.path)


def _overrides(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config.recipe.items() if k != "name"}


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        from wave_rt.embed.processor import WaveProcessor, load_tokenizer

        self.config = config
        self.fsdp = config.run.distributed == "fsdp2"
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        if self.fsdp and world > 1 and get_train_recipe(config.recipe["name"], _overrides(config)).trainable == "heads":
            # Items that skip the heads (text targets) have no backward, and which chunks those are differs
            # between ranks: their FSDP2 collectives would no longer pair up.
            raise TrainSetupError("[run] distributed = \"fsdp2\"", "trainable = \"heads\" on several ranks needs "
                                  "distributed = \"ddp\" (the heads are small; FSDP2 would hang when a rank's chunk "
                                  "reaches no head)")
        owned = not dist.is_initialized()
        self.rank, self.world, self.device = _dist_setup(config.run.device, need_group=self.fsdp)
        self._owns_group = owned and dist.is_initialized()  # close() leaves a caller's own group alone
        if config.run.threads > 0:
            torch.set_num_threads(config.run.threads)
        self.recipe: TrainRecipe = get_train_recipe(config.recipe["name"], _overrides(config))
        self.out_dir = Path(config.run.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.base_path = _model_path(config, self.rank)
        # Same seed on every rank: LoRA initialisation is identical everywhere without a broadcast.
        torch.manual_seed(config.run.seed)
        self.dtype = torch.float64 if config.run.dtype == "fp64" else torch.float32
        model, wave_config = self._build_model(torch.device("cpu") if self.fsdp else self.device)
        self.trainable = set_trainable(model, self.recipe)
        if config.run.gradient_checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        bf16 = self.device.type == "cuda" and config.run.bf16
        if self.fsdp:
            # Loaded on the CPU, each unit moved to the device as it is sharded: no rank ever holds the
            # whole model on the device. bf16 through MixedPrecisionPolicy (fp32 master weights), not autocast.
            shard_model(model, self.device, param_dtype=torch.bfloat16 if bf16 else None)
        self.autocast = torch.bfloat16 if bf16 and not self.fsdp else None
        self.model = model
        self.loss_fn = ContrastiveLoss(self.recipe.temperature, self.recipe.learnable_temperature,
                                       self.recipe.symmetric, self.recipe.false_negative_margin).to(self.device)
        if self.dtype == torch.float64:
            self.loss_fn.double()
        # One module over both, so the state-dict API names every trainable tensor ("model." + the model's
        # name, "loss." + the loss's) and gathers FSDP2 shards.
        self.modules = nn.ModuleDict({"model": model, "loss": self.loss_fn})
        self.processor = WaveProcessor(wave_config, load_tokenizer(self.base_path))
        self.pad = self.processor.ids["pad"]

        self.load_skipped: Counter = Counter()
        pairs = load_pairs(config.data.train, self.load_skipped)
        if self.recipe.text_only:
            kept = [p for p in pairs if p.modality == "text" and isinstance(p.target, str)]
            self.load_skipped["not_text"] += len(pairs) - len(kept)
            pairs = kept
        self.source = PairSource(pairs, self.processor, cache=config.data.cache_prepared,
                                 qa_protocol=config.data.qa_protocol)
        self.plan = BatchPlan(pairs, config.data.batch_size * self.world, config.run.seed,
                              self.recipe.one_task_per_batch, config.data.distinct_targets)

        params = [p for p in model.parameters() if p.requires_grad] + list(self.loss_fn.parameters())
        o = config.optim
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=o.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(o.warmup(), o.max_steps, o.min_lr_ratio))
        self.step = 0
        self._tb: Any = None
        self._reach_checked = False

    def _build_model(self, device: torch.device) -> tuple[nn.Module, Any]:
        """The base checkpoint on `device` with the recipe's LoRA adapters (initialised from the torch RNG)."""
        from wave_rt.model.loading import load_wave_model

        model, wave_config = load_wave_model(self.base_path, device=device, dtype=self.dtype,
                                             recipe=self.recipe.pooling)
        if self.recipe.trainable == "lora":
            add_lora(model, self.recipe)
            model.to(device=device, dtype=self.dtype)
        return model, wave_config

    # ------------------------------------------------------------------ state
    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter by checkpoint name (FSDP2: sharded DTensors)."""
        out = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        out.update({f"loss.{n}": p for n, p in self.loss_fn.named_parameters()})
        return out

    @staticmethod
    def _module_key(name: str) -> str:
        """checkpoint name -> name in self.modules ("loss.x" stays, a model tensor gets "model.")."""
        return name if name.startswith("loss.") else f"model.{name}"

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Whole trainable tensors on the CPU, by checkpoint name, on rank 0 ({} elsewhere); a collective
        under FSDP2 (every rank calls it). Frozen weights are never gathered."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.modules, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        if self.rank != 0:
            return {}
        return {name: full[self._module_key(name)] for name in self.trainable_tensors()}

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's whole state keyed by parameter name, on rank 0 ({} elsewhere); a collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.modules, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0 writes; under FSDP2 every rank must call it: the shards are gathered)."""
        tensors = self.trainable_state()
        optimizer = self.optimizer_state()
        # Every rank's generators: they start from one seed but drift apart (dropout masks rows of
        # different lengths), and a resume must hand each rank its own.
        rngs: list[Any] = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        if self.rank != 0:
            return None
        epoch, k = self.plan.position(self.step)
        state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                 "rng": rngs, "step": self.step, "data": {"epoch": epoch, "batch_in_epoch": k},
                 "skipped": dict(self.source.skipped)}
        meta = {"step": self.step, "epoch": epoch, "batch_in_epoch": k, "world_size": self.world,
                "distributed": self.config.run.distributed, "config": self.config.to_dict()}
        return save_checkpoint(self.out_dir, self.step, tensors, state, meta, keep=self.config.run.keep_checkpoints)

    def resume(self) -> bool:
        """Continue from the run folder's latest checkpoint (every rank reads it; FSDP2 keeps its shard)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = latest_checkpoint(self.out_dir)
        if path is None:
            self._truncate_metrics()  # a run killed before its first checkpoint: every step is redone
            return False
        tensors, state, meta = load_checkpoint(path)
        if meta.get("world_size", 1) != self.world:
            raise ValueError(f"{path}: written by {meta.get('world_size')} ranks, resuming on {self.world}")
        own = self.trainable_tensors()
        if set(tensors) != set(own):
            raise ValueError(f"{path}: trainable tensors differ from this config's "
                             f"(missing {sorted(set(own) - set(tensors))[:5]}, extra {sorted(set(tensors) - set(own))[:5]})")
        full = StateDictOptions(full_state_dict=True, strict=False)
        dtypes = {name: p.dtype for name, p in own.items()}
        set_model_state_dict(self.modules, {self._module_key(n): t.to(dtypes[n]) for n, t in tensors.items()},
                             options=full)
        set_optimizer_state_dict(self.modules, self.optimizer, state["optimizer"], options=full)
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][self.rank])
        self.step = int(state["step"])
        self.source.skipped.update(state.get("skipped", {}))
        self._truncate_metrics()
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _truncate_metrics(self) -> None:
        """Drop metric lines of steps after the checkpoint (they are recomputed, identically)."""
        path = self.out_dir / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ one step
    def _local_batch(self) -> list[tuple[Any, Any]]:
        rows = self.plan.batch(self.step)
        b = self.config.data.batch_size
        mine = rows[self.rank * b:(self.rank + 1) * b]
        prepared = [p for p in (self.source.prepare(i) for i in mine) if p is not None]
        if self.world > 1:
            # info_nce_distributed needs the same rows on every rank: all trim to the smallest.
            n = torch.tensor([len(prepared)], dtype=torch.int64)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            prepared = prepared[: int(n)]
        return prepared

    def _check_reached(self) -> None:
        """After the run's first backward: a step whose items reach no trainable model parameter on any rank
        (heads only, and every item skips them) means this data cannot train this recipe; raised before the
        optimizer steps or anything is written. Later batches that reach nothing are no-op steps for the model."""
        got = any(p.grad is not None for p in self.model.parameters() if p.requires_grad)
        flag = torch.tensor([int(got)], device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._reach_checked = True
        if int(flag):
            return
        r = self.recipe
        what = f"trainable = {r.trainable!r} trains only {', '.join(r.train_modules) or '-'}" \
            if r.trainable == "heads" else f"trainable = {r.trainable!r}"
        raise NothingTrainableError(self.config.data.train, (
            f"no item of the first batch (step {self.step + 1}) reaches a trainable parameter: recipe {r.name!r} with "
            f"{what}, which no item's path goes through (text targets, for one, skip WAVE's fusion head), so "
            "training would not change the model; use trainable = \"lora\" or \"all\", or pairs whose items "
            "pass through the trained modules"))

    def train_step(self) -> dict[str, Any]:
        prepared = self._local_batch()
        if not prepared:
            raise RuntimeError(f"step {self.step}: every pair of the batch failed to prepare")
        chunk = self.config.data.chunk_size
        loss_fn: Any = self.loss_fn
        with_negatives = len(prepared[0]) == 3
        if with_negatives:
            # Rows with explicit negatives (BatchPlan never mixes them with plain pairs): each query against its
            # own target and negatives only. The loss is this rank's rows' mean / world size: the gradients
            # summed over the ranks below are then the global batch's mean, as for the contrastive loss.
            groups = [1 + len(negs) for _, _, negs in prepared]
            candidates = [c for _, t, negs in prepared for c in (t, *negs)]
            sides = [chunked([q for q, *_ in prepared], chunk), chunked(candidates, chunk)]
            world = self.world

            def loss_fn(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
                return self.loss_fn.options(q, c, groups) / world
        else:
            sides = [chunked([q for q, _ in prepared], chunk), chunked([t for _, t in prepared], chunk)]
        self.optimizer.zero_grad(set_to_none=True)
        # One chunk per side: the cached pass would only repeat the forward; the plain graph is the same math.
        def encode(c: Any) -> torch.Tensor:
            return embed_items(self.model, c, self.pad, device=self.device, dtype=self.dtype, autocast=self.autocast)

        if all(len(s) == 1 for s in sides):
            loss = full_batch_step(encode, sides, loss_fn)
        else:
            every = self.config.run.fsdp_sync_every_chunk
            # Only FSDP2 needs to know which backward is the last (gradcache_step re-runs a chunk for it when
            # the step's last chunks reach nothing trainable).
            loss = gradcache_step(encode, sides, loss_fn,
                                  before_backward=(lambda last: set_gradient_sync(self.model, last or every))
                                  if self.fsdp else None)
        if with_negatives:
            loss = loss * self.world  # logged as this rank's rows' mean, not its share of the global mean
        if not self._reach_checked:
            self._check_reached()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.world > 1:
            for p in params:
                if isinstance(p, DTensor):
                    continue  # FSDP2 summed these over the ranks in the backward (reduce-scatter)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        clip = self.config.optim.grad_clip
        norm = clip_grad_norm(params, clip if clip > 0 else float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        t = self.loss_fn.temperature()
        return {"step": self.step, "loss": float(loss), "lr": lr, "grad_norm": float(norm),
                "temperature": float(t.detach()) if torch.is_tensor(t) else float(t), "rows": len(prepared) * self.world,
                "skipped": sum(self.source.skipped.values()) + sum(self.load_skipped.values())}

    # ------------------------------------------------------------------ loop
    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:
                self._tb = False
        if self._tb:
            for k in ("loss", "lr", "grad_norm", "temperature"):
                self._tb.add_scalar(f"train/{k}", record[k], record["step"])

    def fit(self) -> FitResult:
        cfg = self.config
        losses: list[float] = []
        bar = None
        if cfg.run.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.optim.max_steps, initial=self.step, desc="train", unit="step")
        start = time.perf_counter()
        while self.step < cfg.optim.max_steps:
            record = self.train_step()
            record["elapsed_s"] = round(time.perf_counter() - start, 3)
            losses.append(record["loss"])
            if record["step"] % cfg.run.log_every == 0 or record["step"] == cfg.optim.max_steps:
                self._log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if self.step % cfg.run.checkpoint_every == 0 or self.step == cfg.optim.max_steps:
                self.save()
        if bar is not None:
            bar.close()
        final = self.save_final()
        skipped = dict(self.load_skipped + self.source.skipped)
        if self.rank == 0:
            (self.out_dir / "skipped.json").write_text(json.dumps({"counts": skipped, "rows": {
                str(self.source.pairs[i].row): why for i, why in sorted(self.source.bad.items())}}, indent=2))
        return FitResult(self.out_dir, final, self.step, losses, skipped)

    def save_final(self) -> Path | None:
        """The merged model (LoRA folded into q/k/v) in the layout WaveEncoder.from_pretrained loads
        (rank 0 writes; under FSDP2 every rank must call it: the whole model is gathered onto rank 0's CPU)."""
        from wave_rt.model.loading import save_wave_model

        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.rank != 0:
                return None
            with torch.random.fork_rng(devices=[]):  # the throwaway LoRA init must not move the RNG
                model, _ = self._build_model(torch.device("cpu"))
            model.load_state_dict(state, strict=True)
            del state
        else:
            if self.rank != 0:
                return None
            import copy

            model = copy.deepcopy(self.model)
        model.eval()
        merge_lora(model)
        model.float()
        final = self.out_dir / "final"
        tmp = self.out_dir / ".final.tmp"
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        save_wave_model(model, tmp, tokenizer_dir=self.base_path)
        if self.loss_fn.learnable:
            t = self.loss_fn.temperature()
            (tmp / "temperature.json").write_text(json.dumps({"temperature": float(t.detach())}))
        if final.exists():
            import shutil

            shutil.rmtree(final)
        os.rename(tmp, final)
        return final


    def close(self) -> None:
        """Leave the process group this trainer joined, together with the other ranks. The model, optimizer
        and FSDP units (which hold the group through their device mesh) are dropped first: a gloo group whose
        last reference dies during interpreter teardown can abort the process at exit ("terminate called
        without an active exception", seen once in CI in a two-rank run) after all its work is done."""
        if not self._owns_group or not dist.is_initialized():
            return
        import gc

        dist.barrier()  # rank 0 may still be writing
        for name in ("model", "modules", "trainable", "optimizer", "scheduler", "loss_fn"):
            if hasattr(self, name):
                setattr(self, name, None)
        gc.collect()
        dist.destroy_process_group()
        self._owns_group = False


def fit(config: TrainConfig | dict[str, Any] | str | os.PathLike[str], *, resume: bool = False) -> FitResult:
    """Train per `config` (a TrainConfig, a dict of sections, or a TOML file). resume=True continues from
    the run folder's latest checkpoint (exactly: same losses and weights as an uninterrupted run); without it,
    a run folder that already holds a run is refused (RunExistsError) rather than overwritten and mixed."""
    if isinstance(config, (str, os.PathLike)):
        config = TrainConfig.from_file(config)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if not resume:
        found = previous_run(config.run.out_dir)
        if found:
            raise RunExistsError(config.run.out_dir, f"already holds a training run ({', '.join(found)}); pass "
                                 "--resume (fit(..., resume=True)) to continue it, or choose another run.out_dir "
                                 "(or delete this folder) to start over")
    trainer = Trainer(config)
    try:
        if resume:
            trainer.resume()
        return trainer.fit()
    finally:
        trainer.close()
