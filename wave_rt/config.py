"""WaveConfig: the backbone's transformers config plus what WAVE and its relatives add on top.

A checkpoint's config.json is read as the reference code writes it (a transformers 4.51/4.52 thinker
config with WAVE's extra fields `train_classify`, `classify_type`, `sim_temperature`,
`audio_config.beats_path` / `beats_only`), or as a plain Qwen2.5-Omni (thinker) or Qwen2-Audio
config. Our own settings sit under a `wave_rt` key so a saved checkpoint stays loadable by the
reference code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wave_rt.errors import CheckpointError
from wave_rt.model.midashenglm import MIDASHENGLM
from wave_rt.model.recipes import PromptConfig, Recipe, get_recipe

OMNI_THINKER = "qwen2_5_omni_thinker"
OMNI_FULL = "qwen2_5_omni"
QWEN2_AUDIO = "qwen2_audio"
# Omni-Embed-Nemotron's config.json: NVOmniEmbedConfig subclasses Qwen2_5OmniThinkerConfig under its own name
NEMOTRON_THINKER = "nvomniembed"
SUPPORTED_MODEL_TYPES = (OMNI_THINKER, OMNI_FULL, QWEN2_AUDIO, MIDASHENGLM, NEMOTRON_THINKER)


@dataclass(frozen=True)
class MediaConfig:
    """WAVE's preprocessing defaults (DESIGN.md section 1)."""

    sample_rate: int = 16000
    audio_segment_seconds: float = 300.0
    fps: float = 2.0
    max_frames: int = 128
    max_pixels: int = 176400
    min_pixels: int = 784


