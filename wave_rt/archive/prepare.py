"""One item from source to model input: pick its modality, build the wave_rt item, decode + preprocess it
(encoder.prepare). Failures become ErrorRecords, never exceptions: one bad item never stops a job.

Used by the local pipeline's decode threads, its worker processes (prepare_pool) and the Ray engine."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wave_rt.archive.journal import ErrorRecord
from wave_rt.archive.shards import ShardRow, recordable
from wave_rt.archive.sources import AUDIO_EXTS, SourceEntry
from wave_rt.errors import InputError, MediaError, WaveRTError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- items
def _probe_streams(path: str) -> tuple[bool, bool]:
    """(has_audio, has_video) of a media file. Uses wave_rt.media.probe; raises MediaError subclasses."""
    from wave_rt import media

    info = media.probe(path)
    return bool(info.has_audio), bool(info.has_video)


def resolve_modality(src: SourceEntry, probe: Callable[[str], tuple[bool, bool]] = _probe_streams) -> str:
    """The modality an item is embedded as. 'auto' on a file: audio extensions are audio; anything else
    is probed: video with an audio track -> 'av', video alone -> 'video', audio alone -> 'audio'."""
    if src.modality != "auto":
        return src.modality
    if src.path is None:
        return "text"
    if os.path.splitext(src.path)[1].lower() in AUDIO_EXTS:
        return "audio"
    has_audio, has_video = probe(src.path)
    if has_video:
        return "av" if has_audio else "video"
    if has_audio:
        return "audio"
    raise MediaError(src.path, "has neither an audio nor a video stream")


def to_item(src: SourceEntry, modality: str) -> Any:
    """The wave_rt item (str, Audio, Video, AudioVisual) for a source item."""
    from wave_rt.items import Audio, AudioVisual, Video

    if modality == "text":
        if src.text is not None:
            return src.text
        try:
            with open(src.path, encoding="utf-8") as f:  # type: ignore[arg-type]
                return f.read()
        except UnicodeDecodeError as exc:
            raise InputError(src.path, f"not UTF-8 text: {exc.reason}") from None
    if modality == "audio":
        return Audio(src.path)
    if modality == "video":
        return Video(src.path)
    if modality == "av":
        return AudioVisual(src.path)
    raise InputError(src.id, f"unknown modality {modality!r}")


@dataclass
class PreparedEntry:
    """A SourceEntry with its PreparedItem (what encoder.prepare made of it): what the batcher queues. `key`
    orders entries within the job; `instruction` is what the item is embedded with."""

    key: int
    src: SourceEntry
    modality: str
    instruction: str | None  # what the item was embedded with (None: the model's default / text target)
    prepared: Any  # PreparedItem
    num_tokens: int = field(init=False)  # read per item by the batcher, the runner and the writer's accounting

    def __post_init__(self) -> None:
        self.num_tokens = int(self.prepared.num_tokens)

    def row(self) -> ShardRow:
        # the shard records a non-UTF-8 file name with escapes; src.path keeps the bytes that open the file
        return ShardRow(id=self.src.id, path=recordable(self.src.path), modality=self.modality,
                   duration=None if self.prepared.duration is None else float(self.prepared.duration),
                   text=self.src.text, instruction=self.instruction)


def error_record(src: SourceEntry, stage: str, exc: BaseException, retryable: bool) -> ErrorRecord:
    message = str(exc) or type(exc).__name__
    return ErrorRecord(id=src.id, path=src.path, stage=stage, error=type(exc).__name__, message=message,
                       retryable=retryable)


_unexpected_logged = 0


def prepare_one(encoder: Any, src: SourceEntry, key: int, instruction: str | None,
                probe: Callable[[str], tuple[bool, bool]] = _probe_streams) -> PreparedEntry | ErrorRecord:
    """Decode + preprocess one item; failures become error records (typed media/input errors are
    permanent, anything else is marked retryable so that a fixed bug or a flaky disk gets a second try)."""
    global _unexpected_logged
    stage = "decode"
    try:
        modality = resolve_modality(src, probe)
        item = to_item(src, modality)
        stage = "preprocess"
        instr = None if modality == "text" else (src.instruction if src.instruction is not None else instruction)
        prepared = encoder.prepare(item, instr)
        return PreparedEntry(key, src, modality, instr, prepared)
    except MediaError as exc:
        return error_record(src, "decode", exc, retryable=False)
    except InputError as exc:
        return error_record(src, stage, exc, retryable=False)
    except WaveRTError as exc:
        return error_record(src, stage, exc, retryable=False)
    except FileNotFoundError as exc:
        return error_record(src, "decode", exc, retryable=False)
    except Exception as exc:  # noqa: BLE001 - one bad item must not stop a million-item job
        if _unexpected_logged < 3:
            _unexpected_logged += 1
            log.warning("unexpected error preparing %s (%s)", src.id, src.path, exc_info=True)
        return error_record(src, stage, exc, retryable=True)
