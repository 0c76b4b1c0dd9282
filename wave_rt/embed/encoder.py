"""WaveEncoder: the public embedding API (processor + token-budget batching + model).

`encode()` follows sentence-transformers' contract: items are prepared, sorted by length into
batches under a token budget, embedded, and returned in the caller's order, optionally L2-normalised,
as numpy (default) or torch. Media items are decoded in a thread pool, a window at a time, so memory
stays bounded on long lists; the next window is decoded, and the next batch collated and copied, while
the current batch computes. Batches are packed (one variable-length stream, no padding) unless
`packed=False` selects the left-padded reference forward.

On CUDA the media features are deferred by default (`gpu_features=None`): items are prepared with their decoded
waveforms and uint8 frames, and each batch's log-mel, fbank and pixel values are computed in batch on the model's
device when the batch is staged (wave_rt.embed.batch_features). On the CPU nothing changes unless forced.
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
from wave_rt.dtypes import default_dtype, parse_dtype, resolve_device
from wave_rt.embed.batch_features import featurize_batch
from wave_rt.embed.batching import plan_batches
from wave_rt.embed.identity import DEMO_MODEL, encoder_fingerprint, weights_fingerprint
from wave_rt.embed.prepared import PreparedItem
from wave_rt.embed.processor import WaveProcessor, load_tokenizer
from wave_rt.embed.runner import TOO_LARGE, ModelRunner
from wave_rt.errors import UnsupportedItemError
from wave_rt.items import Item, modality_of
from wave_rt.model.batch import collate, collate_packed
from wave_rt.model.wave_model import WaveModel

log = logging.getLogger(__name__)

ConvertTo = Literal["numpy", "torch"] | None


@dataclass(frozen=True)
class QAResult:
    choice: int  # index of the best option
    letter: str
    scores: list[float]  # cosine similarity per option


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    return default_dtype(device) if dtype is None else parse_dtype(dtype)


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
        packed: bool = True,
        gpu_features: bool | None = None,
    ) -> None:
        self.model = model
        # None: defer features to the model's device when it is CUDA (a torch model, not an export engine).
        self.gpu_features = gpu_features
        # Packed batches where the model has a packed path; else the padded forward.
        self.packed = packed and getattr(model, "supports_packed", False)
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
        preset: str | None = None,
        backend: str = "torch",
        gpu_features: bool | None = None,
    ) -> WaveEncoder:
        """Load a checkpoint directory (WAVE layout, a plain Qwen2.5-Omni thinker, Qwen2-Audio, or MiDashengLM).
        path=None or "demo" loads the bundled demo model (tiny, trained on a synthetic corpus; wave_rt.model.demo).
        `preset` names the embedder the weights belong to (wave, vela, alm2vec, lco-omni, e5-omni,
        omni-embed-nemotron; see wave_rt.model.embedder_presets); without it the checkpoint's layout decides where
        it can. backend="onnxruntime" | "aoti" | "tensorrt" loads an export bundle (`wave-rt export`) instead and
        runs its stage graphs behind the same encode(). `gpu_features`: compute media features in batch on the
        model's device (None: on CUDA only; see WaveEncoder.defer_features)."""
        from wave_rt.model.loading import load_wave_model

        dev = resolve_device(device)
        if backend != "torch":
            engine, _ = _bundle_loader(backend)(path, backend, device=dev)
            processor = WaveProcessor(engine.config, load_tokenizer(path), media_backend=media_backend)
            return cls(engine, processor, model_id=Path(path).resolve().name, weights_id=engine.weights_id,
                       num_workers=num_workers, gpu_features=gpu_features)

        demo = path is None or str(path) == DEMO_MODEL
        if demo:
            from wave_rt.model.demo import DEMO_MODEL_ID, demo_checkpoint

            path = demo_checkpoint()
        dt = _resolve_dtype(dtype, dev)
        model, config = load_wave_model(path, device=dev, dtype=dt, recipe=recipe, beats_path=beats_path, preset=preset)
        processor = WaveProcessor(config, load_tokenizer(path), media_backend=media_backend)
        model_id = DEMO_MODEL_ID if demo else Path(path).resolve().name
        return cls(model, processor, model_id=model_id, weights_id=weights_fingerprint(path), num_workers=num_workers,
                   gpu_features=gpu_features)

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
        return encoder_fingerprint(self._weights_id, self.config, self.dtype)

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

    @property
    def defer_features(self) -> bool:
        """Whether prepare() leaves media features to the model stage: `gpu_features` when set, else True exactly
        when the model is a torch module on CUDA (export engines take features computed on the host)."""
        if self.gpu_features is not None:
            return bool(self.gpu_features)
        return isinstance(self.model, torch.nn.Module) and self.device.type == "cuda"

    @property
    def feature_device(self) -> torch.device:
        """Where deferred features are computed: the model's device for a torch model, else the host."""
        return self.device if isinstance(self.model, torch.nn.Module) else torch.device("cpu")

    # ------------------------------------------------------------------ core steps
    def prepare(self, item: Item, instruction: str | None = None, index: int | None = None,
                defer_features: bool | None = None) -> PreparedItem:
        """`defer_features` None: this encoder's `defer_features`."""
        defer = self.defer_features if defer_features is None else defer_features
        return self.processor.prepare(item, instruction, index=index, defer_features=defer)

    def stage(self, batch: Sequence[PreparedItem]) -> Any:
        """Compute deferred features in batch on the feature device, collate on the host (packed: every count
        and window table fixed here) and start the copy to the device (pinned, non-blocking on CUDA), so it can
        overlap the batch computing before it."""
        items = [p.inputs for p in batch]
        if any(it.deferred for it in items):
            items = featurize_batch(items, self.config, self.feature_device)
        stack_mel = self.config.backbone == "qwen2_audio"
        if self.packed:
            cfg = self.config
            model_batch: Any = collate_packed(items, audio_token_id=cfg.token_id("audio"),
                                              video_token_id=cfg.token_id("video"), stack_mel=stack_mel,
                                              tower_inputs=self.model.tower_inputs)
        else:
            model_batch = collate(items, self.pad_token_id, stack_mel=stack_mel)
        if self.device.type == "cuda":
            return model_batch.pin_memory().to(self.device, self.dtype, non_blocking=True)
        return model_batch.to(self.device, self.dtype)

    @torch.inference_mode()
    def launch(self, model_batch: Any, normalize: bool = True) -> torch.Tensor:
        """The forward of a staged batch; on CUDA it returns as soon as the kernels are queued."""
        out = self.model(model_batch).float()
        return F.normalize(out, dim=-1) if normalize else out

    @torch.inference_mode()
    def embed_prepared(self, batch: Sequence[PreparedItem], normalize: bool = True) -> torch.Tensor:
        """One forward over already prepared items; float32 [len(batch), dim] on CPU in the given order."""
        return self.launch(self.stage(batch), normalize).cpu()

    def embed_prepared_all(self, prepared: Sequence[PreparedItem], max_batch_tokens: int | None = None,
                           normalize: bool = True) -> torch.Tensor:
        """Items already prepared (each with its own instruction) -> float32 [N, dim] on CPU in their order,
        batched by the token budget and split on out-of-memory as encode() does (the form for callers that
        prepare items themselves, e.g. eval, whose rows carry different instructions)."""
        budget = max_batch_tokens or self.default_max_batch_tokens
        out = torch.empty(len(prepared), self.dim, dtype=torch.float32)
        runner = ModelRunner(self, budget, normalize=normalize, isolate_errors=False)
        groups = plan_batches([p.num_tokens for p in prepared], budget, None, packed=self.packed)
        self._run_groups(list(prepared), groups, list(range(len(prepared))), out, normalize, _NoBar(), runner)
        return out

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
        gpu_features: bool | None = None,
    ) -> Any:
        """Embed items (str, Text, Audio, Video, AudioVisual) -> [N, dim] in the input order.

        A single item (not in a list) returns one vector. `instruction` replaces the modality's default
        prompt for media items and Text(side="query"); plain strings are text targets and ignore it.
        `gpu_features` overrides the encoder's setting for this call: True computes media features in batch
        on the model's device at staging, False per item on the CPU while preparing, None the encoder's choice."""
        for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if items is None:
            raise UnsupportedItemError(items, "encode() takes an item or a list of items, got None")
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
        # An out-of-memory batch is split in halves (and the cap lowered) rather than failing the call.
        runner = ModelRunner(self, budget or (1 << 62), normalize=normalize, isolate_errors=False)
        windows = [list(range(s, min(len(seq), s + window))) for s in range(0, len(seq), window)]
        threaded = has_media and self.num_workers > 1
        defer = self.defer_features if gpu_features is None else bool(gpu_features)
        with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
            def submit(idx: list[int]) -> Any:
                if threaded:  # decoding of this window starts now, while the previous window computes
                    return [pool.submit(self.prepare, seq[i], instruction, i, defer) for i in idx]
                return [self.prepare(seq[i], instruction, index=i, defer_features=defer) for i in idx]

            pending = submit(windows[0]) if windows else []
            for w, idx in enumerate(windows):
                prepared = [f.result() for f in pending] if threaded else pending
                if w + 1 < len(windows):
                    pending = submit(windows[w + 1])
                groups = plan_batches([p.num_tokens for p in prepared], budget, batch_size, packed=self.packed)
                self._run_groups(prepared, groups, idx, out, normalize, bar, runner)
        bar.close()
        return _convert(out[0] if single else out, convert_to)

    def _run_groups(self, prepared: list[PreparedItem], groups: list[list[int]], idx: list[int],
                    out: torch.Tensor, normalize: bool, bar: Any, runner: ModelRunner) -> None:
        """Run the batches of one window with the next batch staged (collated, copied) while the current
        one computes; a batch that runs out of memory is retried in halves."""
        staged = None
        for j, group in enumerate(groups):
            batch = [prepared[g] for g in group]
            if len(batch) > 1 and runner.cap < runner.budget and runner.tokens(batch) > runner.cap:
                # an earlier batch ran out of memory: this one goes by the lowered cap at once, not by a
                # forward that would fail the same way first
                staged = None
                emb = self._run_split(runner, batch)
            else:
                try:
                    current = staged if staged is not None else self.stage(batch)
                    staged = None
                    result = self.launch(current, normalize)
                    if j + 1 < len(groups):
                        staged = self.stage([prepared[g] for g in groups[j + 1]])
                    emb = result.cpu()
                except TOO_LARGE:
                    staged = current = result = None
                    emb = self._run_split(runner, batch)
            out[torch.tensor([idx[g] for g in group])] = emb
            bar.update(len(group))

    @staticmethod
    def _run_split(runner: ModelRunner, batch: list[PreparedItem]) -> torch.Tensor:
        ok, failed = runner.run(batch)
        if failed:
            raise next(iter(failed.values())) from None
        return torch.from_numpy(np.stack([ok[k] for k in range(len(batch))]))

    def answer(self, item: Item, question: str, options: Sequence[str] | None = None,
               letters: Sequence[str] | None = None) -> QAResult:
        """Multiple-choice QA as WAVE scores MMAU / MMEB QA: the media with the question (and lettered
        options) as instruction, each option letter encoded as a text target, best cosine wins. `letters`
        names the options (default A, B, ...), one per option, and is what the prompt lists; without
        `options` the question lists them itself and `letters` says which to score."""
        instruction, letters = self.processor.qa_instruction(question, list(options) if options else None,
                                                             list(letters) if letters is not None else None)
        if not letters:
            raise ValueError("give options=[...] or letters=[...]")
        query = self.encode([item], instruction=instruction, convert_to="torch")
        targets = self.encode(letters, convert_to="torch")
        scores = (query @ targets.T)[0]
        best = int(scores.argmax())
        return QAResult(best, letters[best], scores.tolist())


