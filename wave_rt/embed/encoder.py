"""WaveEncoder: the public embedding API (processor + token-budget batching + model).

`encode()` follows sentence-transformers' contract: items are prepared, sorted by length into
batches under a token budget, embedded, and returned in the caller's order, optionally L2-normalised,
as numpy (default) or torch. Media items are decoded in a thread pool, a window at a time, so memory
stays bounded on long lists.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from wave_rt.config import WaveConfig
from wave_rt.embed.batching import plan_batches
from wave_rt.embed.prepared import PreparedItem
from wave_rt.embed.processor import WaveProcessor, load_tokenizer
from wave_rt.items import Item, modality_of
from wave_rt.model.batch import collate
from wave_rt.model.wave_model import WaveModel

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
ConvertTo = Literal["numpy", "torch"] | None


@dataclass(frozen=True)
class QAResult:
    choice: int  # index of the best option
    letter: str
    scores: list[float]  # cosine similarity per option


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}") from None


def weights_fingerprint(path: str | os.PathLike[str], sample_blocks: int = 64, block: int = 1 << 16) -> str:
    """A stable hash of a checkpoint's weight files: names, sizes, and (for files over 256 MB) 64 evenly
    spread 64 KiB blocks instead of every byte, so a 16 GB checkpoint is fingerprinted in milliseconds."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(
        p for p in root.iterdir()
        if p.suffix in (".safetensors", ".bin", ".pt") or p.name.endswith(".safetensors.index.json")
    )
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size};".encode())
        with p.open("rb") as f:
            if size <= 256 * 1024 * 1024:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            else:
                for k in range(sample_blocks):
                    f.seek((size - block) * k // max(1, sample_blocks - 1))
                    h.update(f.read(block))
    return h.hexdigest()[:16]


def _state_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class WaveEncoder:
    def __init__(
        self,
        model: WaveModel,
        processor: WaveProcessor | None,
        model_id: str = "wave_rt-model",
        weights_id: str | None = None,
        num_workers: int | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.config: WaveConfig = model.config
        self.model_id = model_id
        self.pad_token_id = processor.ids["pad"] if processor is not None else int(model.config.text_config.pad_token_id)
        self._weights_id = weights_id or _state_fingerprint(model)
        self.num_workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        recipe: str | None = None,
        *,
        beats_path: str | os.PathLike[str] | None = None,
        media_backend: str = "auto",
        num_workers: int | None = None,
        backend: str = "torch",
    ) -> WaveEncoder:
        """Load a checkpoint directory (WAVE layout, a plain Qwen2.5-Omni thinker, or Qwen2-Audio).
        path=None or "demo" loads the bundled demo model: tiny, deterministic, UNTRAINED.
        backend="onnxruntime" | "aoti" | "tensorrt" loads an export bundle (`wave-rt export`) instead and runs
        its stage graphs behind the same encode()."""
        from wave_rt.model.loading import load_wave_model

        if backend != "torch":
            from wave_rt.export.runtime import load_bundle_model  # engines live in wave_rt.export

            engine, _ = load_bundle_model(path, backend, device=device)
            processor = WaveProcessor(engine.config, load_tokenizer(path), media_backend=media_backend)
            return cls(engine, processor, model_id=Path(path).resolve().name, weights_id=engine.weights_id,
                       num_workers=num_workers)

        demo = path is None or str(path) == DEMO_MODEL
        if demo:
            from wave_rt.model.demo import DEMO_MODEL_ID, demo_checkpoint

            path = demo_checkpoint()
        dev = torch.device(device) if device is not None else _default_device()
        dt = _resolve_dtype(dtype, dev)
        model, config = load_wave_model(path, device=dev, dtype=dt, recipe=recipe, beats_path=beats_path)
        processor = WaveProcessor(config, load_tokenizer(path), media_backend=media_backend)
        model_id = DEMO_MODEL_ID if demo else Path(path).resolve().name
        return cls(model, processor, model_id=model_id, weights_id=weights_fingerprint(path), num_workers=num_workers)

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> Path:
        """Save in the reference layout, with the tokenizer; loads back bit-identically."""
        import tempfile

        from wave_rt.model.loading import save_wave_model

        with tempfile.TemporaryDirectory() as tmp:
            self.processor.tokenizer.save(str(Path(tmp) / "tokenizer.json"))
            return save_wave_model(self.model, out_dir, tokenizer_dir=tmp)

    # ------------------------------------------------------------------ facts
    @property
    def fingerprint(self) -> str:
        """Changes whenever an embedding could change: weights, config/recipe/prompts, dtype."""
        blob = f"{self._weights_id}|{self.config.fingerprint()}|{self.dtype}".encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def dim(self) -> int:
        return self.config.embedding_dim

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def default_max_batch_tokens(self) -> int:
        # CPU: small batches keep the attention mask and activations cache-friendly; GPU: enough rows
        # to reach the compute-bound regime on 7B without risking the 80 GB card.
        return 32768 if self.device.type == "cuda" else 4096

    # ------------------------------------------------------------------ core steps
    def prepare(self, item: Item, instruction: str | None = None, index: int | None = None) -> PreparedItem:
        return self.processor.prepare(item, instruction, index=index)

    @torch.inference_mode()
    def embed_prepared(self, batch: Sequence[PreparedItem], normalize: bool = True) -> torch.Tensor:
        """One forward over already prepared items; float32 [len(batch), dim] on CPU in the given order."""
        model_batch = collate([p.inputs for p in batch], self.pad_token_id,
                              stack_mel=self.config.backbone == "qwen2_audio")
        if self.device.type == "cuda":
            model_batch = model_batch.pin_memory().to(self.device, self.dtype, non_blocking=True)
        else:
            model_batch = model_batch.to(self.device, self.dtype)
        out = self.model(model_batch).float()
        if normalize:
            out = F.normalize(out, dim=-1)
        return out.cpu()

    def _embed_with_retry(self, batch: Sequence[PreparedItem], normalize: bool) -> torch.Tensor:
        try:
            return self.embed_prepared(batch, normalize)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(batch) // 2
            log.warning("CUDA out of memory on a batch of %d; retrying as %d + %d", len(batch), half, len(batch) - half)
            return torch.cat([self._embed_with_retry(batch[:half], normalize),
                              self._embed_with_retry(batch[half:], normalize)])

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        items: Item | Sequence[Item],
        instruction: str | None = None,
        batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        normalize: bool = True,
        show_progress_bar: bool | None = None,
        convert_to: ConvertTo = "numpy",
    ) -> Any:
        """Embed items (str, Text, Audio, Video, AudioVisual) -> [N, dim] in the input order.

        A single item (not in a list) returns one vector. `instruction` replaces the modality's default
        prompt for media items and Text(side="query"); plain strings are text targets and ignore it."""
        single = isinstance(items, (str,)) or modality_of(items) is not None
        seq: list[Item] = [items] if single else list(items)
        budget = max_batch_tokens or (None if batch_size else self.default_max_batch_tokens)
        if show_progress_bar is None:
            show_progress_bar = log.getEffectiveLevel() <= logging.INFO and len(seq) > 256
        out = torch.empty(len(seq), self.dim, dtype=torch.float32)
        bar = _progress(len(seq), show_progress_bar)
        # Windows bound the memory held by decoded media; text windows can be large.
        has_media = any(modality_of(it) not in ("text", None) for it in seq)
        window = 64 if has_media else 8192
        with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
            for start in range(0, len(seq), window):
                idx = list(range(start, min(len(seq), start + window)))
                if has_media and self.num_workers > 1:
                    prepared = list(pool.map(lambda i: self.prepare(seq[i], instruction, index=i), idx))
                else:
                    prepared = [self.prepare(seq[i], instruction, index=i) for i in idx]
                lengths = [p.num_tokens for p in prepared]
                for group in plan_batches(lengths, budget, batch_size):
                    emb = self._embed_with_retry([prepared[g] for g in group], normalize)
                    out[torch.tensor([idx[g] for g in group])] = emb
                    bar.update(len(group))
        bar.close()
        return _convert(out[0] if single else out, convert_to)

    def answer(self, item: Item, question: str, options: Sequence[str] | None = None,
               letters: Sequence[str] | None = None) -> QAResult:
        """Multiple-choice QA as WAVE scores MMAU / MMEB QA: the media with the question (and lettered
        options) as instruction, each option letter encoded as a text target, best cosine wins."""
        instruction, default_letters = self.processor.qa_instruction(question, list(options) if options else None)
        letters = list(letters or default_letters)
        if not letters:
            raise ValueError("give options=[...] or letters=[...]")
        query = self.encode([item], instruction=instruction, convert_to="torch")
        targets = self.encode(letters, convert_to="torch")
        scores = (query @ targets.T)[0]
        best = int(scores.argmax())
        return QAResult(best, letters[best], scores.tolist())


def similarity(a: Any, b: Any) -> Any:
    """Cosine similarity matrix [len(a), len(b)] of two embedding batches (numpy or torch, same kind out)."""
    is_np = isinstance(a, np.ndarray)
    ta = torch.as_tensor(a, dtype=torch.float32)
    tb = torch.as_tensor(b, dtype=torch.float32)
    if ta.ndim == 1:
        ta = ta[None]
    if tb.ndim == 1:
        tb = tb[None]
    sim = F.normalize(ta, dim=-1) @ F.normalize(tb, dim=-1).T
    return sim.numpy() if is_np else sim


def _convert(t: torch.Tensor, convert_to: ConvertTo) -> Any:
    if convert_to == "torch":
        return t
    if convert_to == "numpy":
        return t.numpy()
    if convert_to is None:
        return list(t.numpy()) if t.ndim == 2 else t.numpy()
    raise ValueError(f"convert_to must be 'numpy', 'torch' or None, got {convert_to!r}")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="encode", unit="item")
