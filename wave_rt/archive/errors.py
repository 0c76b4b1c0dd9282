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

    def __init__(self, out_dir: object, differences: dict[str, tuple[object, object]], *,
                 user: str = "this run", advice: str | None = None) -> None:
        self.out_dir = str(out_dir)
        self.differences = differences
        lines = [f"  {key}: the directory has {_show(key, old)}, {user} would use {_show(key, new)}"
                 for key, (old, new) in differences.items()]
        if advice is None:
            advice = ("Embeddings from different settings must not be mixed: choose another --out directory, "
                      "or delete this one to start over.")
        super().__init__(
            f"{self.out_dir} already holds embeddings made with different settings:\n" + "\n".join(lines)
            + "\n" + advice
        )


class SearchMismatchError(ArchiveMismatchError):
    """The model that would encode the queries is not the one the archive was embedded with (another
    model, weights or compute dtype): its vectors would not share the archive's space. The archive itself
    is fine, so the advice is to load its model, never to delete it."""

    def __init__(self, out_dir: object, differences: dict[str, tuple[object, object]], *, model_id: str,
                 model_path: str, dtype: str) -> None:
        self.model_id = model_id
        self.model_path = model_path
        self.dtype = dtype
        origin = "the bundled demo model" if model_path == "demo" else repr(model_path)
        super().__init__(
            out_dir, differences, user="the query encoder",
            advice=f"Queries must be encoded by the model the archive was embedded with: {model_id!r} (from "
                   f"{origin}) in {dtype}. With `wave-rt search`, leave --dtype out or pass --dtype {dtype}, "
                   "and pass --model only to point at a moved copy of that model.",
        )


class IndexOptionsError(WaveRTError, ValueError):
    """A setting of wave_rt.Index.build (kind, nlist...) that the archive cannot satisfy."""

    def __init__(self, out_dir: object, option: str, value: object, reason: str) -> None:
        self.out_dir = str(out_dir)
        self.option = option
        self.value = value
        self.reason = reason
        super().__init__(f"{self.out_dir}: {option}={value!r}: {reason}")


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