def _bundle_loader(backend: str) -> Any:
    """The loader of an engine backend, found through the `wave_rt.backends` entry points (wave_rt.export
    registers onnxruntime, aoti and tensorrt): export sits above the encoder API in the data flow, so the
    encoder finds its engines the way a plugin host does instead of importing them."""
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group="wave_rt.backends")}
    if backend not in found:
        raise ValueError(f"unknown backend {backend!r}: 'torch' or one of {sorted(found)} "
                         "(registered by the installed wave-rt package; reinstall it if this list is empty)")
    return found[backend].load()


def similarity(a: Any, b: Any) -> Any:
    """Cosine similarity matrix [len(a), len(b)] of two embedding batches (numpy or torch, same kind out)."""
    is_np = isinstance(a, np.ndarray)
    ta = torch.as_tensor(a, dtype=torch.float32)
    tb = torch.as_tensor(b, dtype=torch.float32)
    if ta.ndim == 1:
        ta = ta[None]
    if tb.ndim == 1:
        tb = tb[None]
    if ta.ndim != 2 or tb.ndim != 2 or ta.shape[-1] != tb.shape[-1]:
        raise ValueError(f"similarity needs two batches of vectors of one width, got shapes {tuple(ta.shape)} and "
                         f"{tuple(tb.shape)} (embeddings of two different models?)")
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
