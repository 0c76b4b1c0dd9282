"""Errors of the archive job. They subclass wave_rt.errors' types so `except WaveRTError` catches them."""

from __future__ import annotations

from wave_rt.errors import WaveRTError


class SourceError(WaveRTError, ValueError):
    """The SOURCE of a job cannot be read as a whole (missing, unknown format, a manifest without
    a path or text column). Per-item problems are not raised: they go to errors.jsonl."""

    def __init__(self, source: object, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"source {self.source}: {reason}")


class JobOptionsError(WaveRTError, ValueError):
    """A setting of an archive job (wave_rt.archive.options.JobOptions) has a bad value."""

    def __init__(self, option: str, value: object, reason: str) -> None:
        self.option = option
        self.value = value
        self.reason = reason
        super().__init__(f"option {option}={value!r}: {reason}")


class ArchiveMismatchError(WaveRTError):
    """The output directory holds embeddings made with other settings (model, dtype, instruction...);
    mixing them would silently corrupt the archive."""

    def __init__(self, out_dir: object, differences: dict[str, tuple[object, object]]) -> None:
        self.out_dir = str(out_dir)
        self.differences = differences
        lines = [f"  {key}: the directory has {_show(key, old)}, this run would use {_show(key, new)}"
                 for key, (old, new) in differences.items()]
        super().__init__(
            f"{self.out_dir} already holds embeddings made with different settings:\n" + "\n".join(lines)
            + "\nEmbeddings from different settings must not be mixed: choose another --out directory, "
            "or delete this one to start over."
        )


def _show(key: str, value: object) -> str:
    if value is None and key == "instruction":
        return "no instruction (the default prompts)"
    return repr(value)


class ArchiveFormatError(WaveRTError):
    """A file of an archive directory is unreadable or not what wave_rt writes."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ArchiveLockedError(WaveRTError):
    """Another process is writing to the same output directory."""

    def __init__(self, out_dir: object) -> None:
        self.out_dir = str(out_dir)
        super().__init__(f"{self.out_dir} is being written by another wave-rt embed process; "
                         "wait for it to finish or choose another --out directory")


class DecodeWorkerCrashError(WaveRTError):
    """The worker process preparing an item died (killed, or a decoder crash) on every attempt at it."""

    def __init__(self, item: object, how: str, attempts: int) -> None:
        self.item = str(item)
        self.how = how
        self.attempts = attempts
        super().__init__(f"{self.item}: the decode worker process died ({how}) on each of {attempts} attempts")
