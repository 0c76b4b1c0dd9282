"""Which parameters train: LoRA adapters (peft, imported lazily) on the LLM, heads in full, encoders frozen;
and merging the adapters back into plain Linear weights for the saved model."""

from __future__ import annotations

from typing import Any

from torch import nn

from wave_rt._optional import PIP_INSTALL, require
from wave_rt.train.recipes import TrainRecipe

PIP_INSTALL.setdefault("peft", "pip install peft")


def _starts(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def add_lora(model: nn.Module, recipe: TrainRecipe) -> None:
    """Inject LoRA adapters into the decoder's `recipe.lora_targets` in place (names keep their prefix,
    e.g. model.layers.0.self_attn.q_proj.lora_A.default.weight)."""
    peft = require("peft", "LoRA training (wave-rt train with trainable = \"lora\")")
    config = peft.LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                             target_modules=list(recipe.lora_targets), bias="none")
    peft.inject_adapter_in_model(config, model.model)


def set_trainable(model: nn.Module, recipe: TrainRecipe) -> list[str]:
    """Set requires_grad per the recipe; returns the trainable parameter names (sorted)."""
    for name, p in model.named_parameters():
        if recipe.trainable == "all":
            p.requires_grad_(not _starts(name, recipe.frozen_modules))
        elif recipe.trainable == "lora":
            p.requires_grad_(".lora_" in name or _starts(name, recipe.train_modules))
        elif recipe.trainable == "heads":
            p.requires_grad_(_starts(name, recipe.train_modules))
        else:
            raise ValueError(f"unknown trainable mode {recipe.trainable!r}; use lora, heads or all")
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if not names:
        raise ValueError(f"recipe {recipe.name!r} leaves no parameter trainable on this model")
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base Linear (W += B A * alpha / r) and put the plain Linear back,
    so the state dict has the checkpoint's original names. Returns how many layers were merged."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    merged = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                base: Any = child.get_base_layer()
                setattr(parent, child_name, base)
                merged += 1
    return merged
