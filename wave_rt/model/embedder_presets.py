"""Embedder presets: one name per published omni embedder, mapping to a backbone and a recipe.

A preset is data: the backbone's `model_type`, the recipe (head, prompts, pooling, attention; see
wave_rt.model.recipes), the embedding width of the released model, whether scores use L2-normalised vectors,
the modalities the model was published for, and a one-line source. `WaveEncoder.from_pretrained(path,
preset=...)` selects one; without it, `detect_preset` names one from the checkpoint's own layout where the
layout says which model it is (WAVE's fusion/BEATs fields, Qwen2-Audio, MiDashengLM with an `eos_proj`,
Omni-Embed-Nemotron's `nvomniembed` model_type); plain Qwen2.5-Omni thinkers (LCO, e5-omni) look alike on disk
and need `preset=`.
(wave_rt.model.presets holds something else: full-size configs for benchmarks.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from wave_rt.model.midashenglm import MIDASHENGLM
from wave_rt.model.recipes import VELA_PROMPTS, PromptConfig, Recipe, get_recipe

OMNI_THINKER = "qwen2_5_omni_thinker"  # = wave_rt.config.OMNI_THINKER (config imports us indirectly)
QWEN2_AUDIO = "qwen2_audio"


@dataclass(frozen=True)
class Preset:
    name: str
    backbone: str  # config.json model_type the preset runs on
    recipe_name: str
    dimension: int | None  # embedding width of the released model (None: the checkpoint's)
    normalize: bool  # scores are cosines of L2-normalised embeddings
    modalities: tuple[str, ...]  # item kinds the published model embeds: text, audio, video, av
    source: str
    prompts: PromptConfig | None = None  # when the backbone's recipe is shared but the prompts are the model's own

    @property
    def recipe(self) -> Recipe:
        recipe = get_recipe(self.recipe_name)
        return recipe.with_prompts(self.prompts) if self.prompts is not None else recipe


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("wave", OMNI_THINKER, "all_layer", 3584, True, ("text", "audio", "video", "av"),
               "WAVE (TCL606/WAVE, tsinghua-ee/WAVE-7B): all-layer last-token fusion MLP, BEATs + Whisper audio"),
        Preset("vela", QWEN2_AUDIO, "last_token", 4096, True, ("text", "audio"),
               "Vela (Qwen2-Audio-7B-Instruct): 'in one word' prompts, final-layer last token", VELA_PROMPTS),
        Preset("alm2vec", MIDASHENGLM, "eos_projection", None, True, ("text", "audio"),
               "ALM2Vec on MiDashengLM (vLLM/SGLang midashenglm.py for the layout): appended EOS -> projection"),
        Preset("lco-omni", OMNI_THINKER, "lco_omni", 3584, True, ("text", "audio", "video"),
               "LCO-Embedding-Omni (github.com/LCO-Embedding/LCO-Embedding README): chat template, "
               "'Summarize the above ... in one word:', hidden_states[-1][:, -1]"),
        Preset("e5-omni", OMNI_THINKER, "e5_omni", 3584, True, ("text", "audio", "video"),
               "e5-omni (Haon-Chen/e5-omni-7B model card, MTEB's e5_omni wrapper): chat template with the "
               "generation prompt + <|endoftext|>, last token; text queries 'Query: ...', passages and media bare"),
        Preset("omni-embed-nemotron", OMNI_THINKER, "mean_bidirectional", 2048, True, ("text", "audio", "video", "av"),
               "Omni-Embed-Nemotron-3B (nvidia/omni-embed-nemotron-3b model card and modeling code): chat template "
               "without the generation prompt, 'passage: '/'query: ' texts, bidirectional attention, mean over all "
               "tokens; audio+video documents as the video block then the audio block (not interleaved)"),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def detect_preset(config: dict[str, Any], tensor_names: Iterable[str] = ()) -> str | None:
    """The preset a checkpoint's own files name, or None when its layout does not say (plain thinkers)."""
    ours = config.get("wave_rt") or {}
    if isinstance(ours, dict) and ours.get("preset"):
        return str(ours["preset"])
    model_type = config.get("model_type")
    if model_type in (OMNI_THINKER, "qwen2_5_omni"):
        audio = (config.get("thinker_config") or config).get("audio_config") or {}
        if config.get("train_classify") or audio.get("beats_path") not in (None, "", "No"):
            return "wave"
        return None
    if model_type == "nvomniembed":  # = wave_rt.config.NEMOTRON_THINKER: Omni-Embed-Nemotron's own config class
        return "omni-embed-nemotron"
    if model_type == QWEN2_AUDIO:
        return "vela"
    if model_type == MIDASHENGLM and any(n.startswith("eos_proj.") for n in tensor_names):
        return "alm2vec"
    return None
