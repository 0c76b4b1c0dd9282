"""Training recipes as data: what is trained, how, and with which loss.

Each entry mirrors a published recipe; a TOML config names one and may override any field.
- wave:     WAVE (TCL606/WAVE): LoRA r=128, alpha=256 on the LLM's q/k/v, the layer-fusion head
            (classify_linear) trained in full, audio/vision/BEATs encoders frozen, fixed temperature 0.01,
            symmetric InfoNCE, one task per global batch.
- vela:     Vela: text-only pairs with one-word summarisation prompts, final-layer last token (no head),
            LoRA on q/k/v.
- alm2vec:  ALM2Vec: appended EOS token -> linear projection (eos_proj, trained in full), LoRA on q/k/v,
            learnable temperature, false-negative margin.
The LoRA ranks/temperatures of Vela and ALM2Vec are our defaults, not values from their papers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

Trainable = Literal["lora", "heads", "all"]


@dataclass(frozen=True)
class TrainRecipe:
    name: str
    pooling: str  # a wave_rt.model.recipes.RECIPES key: how the checkpoint pools
    # "lora": LoRA adapters on the LLM's `lora_targets` + `train_modules` in full; "heads": only
    # `train_modules`; "all": every parameter outside `frozen_modules` (training a model from scratch)
    trainable: Trainable = "lora"
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    train_modules: tuple[str, ...] = ()
    frozen_modules: tuple[str, ...] = ("audio_tower", "visual", "beats", "beats_ln", "beats_proj")
    temperature: float = 0.01
    learnable_temperature: bool = False
    symmetric: bool = True
    false_negative_margin: float | None = None
    one_task_per_batch: bool = False
    text_only: bool = False

    def with_overrides(self, overrides: dict[str, Any]) -> TrainRecipe:
        unknown = set(overrides) - set(asdict(self))
        if unknown:
            raise ValueError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        return replace(self, **fixed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TRAIN_RECIPES: dict[str, TrainRecipe] = {
    "wave": TrainRecipe("wave", pooling="all_layer", train_modules=("classify_linear",), temperature=0.01,
                        one_task_per_batch=True),
    "vela": TrainRecipe("vela", pooling="last_token", lora_r=64, lora_alpha=128, temperature=0.05, text_only=True),
    "alm2vec": TrainRecipe("alm2vec", pooling="eos_projection", lora_r=64, lora_alpha=128,
                           train_modules=("eos_proj",), temperature=0.05, learnable_temperature=True,
                           false_negative_margin=0.1),
}


def get_train_recipe(name: str, overrides: dict[str, Any] | None = None) -> TrainRecipe:
    try:
        recipe = TRAIN_RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown training recipe {name!r}; known: {', '.join(sorted(TRAIN_RECIPES))}") from None
    return recipe.with_overrides(overrides) if overrides else recipe