@dataclass
class WaveConfig:
    backbone: str
    hf_config: Any  # transformers PretrainedConfig (thinker config or Qwen2AudioConfig)
    recipe: Recipe
    use_beats: bool = False
    beats_only: bool = False
    beats: dict[str, Any] | None = None  # BEATs cfg dict (as the released checkpoint stores it)
    sim_temperature: float | None = None
    projection_dim: int | None = None  # eos_projection output width
    media: MediaConfig = field(default_factory=MediaConfig)
    projector_bias: bool = True  # MiDashengLM audio projector (see wave_rt.model.midashenglm)
    preset: str | None = None  # the embedder preset this config was built for (wave_rt.model.embedder_presets)

    # ---- derived facts the model and processor need -------------------------------------------
    @property
    def text_config(self) -> Any:
        return self.hf_config.get_text_config()

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def embedding_dim(self) -> int:
        if self.recipe.head == "eos_projection":
            return int(self.projection_dim or self.hidden_size)
        return self.hidden_size

    @property
    def uses_mrope(self) -> bool:
        return self.backbone == OMNI_THINKER

    @property
    def wave_chunking(self) -> bool:
        """Audio-visual chunks follow WAVE's processor (2 * seconds-per-grid, doubled audio) rather than
        transformers' (fixed 2 s): true for WAVE checkpoints (fusion heads or BEATs)."""
        return self.use_beats or self.recipe.name in ("all_layer", "last_layer")

    @property
    def dual_audio(self) -> bool:
        """Whisper and BEATs tokens interleaved (audio placeholders doubled)."""
        return self.use_beats and not self.beats_only

    def token_id(self, name: str) -> int | None:
        """Config-declared special token ids; None when the backbone has no such token."""
        cfg = self.hf_config
        aliases = {
            "audio": ("audio_token_id", "audio_token_index"),
            "video": ("video_token_id", "video_token_index"),
            "image": ("image_token_id", "image_token_index"),
            "audio_bos": ("audio_start_token_id",),
            "audio_eos": ("audio_end_token_id",),
            "vision_bos": ("vision_start_token_id",),
            "vision_eos": ("vision_end_token_id",),
        }[name]
        for attr in aliases:
            value = getattr(cfg, attr, None)
            if value is not None:
                return int(value)
        return None

    # ---- (de)serialisation ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], recipe: str | None = None, source: object = "<dict>") -> WaveConfig:
        data = copy.deepcopy(data)
        model_type = data.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                source,
                f"model_type {model_type!r} is not supported (expected one of {', '.join(SUPPORTED_MODEL_TYPES)})",
            )
        ours = data.pop("wave_rt", {}) or {}
        if model_type == OMNI_FULL:
            data = data.get("thinker_config") or {}
            data["model_type"] = OMNI_THINKER
            model_type = OMNI_THINKER
        elif model_type == NEMOTRON_THINKER:  # a thinker config under another name (see NEMOTRON_THINKER)
            data["model_type"] = model_type = OMNI_THINKER
        audio_cfg = data.get("audio_config") or {}
        beats_path = audio_cfg.get("beats_path")
        use_beats = bool(ours.get("use_beats", beats_path not in (None, "", "No")))
        beats_only = bool(ours.get("beats_only", audio_cfg.get("beats_only", False)))
        hf_config = _build_hf_config(model_type, data, source)

        if recipe is None:
            recipe = ours.get("recipe")
        if recipe is None:
            if data.get("train_classify"):
                recipe = data.get("classify_type") or "last_layer"
            else:
                recipe = "last_token"
        try:
            rec = get_recipe(recipe)
        except ValueError as exc:
            raise CheckpointError(source, str(exc)) from None
        if "prompts" in ours:
            rec = rec.with_prompts(PromptConfig.from_dict(ours["prompts"]))
        elif model_type == QWEN2_AUDIO and rec.name == "last_token":
            from wave_rt.model.recipes import VELA_PROMPTS

            rec = rec.with_prompts(VELA_PROMPTS)
        elif model_type == MIDASHENGLM and rec.name == "last_token":
            # A plain MiDashengLM: ALM2Vec's input (EOS appended, state at EOS) without its trained projection.
            from wave_rt.model.recipes import ALM2VEC_PROMPTS

            rec = rec.with_prompts(ALM2VEC_PROMPTS)
        if rec.pooling == "mean" and "all_layer" in (rec.head, rec.text_target_head):
            raise CheckpointError(source, f"recipe {rec.name!r}: mean pooling has no per-layer rows for the all_layer head")
        if use_beats and model_type != OMNI_THINKER:
            raise CheckpointError(source, "BEATs dual-audio is only defined for the Qwen2.5-Omni thinker backbone")
        return cls(
            backbone=model_type,
            hf_config=hf_config,
            recipe=rec,
            use_beats=use_beats,
            beats_only=beats_only,
            beats=ours.get("beats"),
            sim_temperature=data.get("sim_temperature", ours.get("sim_temperature")),
            projection_dim=ours.get("projection_dim"),
            media=MediaConfig(**ours["media"]) if "media" in ours else MediaConfig(),
            projector_bias=bool(ours.get("projector_bias", True)),
            preset=ours.get("preset"),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], recipe: str | None = None) -> WaveConfig:
        config_path = Path(path) / "config.json"
        try:
            data = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(path, "config.json is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(config_path, f"config.json is unreadable: {exc}") from None
        if not isinstance(data, dict):
            raise CheckpointError(config_path, "config.json does not hold a JSON object")
        return cls.from_dict(data, recipe=recipe, source=path)

    def to_dict(self) -> dict[str, Any]:
        """The config.json we write: the backbone config plus WAVE's fields (reference-compatible)."""
        data = self.hf_config.to_dict()
        data["model_type"] = self.backbone
        text = data.get("text_config") or {}
        rope = text.get("rope_parameters") or {}
        if "mrope_section" in rope:
            # transformers 4.x (the reference code) reads M-RoPE from rope_scaling / rope_theta.
            text["rope_scaling"] = {"mrope_section": rope["mrope_section"], "rope_type": "default", "type": "default"}
            text["rope_theta"] = rope.get("rope_theta", 1000000.0)
        if self.recipe.name in ("all_layer", "last_layer"):
            data["train_classify"] = True
            data["classify_type"] = self.recipe.name
        if self.sim_temperature is not None:
            data["sim_temperature"] = self.sim_temperature
        if self.use_beats:
            data.setdefault("audio_config", {})
            # The reference code loads this path at start-up; ours resolves it beside the weights.
            data["audio_config"]["beats_path"] = "BEATs_iter3_plus_AS2M.pt"
            data["audio_config"]["beats_only"] = self.beats_only
        data["wave_rt"] = {
            "recipe": self.recipe.name,
            "prompts": self.recipe.prompts.to_dict(),
            "use_beats": self.use_beats,
            "beats_only": self.beats_only,
            "beats": self.beats,
            "projection_dim": self.projection_dim,
            "media": asdict(self.media),
        }
        if self.backbone == MIDASHENGLM:
            data["wave_rt"]["projector_bias"] = self.projector_bias
        if self.preset is not None:
            data["wave_rt"]["preset"] = self.preset
        return data

    def fingerprint(self) -> str:
        """Hash of everything that changes an embedding's meaning (not the weights: see WaveEncoder)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _build_hf_config(model_type: str, data: dict[str, Any], source: object) -> Any:
    import transformers

    if model_type == MIDASHENGLM:
        from wave_rt.model.midashenglm import midashenglm_hf_config

        try:
            config = midashenglm_hf_config(data)
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(source, f"config.json does not describe a valid MiDashengLM: {exc}") from None
        config._attn_implementation = "sdpa"
        config.text_config._attn_implementation = "sdpa"
        return config

    cls_name = {
        OMNI_THINKER: "Qwen2_5OmniThinkerConfig",
        QWEN2_AUDIO: "Qwen2AudioConfig",
    }[model_type]
    config_cls = getattr(transformers, cls_name)
    clean = {k: v for k, v in data.items() if k not in ("train_classify", "classify_type", "sim_temperature")}
    if isinstance(clean.get("audio_config"), dict):
        clean["audio_config"] = {
            k: v for k, v in clean["audio_config"].items() if k not in ("beats_path", "beats_only")
        }
    try:
        config = config_cls.from_dict(clean)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(source, f"config.json does not describe a valid {cls_name}: {exc}") from None
    # The embedding path never samples or caches; SDPA is the default attention everywhere.
    config._attn_implementation = "sdpa"
    for sub in ("text_config", "audio_config", "vision_config"):
        sub_cfg = getattr(config, sub, None)
        if sub_cfg is not None:
            sub_cfg._attn_implementation = "sdpa"
    return config
