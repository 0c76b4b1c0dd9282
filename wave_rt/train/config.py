"""TrainConfig: what `wave-rt train CONFIG.toml` and `wave_rt.train.fit(config)` read.

    [model]
    path = "demo"                 # a checkpoint directory; or init_tiny = true to start from a fresh
    init_tiny = false             # tiny random model of the bundled architecture (the demo model's)
    tiny_seed = 0
    [recipe]
    name = "wave"                 # wave | vela | alm2vec (wave_rt.train.recipes); any recipe field may
    trainable = "lora"            # be overridden here (lora_r, temperature, trainable, ...)
    [data]
    train = "pairs.jsonl"         # relative paths: against this config file's folder
    batch_size = 64               # contrastive batch per rank (global = batch_size x world size)
    chunk_size = 16               # GradCache chunk: rows embedded with a graph at once
    cache_prepared = false        # keep every prepared pair in memory (small corpora)
    distinct_targets = false      # no two rows with the same target (caption) in one batch
    qa_protocol = "letters"       # QA rows (options + answer), as wave-rt eval asks them: letters (WAVE's:
                                  # lettered options in the prompt, letters as targets) | options (their texts)
    [optim]                       # defaults: WAVE's public recipe (AdamW, cosine, 3% warmup)
    lr = 2e-5
    weight_decay = 0.0
    betas = [0.9, 0.999]
    warmup_ratio = 0.03           # warmup = ceil(warmup_ratio x max_steps) steps, as transformers counts it,
    warmup_steps = -1             # unless warmup_steps >= 0 names the count itself
    max_steps = 1000
    min_lr_ratio = 0.0            # cosine decays to lr x min_lr_ratio
    grad_clip = 1.0               # max global grad norm; 0 disables
    [run]
    out_dir = "runs/x"
    seed = 0
    checkpoint_every = 100
    keep_checkpoints = 2
    log_every = 1
    device = "auto"               # auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK)
    distributed = "ddp"           # ddp: whole model per rank, gradients all-reduced; fsdp2: fully_shard
                                  # (parameters, gradients, optimizer state sharded over the ranks: 7B)
    fsdp_sync_every_chunk = false # fsdp2: reduce-scatter after every GradCache chunk (sharded gradient
                                  # memory) instead of once per step (one unsharded copy of the trainable
                                  # gradients: small for LoRA; faster)
    bf16 = true                   # bfloat16 compute on CUDA: autocast (ddp) or FSDP2's MixedPrecisionPolicy
                                  # with fp32 master weights and reduction (fsdp2); ignored on the CPU
    gradient_checkpointing = false
    dtype = "fp32"                # master weights: fp32, or fp64 (CPU, exactness tests)
    progress = true
    threads = 0                   # torch CPU threads (0: torch's default)
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class ModelSection:
    path: str = "demo"
    init_tiny: bool = False
    tiny_seed: int = 0


@dataclass
class DataSection:
    train: str = ""
    batch_size: int = 64
    chunk_size: int = 16
    cache_prepared: bool = False
    distinct_targets: bool = False
    qa_protocol: str = "letters"


@dataclass
class OptimSection:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    warmup_steps: int = -1  # < 0: ceil(warmup_ratio x max_steps)
    max_steps: int = 1000
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


    def warmup(self) -> int:
        """Warmup steps: warmup_steps when given (>= 0), else ceil(warmup_ratio x max_steps) (transformers'
        get_warmup_steps, which WAVE's --warmup_ratio 0.03 goes through)."""
        return self.warmup_steps if self.warmup_steps >= 0 else math.ceil(self.warmup_ratio * self.max_steps)


@dataclass
class RunSection:
    out_dir: str = "runs/wave_rt"
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    device: str = "auto"
    distributed: str = "ddp"
    fsdp_sync_every_chunk: bool = False
    bf16: bool = True
    gradient_checkpointing: bool = False
    dtype: str = "fp32"
    progress: bool = True
    threads: int = 0  # torch CPU threads; 0 keeps torch's default


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    recipe: dict[str, Any] = field(default_factory=lambda: {"name": "wave"})
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path | None = None) -> TrainConfig:
        sections = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "run": RunSection}
        unknown = set(data) - set(sections) - {"recipe"}
        if unknown:
            raise ValueError(f"unknown config sections: {', '.join(sorted(unknown))}")
        built: dict[str, Any] = {}
        for name, klass in sections.items():
            values = dict(data.get(name, {}))
            known = {f.name for f in fields(klass)}
            bad = set(values) - known
            if bad:
                raise ValueError(f"[{name}]: unknown keys {', '.join(sorted(bad))}; known: {', '.join(sorted(known))}")
            if "betas" in values:
                values["betas"] = tuple(values["betas"])
            built[name] = klass(**values)
        recipe = dict(data.get("recipe", {"name": "wave"}))
        recipe.setdefault("name", "wave")
        config = cls(recipe=recipe, **built)
        if base_dir is not None:
            base = Path(base_dir)
            if config.data.train and not Path(config.data.train).is_absolute():
                config.data.train = str(base / config.data.train)
            if not Path(config.run.out_dir).is_absolute():
                config.run.out_dir = str(base / config.run.out_dir)
            if config.model.path not in ("demo", "") and not Path(config.model.path).is_absolute():
                config.model.path = str(base / config.model.path)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TrainConfig:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"training config {path} does not exist")
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            from wave_rt._optional import require

            tomllib = require("tomli", "reading TOML training configs on Python 3.10")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc})") from None
        return cls.from_dict(data, base_dir=path.parent)

    def validate(self) -> None:
        if not self.data.train:
            raise ValueError("[data] train: a manifest path is required")
        for name, value in (("data.batch_size", self.data.batch_size), ("data.chunk_size", self.data.chunk_size),
                            ("optim.max_steps", self.optim.max_steps),
                            ("run.checkpoint_every", self.run.checkpoint_every)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.optim.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.optim.lr}")
        if not 0.0 <= self.optim.warmup_ratio <= 1.0:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1], got {self.optim.warmup_ratio}")
        if self.data.qa_protocol not in ("letters", "options"):
            raise ValueError(f"data.qa_protocol must be letters or options, got {self.data.qa_protocol!r}")
        if self.run.distributed not in ("ddp", "fsdp2"):
            raise ValueError(f"run.distributed must be ddp or fsdp2, got {self.run.distributed!r}")
        if self.run.dtype not in ("fp32", "fp64"):
            raise ValueError(f"run.dtype must be fp32 or fp64, got {self.run.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
