"""WaveProcessor: raw items -> model inputs, with WAVE's templates.

Sequences follow the reference code: the system prompt is dropped, the input is the media
placeholders, then the instruction (or the modality's default), then `<|im_end|>`, so the last token
of every sequence is `<|im_end|>` and a left-padded batch can read each row's last position. Text
targets are `text<|im_end|>`. With BEATs (dual audio) every audio placeholder is doubled, and the
audio-visual chunking and audio positions follow WAVE's rule (see wave_rt.model.positions).

Text is tokenized piecewise around the placeholders with the checkpoint's own tokenizer (tokens
never merge across special tokens, so this equals tokenizing the whole string).
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wave_rt.config import QWEN2_AUDIO, WaveConfig
from wave_rt.embed.prepared import PreparedItem
from wave_rt.errors import CheckpointError, InputError, MediaError, UnsupportedItemError
from wave_rt.items import Audio, AudioVisual, Text, Video
from wave_rt.model.batch import AudioSegmentInputs, ItemInputs
from wave_rt.model.midashenglm import MIDASHENGLM
from wave_rt.model.positions import SequenceBuilder, VideoGrid

QWEN2_AUDIO_SECONDS = 30.0  # Qwen2-Audio's Whisper window: longer audio is truncated, as its processor does
WHISPER_HOP = 160
MIDASHENGLM_MIN_SAMPLES = 3200  # vLLM/SGLang midashenglm.py: shorter clips are zero-padded to this


QA_PROTOCOLS = ("letters", "options")


def whisper_tokens(mel_frames: int) -> int:
    """LLM tokens the Whisper-style tower yields for `mel_frames` frames (conv stride 2, then avg-pool 2)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The checkpoint's `tokenizers.Tokenizer` (tokenizer.json, or built by transformers from vocab/merges)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if (path / "tokenizer.json").exists():
        try:
            return Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises its own exception type
            raise CheckpointError(path / "tokenizer.json", f"unreadable tokenizer: {exc}") from None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
    except (OSError, ValueError) as exc:
        raise CheckpointError(path, f"no usable tokenizer (tokenizer.json or vocab/merges): {exc}") from None


