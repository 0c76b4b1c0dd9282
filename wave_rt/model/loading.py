"""Checkpoint loading and saving for WaveModel.

Accepted layouts (all safetensors, single file or sharded with an index; `.bin`/`.pt` only through
`torch.load(weights_only=True)`):
- a WAVE directory as the reference code writes it (transformers 4.51/4.52 thinker names:
  `model.*`, `audio_tower.*`, `visual.*`, `lm_head.*`, `beats_ln.*`, `beats_proj.*`,
  `classify_linear.*`), with the BEATs weights inside (`beats.*`) or beside it as
  `BEATs_iter3_plus_AS2M.pt`, or at an explicit path;
- a plain Qwen2.5-Omni thinker (4.x names, or 5.x names `model.language_model.*`,
  `model.audio_tower.*`, `model.visual.*`), or a full Qwen2.5-Omni (`thinker.*`; talker and
  token2wav are skipped);
- a Qwen2-Audio checkpoint (4.x `language_model.model.*` / 5.x `model.language_model.*`).
The LM head is never loaded. Missing, unexpected and mis-shaped tensors are collected and reported
in one CheckpointError.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from wave_rt.config import OMNI_THINKER, QWEN2_AUDIO, WaveConfig
from wave_rt.errors import CheckpointError
from wave_rt.model.midashenglm import MIDASHENGLM

log = logging.getLogger(__name__)

BEATS_FILENAMES = ("BEATs_iter3_plus_AS2M.pt", "beats.safetensors")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)

# (pattern, replacement) applied in order; a replacement of None drops the tensor on purpose.
_RENAMES: dict[str, list[tuple[str, str | None]]] = {
    OMNI_THINKER: [
        (r"^thinker\.", ""),
        (r"^(talker|token2wav)\..*", None),
        (r"^lm_head\..*", None),
        (r"^model\.language_model\.", "model."),
        (r"^model\.audio_tower\.", "audio_tower."),
        (r"^model\.visual\.", "visual."),
    ],
    QWEN2_AUDIO: [
        (r"^(language_model\.)?lm_head\..*", None),
        (r"^language_model\.model\.", "model."),
        (r"^model\.language_model\.", "model."),
        (r"^model\.audio_tower\.", "audio_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    ],
    MIDASHENGLM: [
        (r"^decoder\.lm_head\..*", None),
        (r"^decoder\.model\.", "model."),
    ],
}

# Tensors a checkpoint may leave out (the model keeps its own values): MiDashengLM's front-end buffers are
# unused by our forward (features come from wave_rt.media.features_dasheng), BatchNorm's step counter is unused
# in eval mode.
_OPTIONAL: dict[str, tuple[str, ...]] = {
    MIDASHENGLM: (r"^audio_encoder\.front_end\.", r"\.num_batches_tracked$"),
}

# Our canonical names -> the names written to disk (the released 4.x layouts, loadable by the reference code).
_SAVE_RENAMES: dict[str, list[tuple[str, str]]] = {
    OMNI_THINKER: [],
    QWEN2_AUDIO: [(r"^model\.", "language_model.model.")],
    MIDASHENGLM: [(r"^model\.", "decoder.model.")],
}


def canonical_name(key: str, backbone: str) -> str | None:
    for pattern, repl in _RENAMES[backbone]:
        if re.match(pattern, key):
            if repl is None:
                return None
            key = re.sub(pattern, repl, key, count=1)
    return key


class _TensorSource:
    """Lazily readable tensors of a checkpoint directory: name -> loader."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index: dict[str, Path] = {}
        self._opened: dict[Path, object] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._discover()

    def _discover(self) -> None:
        index_file = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(index_file, f"unreadable safetensors index: {exc}") from None
            for name, shard in weight_map.items():
                shard_path = self.path / shard
                if not shard_path.exists():
                    raise CheckpointError(shard_path, f"shard listed in the index is missing (tensor {name})")
                self.index[name] = shard_path
        elif single.exists():
            for name in self._safetensor_keys(single):
                self.index[name] = single
        else:
            bins = sorted(self.path.glob("pytorch_model*.bin"))
            if not bins:
                raise CheckpointError(self.path, "no model.safetensors, safetensors index, or pytorch_model*.bin found")
            for b in bins:
                for name in self._load_pickled(b):
                    self.index[name] = b

    def _safetensor_keys(self, file: Path) -> list[str]:
        return list(self._open(file).keys())

    def _open(self, file: Path):  # noqa: ANN202 - safetensors handle
        from safetensors import safe_open

        handle = self._opened.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(file, f"unreadable safetensors file: {exc}") from None
            self._opened[file] = handle
        return handle

    def _load_pickled(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickled:
            self._pickled[file] = safe_torch_load(file)
        return self._pickled[file]

    def get(self, name: str) -> torch.Tensor:
        file = self.index[name]
        if file.suffix == ".safetensors":
            try:
                return self._open(file).get_tensor(name)
            except Exception as exc:  # truncated data shows up only on read
                raise CheckpointError(file, f"cannot read tensor {name}: {exc}") from None
        return self._load_pickled(file)[name]

    def shape(self, name: str) -> tuple[int, ...]:
        file = self.index[name]
        if file.suffix == ".safetensors":
            try:
                return tuple(self._open(file).get_slice(name).get_shape())
            except Exception as exc:  # safetensors' own error type: the index names a tensor the shard lacks
                raise CheckpointError(file, f"cannot read tensor {name} (listed in model.safetensors.index.json): "
                                            f"{exc}") from None
        return tuple(self._load_pickled(file)[name].shape)


def safe_torch_load(file: str | os.PathLike[str]) -> dict:
    """torch.load with weights_only=True: plain containers and tensors only, never arbitrary objects."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(file, "file not found") from None
    except Exception as exc:  # UnpicklingError, RuntimeError for corrupt zip, ...
        raise CheckpointError(
            file, f"refused or unreadable (loaded with weights_only=True; arbitrary pickles are never executed): {exc}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(file, f"expected a dict of tensors, found {type(obj).__name__}")
    return obj


HEAD_PREFIXES = ("classify_linear.", "eos_proj.")


def _find_beats_file(path: Path, explicit: str | os.PathLike[str] | None) -> Path | None:
    if explicit is not None:
        p = Path(explicit)
        if not p.exists():
            raise CheckpointError(p, "BEATs checkpoint given by path does not exist")
        return p
    for name in BEATS_FILENAMES:
        if (path / name).exists():
            return path / name
    found = sorted(path.glob("BEATs*.pt"))
    return found[0] if found else None


def load_wave_model(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    recipe: str | None = None,
    beats_path: str | os.PathLike[str] | None = None,
    preset: str | None = None,
) -> tuple:
    """Load a checkpoint directory into a WaveModel on `device` in `dtype`. Returns (model, config).

    `preset` (wave_rt.model.embedder_presets) picks the recipe; without it the preset is detected from the
    checkpoint's layout where it says one (an explicit `recipe` still wins over the preset's)."""
    from wave_rt.dtypes import resolve_device
    from wave_rt.model.wave_model import WaveModel

    device = resolve_device(device)  # a device this process lacks fails here, typed, not inside a layer's init
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(root, "not a directory")
    config = WaveConfig.from_pretrained(root, recipe=recipe)
    source = _TensorSource(root)
    config = _apply_preset(root, config, source, preset, recipe)

    provided: dict[str, str] = {}  # canonical -> on-disk name
    for name in source.index:
        canon = canonical_name(name, config.backbone)
        if canon is not None:
            provided[canon] = name

    beats_tensors: dict[str, torch.Tensor] = {}
    if beats_path is not None:
        _find_beats_file(root, beats_path)  # an explicit path is checked even where the model does not use it
        if not config.use_beats:
            log.warning("%s: beats_path given but the config does not use BEATs; ignored", root)
        else:  # the caller's file wins over a copy inside the safetensors
            provided = {k: v for k, v in provided.items() if not k.startswith("beats.")}
    if config.use_beats and not any(k.startswith("beats.") for k in provided):
        beats_file = _find_beats_file(root, beats_path)
        if beats_file is None:
            raise CheckpointError(
                root,
                "config asks for BEATs (audio_config.beats_path) but no beats.* tensors are in the safetensors and "
                f"no {' or '.join(BEATS_FILENAMES)} is beside them; pass beats_path=...",
            )
        from wave_rt.model.beats import load_beats_state_dict

        beats_cfg, beats_sd = load_beats_state_dict(beats_file)
        config.beats = beats_cfg.to_dict()
        beats_tensors = {f"beats.{k}": v for k, v in beats_sd.items()}

    if config.backbone == MIDASHENGLM and "projector_bias" not in _wave_rt_section(root):
        config.projector_bias = "audio_projector.net.0.bias" in provided
    model = WaveModel.build(config, device=device, dtype=dtype, init="empty")
    expected = model.state_dict()
    if recipe is not None or preset is not None:
        # heads the checkpoint carries for another recipe than the one asked for (WAVE's fusion MLP under an
        # explicit recipe="last_token", ...): left unread rather than refused as unknown tensors
        unused = [k for k in provided if k not in expected and k.startswith(HEAD_PREFIXES)]
        if unused:
            log.info("%s: recipe %r does not use the checkpoint's %s tensors; not loaded", root, config.recipe.name,
                     ", ".join(sorted({k.split(".")[0] for k in unused})))
            provided = {k: v for k, v in provided.items() if k not in unused}
    problems: list[str] = []
    optional = _OPTIONAL.get(config.backbone, ())
    missing = [k for k in expected if k not in provided and k not in beats_tensors
               and not any(re.search(p, k) for p in optional)]
    unexpected = [provided[k] for k in provided if k not in expected]
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_listing(unexpected)}")
    mis_shaped = []
    for canon, disk in provided.items():
        if canon in expected and tuple(expected[canon].shape) != source.shape(disk):
            mis_shaped.append(f"{disk}: checkpoint {list(source.shape(disk))} vs model {list(expected[canon].shape)}")
    for canon, tensor in beats_tensors.items():
        if canon in expected and tuple(expected[canon].shape) != tuple(tensor.shape):
            mis_shaped.append(f"{canon}: checkpoint {list(tensor.shape)} vs model {list(expected[canon].shape)}")
        elif canon not in expected:
            problems.append(f"unexpected BEATs tensor {canon}")
    if mis_shaped:
        problems.append(f"mis-shaped tensors ({len(mis_shaped)}): {_listing(mis_shaped)}")
    if problems:
        raise CheckpointError(root, "; ".join(problems))

    with torch.no_grad():
        for canon, target in expected.items():
            if canon not in provided and canon not in beats_tensors:
                continue  # an optional tensor the checkpoint leaves out
            tensor = beats_tensors[canon] if canon in beats_tensors else source.get(provided[canon])
            target.copy_(tensor.to(target.dtype) if target.is_floating_point() else tensor)
    return model, config


def _apply_preset(root: Path, config: WaveConfig, source: _TensorSource, preset: str | None,
                  recipe: str | None) -> WaveConfig:
    from wave_rt.model.embedder_presets import detect_preset, get_preset

    raw = json.loads((root / "config.json").read_text())
    explicit = preset is not None
    if preset is None:
        preset = detect_preset(raw, source.index)
    if preset is None:
        return config
    try:
        chosen = get_preset(preset)
    except ValueError as exc:
        raise CheckpointError(root, str(exc)) from None
    if chosen.backbone != config.backbone:
        raise CheckpointError(root, f"preset {preset!r} runs on {chosen.backbone} but config.json is {config.backbone}")
    # A detected preset only renames what the config already says, except where the checkpoint names the model
    # outright (ALM2Vec's projection tensors, Omni-Embed-Nemotron's own model_type): then the preset's recipe is
    # the model's; an explicit preset sets the recipe (unless the caller also gave one).
    names_model = (preset == "alm2vec" or raw.get("model_type") == "nvomniembed")
    if recipe is None and (explicit or (names_model and config.recipe.name != chosen.recipe_name)):
        config = WaveConfig.from_dict(raw, recipe=chosen.recipe_name, source=root)
        if explicit:
            config.recipe = chosen.recipe  # the preset's prompts, not ones saved with another recipe
    if config.recipe.head == "eos_projection" and "eos_proj.weight" in source.index and "projection_dim" not in _wave_rt_section(root):
        config.projection_dim = int(source.shape("eos_proj.weight")[0])
    config.preset = preset
    return config


def _wave_rt_section(root: Path) -> dict:
    try:
        data = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    section = data.get("wave_rt") if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def save_wave_model(
    model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write config.json + safetensors (sharded with an index above max_shard_bytes) + tokenizer files."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config: WaveConfig = model.config
    renames = _SAVE_RENAMES[config.backbone]
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        for pattern, repl in renames:
            name = re.sub(pattern, repl, name, count=1)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        total = len(shards)
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{total:05d}.safetensors"
            save_file(shard, str(out / fname), metadata=metadata)
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        for fname in TOKENIZER_FILES:
            if (src / fname).exists() and src.resolve() != out.resolve():
                shutil.copyfile(src / fname, out / fname)
    return out