class WaveProcessor:
    """`defer_features`: prepared items carry decoded waveforms and uint8 frames instead of features (their token
    ids and positions are exact all the same), and wave_rt.embed.batch_features computes the features later, in
    batch, on the model's device. `prepare(..., defer_features=)` overrides it per call."""

    def __init__(self, config: WaveConfig, tokenizer: Any, media_backend: str = "auto",
                 defer_features: bool = False) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.media_backend = media_backend
        self.defer_features = defer_features
        self.prompts = config.recipe.prompts
        self.ids = self._resolve_special_ids()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ special tokens
    def _resolve_special_ids(self) -> dict[str, int]:
        by_string = {
            "audio": "<|AUDIO|>",
            "audio_bos": "<|audio_bos|>",
            "audio_eos": "<|audio_eos|>",
            "video": "<|VIDEO|>",
            "vision_bos": "<|vision_bos|>",
            "vision_eos": "<|vision_eos|>",
            "im_end": "<|im_end|>",
            "pad": "<|endoftext|>",
        }
        ids: dict[str, int] = {}
        for name, token in by_string.items():
            from_tok = self.tokenizer.token_to_id(token)
            from_cfg = self.config.token_id(name) if name not in ("im_end", "pad") else None
            if from_cfg is not None and from_tok is not None and from_cfg != from_tok:
                raise CheckpointError(
                    "tokenizer", f"{token} is id {from_tok} in the tokenizer but {from_cfg} in config.json"
                )
            value = from_cfg if from_cfg is not None else from_tok
            if value is not None:
                ids[name] = int(value)
        for required in ("audio", "im_end", "pad"):
            if required not in ids:
                raise CheckpointError("tokenizer", f"the tokenizer has no {by_string[required]} token")
        pad = getattr(self.config.text_config, "pad_token_id", None)
        if pad is not None:
            ids["pad"] = int(pad)
        return ids

    def encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    # ------------------------------------------------------------------ public
    def prepare(self, item: Any, instruction: str | None = None, index: int | None = None,
                defer_features: bool | None = None) -> PreparedItem:
        """One item -> PreparedItem. Raises InputError/UnsupportedItemError/MediaError naming the item.
        `defer_features` (None: the processor's setting) leaves the media features to batch_features."""
        self._check_preset_modality(item, index)
        defer = self.defer_features if defer_features is None else bool(defer_features)
        try:
            if isinstance(item, str):
                return self._text(Text(item), instruction)
            if isinstance(item, Text):
                if not isinstance(item.text, str):
                    raise InputError(item, f"Text.text must be a str, got {type(item.text).__name__}", index)
                return self._text(item, instruction)
            if isinstance(item, Audio):
                return self._audio(item, instruction, defer)
            if isinstance(item, Video):
                return self._video(item, instruction, defer)
            if isinstance(item, AudioVisual):
                return self._audio_visual(item, instruction, defer)
        except (InputError, MediaError) as exc:
            if exc.index is None and index is not None:
                exc.index = index
            raise
        except ValueError as exc:
            # the feature code's own checks (a frame shape the processor cannot resize, ...) are about this item
            raise InputError(item, str(exc), index) from exc
        raise UnsupportedItemError(
            item,
            f"unsupported item type {type(item).__name__}; expected str, wave_rt.Text, wave_rt.Audio, "
            "wave_rt.Video or wave_rt.AudioVisual",
            index,
        )

    def _check_preset_modality(self, item: Any, index: int | None) -> None:
        """A preset lists the modalities its published model embeds; others are refused rather than guessed."""
        if self.config.preset is None:
            return
        from wave_rt.items import modality_of
        from wave_rt.model.embedder_presets import PRESETS

        preset = PRESETS.get(self.config.preset)
        kind = "text" if isinstance(item, str) else modality_of(item)
        if preset is not None and kind is not None and kind not in preset.modalities:
            raise UnsupportedItemError(
                item, f"preset {preset.name!r} embeds {', '.join(preset.modalities)}, not {kind}", index)

    def qa_instruction(self, question: str, options: list[str] | None = None,
                       letters: list[str] | None = None) -> tuple[str, list[str]]:
        """(instruction, option letters) for a multiple-choice question, WAVE style: the question with lettered
        options, then the QA suffix; options are scored as their letters (A, B, ... unless `letters` names
        them) encoded as text targets. Without options the question already lists them and `letters` says
        how; the letters listed in the prompt are always the ones scored."""
        if options:
            if letters is None:
                if len(options) > 26:
                    raise ValueError(f"{len(options)} options: past 26 the letters A-Z run out; pass letters=[...]")
                letters = [chr(ord("A") + i) for i in range(len(options))]
            elif len(letters) != len(options):
                raise ValueError(f"{len(options)} options but {len(letters)} letters: give one letter per option")
            listed = "\n".join(f"{letter}. {o}" for letter, o in zip(letters, options))
            body = f"{question}\n{listed}"
        else:
            letters, body = list(letters or []), question
        if len(set(letters)) != len(letters):
            raise ValueError(f"option letters must differ, got {letters}")
        return f"{body}\n{self.prompts.qa_suffix}", letters

    def qa_prompt(self, question: str | None, options: list[str] | tuple[str, ...], protocol: str = "letters"
                  ) -> tuple[str | None, list[str]]:
        """(the query's instruction, the texts scored as the options) of a multiple-choice question, by QA
        protocol: "letters" is WAVE's (and WaveEncoder.answer's): qa_instruction's prompt, the letters scored;
        "options" asks the bare question (None: the modality's default prompt) and scores the options' own
        texts (MMEB's candidate texts)."""
        if protocol == "letters":
            return self.qa_instruction(question or "", list(options))
        if protocol == "options":
            return question or None, list(options)
        raise ValueError(f"unknown QA protocol {protocol!r}: one of {QA_PROTOCOLS}")

    # ------------------------------------------------------------------ text
    def _fill(self, template: str, **values: str) -> tuple[str, str]:
        """Split a template at {media} and fill the other fields: (text before media, text after)."""
        before, sep, after = template.partition("{media}")
        if not sep:
            before, after = "", template
        return self.prompts.prefix + before.format(**values), after.format(**values)

    def _text(self, item: Text, instruction: str | None) -> PreparedItem:
        if item.side == "target":
            _, text = self._fill(self.prompts.text_target_template, text=item.text)
            use_head = False
        elif item.side == "query":
            instr = instruction if instruction is not None else self.prompts.default_instructions.get("text", "")
            if instr and not instr.endswith(("\n", " ")):
                instr += "\n"
            _, text = self._fill(self.prompts.text_query_template, text=item.text, instruction=instr)
            use_head = True
        else:
            raise InputError(item, f"Text.side must be 'target' or 'query', got {item.side!r}")
        ids = self.encode_text(self.prompts.prefix + text)
        if not item.text.strip():
            raise InputError(item, "empty text")
        sb = SequenceBuilder()
        sb.text(ids)
        input_ids, positions = sb.build()
        inputs = ItemInputs(input_ids, positions, use_head=use_head)
        return PreparedItem("text", inputs.num_tokens, None, inputs)

    # ------------------------------------------------------------------ media helpers
    def _instruction(self, modality: str, instruction: str | None) -> str:
        return instruction if instruction is not None else self.prompts.default_instructions.get(modality, "")

    def _waveform(self, item: Audio) -> tuple[torch.Tensor, float]:
        """The model's waveform (resampled, padded to the backbone's minimum) and the clip's own length in
        seconds before that padding (what the archive records as its duration)."""
        from wave_rt import media

        src = item.source
        sr = self.config.media.sample_rate
        if isinstance(src, (np.ndarray, torch.Tensor)):
            if item.sample_rate is None:
                raise InputError(item, "a raw waveform needs sample_rate=")
            rate = item.sample_rate
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and rate > 0):
                raise InputError(item, f"sample_rate must be a positive number of samples per second, got {rate!r}")
            wav = torch.as_tensor(np.asarray(src) if isinstance(src, np.ndarray) else src)
            if wav.ndim == 2:
                if wav.shape[0] > wav.shape[1]:
                    raise InputError(item, f"waveform of shape {tuple(wav.shape)} looks like [samples, channels] "
                                           "(soundfile's layout); pass [channels, samples], e.g. wav.T")
                wav = wav[0]  # first channel, as WAVE reads multi-channel files
            if wav.ndim != 1 or wav.numel() == 0:
                raise InputError(item, f"waveform must be 1-D or [channels, samples] and non-empty, got {tuple(wav.shape)}")
            wav = _pcm_to_float(item, wav)
            if not torch.isfinite(wav).all():
                raise InputError(item, "waveform contains NaN or infinite samples")
            if item.sample_rate != sr:
                wav = media.resample(wav, item.sample_rate, sr)
            # WAVE pads to 1 s; MiDashengLM's processor pads only to 3200 samples (0.2 s). Files still go through
            # media.load_audio's 1 s rule, so a file shorter than 1 s differs from MiDashengLM's own processing.
            min_len = MIDASHENGLM_MIN_SAMPLES if self.config.backbone == MIDASHENGLM else sr
            seconds = src.shape[-1] / item.sample_rate  # the clip's own length, before the padding below
            return torch.nn.functional.pad(wav, (0, max(0, min_len - wav.numel()))), seconds
        source = _as_source(item, src)
        from wave_rt.media.audio import finish_audio, load_audio_native

        native, native_sr = load_audio_native(source, backend=self.media_backend)
        return finish_audio(native[0], native_sr, sr), native.shape[-1] / native_sr

    def _audio_segments(self, wav: torch.Tensor, defer: bool = False) -> list[AudioSegmentInputs]:
        """The audio tower inputs of one waveform. Deferred: each segment keeps the exact waveform its features
        are computed from (Qwen2-Audio's zero-padded 30 s window included) and its counts from the sample count;
        batch_features computes the features of the whole segment (as many frames as its samples give)."""
        from wave_rt import media
        from wave_rt.media.features_audio import whisper_frames

        cfg = self.config
        sr = cfg.media.sample_rate
        if cfg.backbone == MIDASHENGLM:
            from wave_rt.media.features_dasheng import dasheng_log_mel, dasheng_tokens

            # One clip: Dasheng chunks long inputs itself (10.08 s windows), so no 300 s segmenting is needed.
            # Its front end stays on the CPU here in both modes (its per-item reflect padding has no batched
            # form in batch_features yet).
            mel = dasheng_log_mel(wav)
            tokens = dasheng_tokens(wav.numel(), int(cfg.hf_config.subsample_factor))
            return [AudioSegmentInputs(mel, mel.shape[-1], tokens)]
        if cfg.backbone == QWEN2_AUDIO:
            n = min(wav.numel(), int(QWEN2_AUDIO_SECONDS * sr))
            padded = torch.nn.functional.pad(wav[:n], (0, int(QWEN2_AUDIO_SECONDS * sr) - n))
            if defer:
                frames = min(math.ceil(n / WHISPER_HOP), whisper_frames(padded.numel()))
                return [AudioSegmentInputs(None, frames, whisper_tokens(frames), waveform=padded)]
            mel, _ = media.whisper_log_mel(padded)
            frames = min(math.ceil(n / WHISPER_HOP), mel.shape[-1])
            return [AudioSegmentInputs(mel.contiguous(), frames, whisper_tokens(frames))]
        segments = []
        for seg in media.audio_segments(wav, sample_rate=sr, seconds=cfg.media.audio_segment_seconds):
            if defer:
                frames = whisper_frames(seg.numel())
                segments.append(AudioSegmentInputs(None, frames, whisper_tokens(frames), waveform=seg.contiguous()))
                continue
            mel, mask = media.whisper_log_mel(seg)
            frames = int(mask.sum())
            fbank = media.beats_fbank(seg) if cfg.use_beats else None
            segments.append(AudioSegmentInputs(mel[:, :frames].contiguous(), frames, whisper_tokens(frames), fbank))
        return segments

    def _audio_block_tokens(self, segments: list[AudioSegmentInputs]) -> tuple[int, int]:
        """(Whisper tokens, repeat): BEATs-only models use one BEATs token per Whisper slot."""
        return sum(s.tokens for s in segments), 2 if self.config.dual_audio else 1

    def _video_features(self, frames: torch.Tensor, fps: float, defer: bool = False) -> dict[str, Any]:
        """The vision inputs of one clip as ItemInputs fields (pixel_values, grid_thw, second_per_grid; deferred:
        the uint8 frames and their target size instead of pixel_values) and its VideoGrid under "grid"."""
        from wave_rt import media
        from wave_rt.media import features_video as fv

        m = self.config.media
        if defer:
            height, width, (t, h, w) = fv.video_grid(frames, fps, max_pixels=m.max_pixels, min_pixels=m.min_pixels)
            grid = VideoGrid(t, h, w, fv.second_per_grid(fps))
            fields: dict[str, Any] = {"frames": frames.contiguous(), "frame_size": (height, width)}
        else:
            feats = media.patchify_video(frames, max_pixels=m.max_pixels, min_pixels=m.min_pixels, fps=fps)
            t, h, w = (int(x) for x in feats.video_grid_thw.tolist())
            grid = VideoGrid(t, h, w, float(feats.video_second_per_grid))
            fields = {"pixel_values": feats.pixel_values_videos}
        fields.update(grid_thw=(grid.t, grid.h, grid.w), second_per_grid=grid.second_per_grid, grid=grid)
        return fields

    def _clip(self, item: Video | AudioVisual) -> Any:
        from wave_rt import media

        return media.load_video(_as_source(item, item.source), **self._video_options())

    def _video_options(self) -> dict[str, Any]:
        """The frame-sampling settings every video decode of this model uses (video and AV alike)."""
        m = self.config.media
        return {"fps": m.fps, "max_frames": m.max_frames, "max_pixels": m.max_pixels, "min_pixels": m.min_pixels,
                "backend": self.media_backend}

    def _media_sequence(self, modality: str, instruction: str | None, emit_media) -> tuple[torch.Tensor, torch.Tensor]:
        instr = self._instruction(modality, instruction)
        before, after = self._fill(self.prompts.media_template, instruction=instr)
        sb = SequenceBuilder()
        sb.text(self.encode_text(before))
        emit_media(sb)
        sb.text(self.encode_text(after))
        return sb.build()

    # ------------------------------------------------------------------ audio / video / av
    def _audio(self, item: Audio, instruction: str | None, defer: bool = False) -> PreparedItem:
        wav, duration = self._waveform(item)
        segments = self._audio_segments(wav, defer)
        n, repeat = self._audio_block_tokens(segments)
        ids = self.ids

        def emit(sb: SequenceBuilder) -> None:
            sb.audio(n * repeat, audio_id=ids["audio"], bos_id=ids["audio_bos"], eos_id=ids["audio_eos"])

        input_ids, positions = self._media_sequence("audio", instruction, emit)
        inputs = ItemInputs(input_ids, positions, use_head=True, audio=segments)
        return PreparedItem("audio", inputs.num_tokens, duration, inputs)

    def _require_vision(self, item: object) -> None:
        if self.config.backbone in (QWEN2_AUDIO, MIDASHENGLM) or "video" not in self.ids:
            raise UnsupportedItemError(item, f"the {self.config.backbone} backbone has no vision encoder")

    def _video(self, item: Video, instruction: str | None, defer: bool = False) -> PreparedItem:
        self._require_vision(item)
        if isinstance(item.source, (np.ndarray, torch.Tensor)):
            frames = torch.as_tensor(item.source)
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
                raise InputError(item, f"frames must be uint8 [T, H, W, 3], got {tuple(frames.shape)} {frames.dtype}")
            if frames.shape[0] == 0:
                raise InputError(item, "a video needs at least one frame")
            rate = self.config.media.fps if item.fps is None else item.fps
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and rate > 0):
                raise InputError(item, f"fps must be the frames' positive rate, got {item.fps!r}")
            # sampled as a decoded file is: about the model's fps over the clip, at most max_frames; frames given
            # without fps are taken as already sampled at the model's rate (then only the cap applies)
            from wave_rt.media.video import sample_frame_ids

            m = self.config.media
            duration = frames.shape[0] / rate
            frames = frames[torch.from_numpy(sample_frame_ids(frames.shape[0], rate, m.fps, m.max_frames))]
            fps = frames.shape[0] / duration
        else:
            clip = self._clip(item)
            frames, fps, duration = clip.frames, clip.fps, clip.duration
        vision = self._video_features(frames, fps, defer)
        grid = vision.pop("grid")
        ids = self.ids

        def emit(sb: SequenceBuilder) -> None:
            sb.video(grid, video_id=ids["video"], bos_id=ids["vision_bos"], eos_id=ids["vision_eos"],
                     position_id_per_seconds=self._pps())

        input_ids, positions = self._media_sequence("video", instruction, emit)
        inputs = ItemInputs(input_ids, positions, True, **vision)
        return PreparedItem("video", inputs.num_tokens, duration, inputs)

    def _pps(self) -> float:
        return float(getattr(self.config.hf_config, "position_id_per_seconds", 25))

    def _audio_visual(self, item: AudioVisual, instruction: str | None, defer: bool = False) -> PreparedItem:
        from wave_rt import media

        self._require_vision(item)
        av = media.load_av(_as_source(item, item.source), **self._video_options())
        if not av.has_audio:
            raise InputError(item, "has no audio track; encode it as wave_rt.Video")
        vision = self._video_features(av.video.frames, av.video.fps, defer)
        grid = vision.pop("grid")
        segments = self._audio_segments(av.audio, defer)
        n, repeat = self._audio_block_tokens(segments)
        ids = self.ids
        rule = "wave" if self.config.wave_chunking else "transformers"

        def emit(sb: SequenceBuilder) -> None:
            if self.config.recipe.av_layout == "separate":
                # the two streams one after the other, as Omni-Embed-Nemotron feeds a document's video and audio
                sb.video(grid, video_id=ids["video"], bos_id=ids["vision_bos"], eos_id=ids["vision_eos"],
                         position_id_per_seconds=self._pps())
                sb.audio(n * repeat, audio_id=ids["audio"], bos_id=ids["audio_bos"], eos_id=ids["audio_eos"])
                return
            sb.audio_visual(
                grid, n, audio_repeat=repeat, rule=rule,
                video_id=ids["video"], audio_id=ids["audio"],
                vision_bos_id=ids["vision_bos"], vision_eos_id=ids["vision_eos"],
                audio_bos_id=ids["audio_bos"], audio_eos_id=ids["audio_eos"],
                position_id_per_seconds=self._pps(),
                seconds_per_chunk=float(getattr(self.config.hf_config, "seconds_per_chunk", 2)),
            )

        input_ids, positions = self._media_sequence("av", instruction, emit)
        inputs = ItemInputs(input_ids, positions, True, audio=segments, **vision)
        return PreparedItem("av", inputs.num_tokens, av.video.duration, inputs)


def _as_source(item: object, src: object) -> str | bytes:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    raise InputError(item, f"source must be a path, bytes, or decoded samples/frames, got {type(src).__name__}")




def _pcm_to_float(item: object, wav: torch.Tensor) -> torch.Tensor:
    """A raw waveform as float32 samples in [-1, 1]: integer PCM is scaled as soundfile reads it from a file
    (int16 / 2**15, int32 / 2**31, uint8 centred on 128), so an array and its WAV file embed alike."""
    if wav.is_floating_point():
        return wav.to(torch.float32)
    scale = {torch.int16: 2.0 ** 15, torch.int32: 2.0 ** 31, torch.int8: 2.0 ** 7}.get(wav.dtype)
    if scale is not None:
        return wav.to(torch.float32) / scale
    if wav.dtype == torch.uint8:
        return (wav.to(torch.float32) - 128.0) / 128.0
    raise InputError(item, f"waveform dtype {wav.dtype} is neither float samples in [-1, 1] nor 8/16/32-bit PCM")
