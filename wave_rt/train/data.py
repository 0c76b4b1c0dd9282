"""Training pairs from a manifest (JSONL, CSV or Parquet) and the deterministic batch plan.

One row is one pair. Columns:
  query_text | query_path (+ query_modality: audio | video | av, default from the file extension)
  target_text | target_path (+ target_modality)
  instruction (optional: the query's prompt instruction), task (optional: a task name), id (optional)
Relative paths are resolved against the manifest's folder. Query texts are encoded as Text(side="query")
(through the recipe's head), target texts as plain strings (the text-target head), as WAVE does.

Bad rows never stop training and are never silently lost: a row with wrong columns or a missing file is
skipped when the manifest is read, a row whose media cannot be decoded or whose text is empty is skipped
when it is first prepared; each is counted by reason and logged (once) with a typed error naming the
manifest, the row and the reason (`PairRowError`, or the MediaError/InputError the processor raised).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wave_rt.errors import InputError, MediaError, WaveRTError
from wave_rt.items import Audio, AudioVisual, Text, Video
from wave_rt.manifest_text import open_text, undecodable

log = logging.getLogger(__name__)

VIDEO_EXT = {".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"}
AUDIO_EXT = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a", ".aac"}
MODALITIES = {"audio": Audio, "video": Video, "av": AudioVisual}


class PairRowError(WaveRTError, ValueError):
    """A manifest row cannot be used as a training pair."""

    def __init__(self, manifest: object, row: int, reason: str) -> None:
        self.manifest, self.row, self.reason = str(manifest), row, reason
        super().__init__(f"{self.manifest} row {row}: {reason}")


@dataclass(frozen=True)
class Pair:
    row: int  # 0-based row number in the manifest (the id used in logs)
    query: Any  # an Item
    target: Any  # an Item
    instruction: str | None = None
    task: str = ""
    id: str = ""
    modality: str = "text"  # the query's modality (eval reports per modality)
    # explicit negatives (WAVE's `neg_text`, e.g. a QA row's wrong options): the query is trained against its
    # target and these only (ContrastiveLoss.options), in batches of such rows
    negatives: tuple[str, ...] = ()
    # a QA row in eval's format: (question, options, answer index); PairSource asks it by its QA protocol
    qa: tuple[str | None, tuple[str, ...], int] | None = None


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The manifest's rows as dicts (values as read; empty CSV cells are '')."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with open_text(path) as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                bad = undecodable(line)
                if bad:
                    rows.append({"__error__": bad, "__line__": n})
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    rows.append({"__error__": f"invalid JSON ({exc.msg})", "__line__": n})
                    continue
                rows.append(value if isinstance(value, dict) else {"__error__": "a JSON line must be an object"})
        return rows
    if suffix == ".csv":
        rows = []
        with open_text(path) as f:
            for row in csv.DictReader(f):
                bad = next((undecodable(v) for v in row.values() if isinstance(v, str) and undecodable(v)), None)
                rows.append({"__error__": bad} if bad else row)
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise PairRowError(path, -1, f"unknown manifest format {suffix!r}; use .jsonl, .csv or .parquet")


def parse_side(row: dict[str, Any], side: str, root: Path) -> tuple[Any, str]:
    text = row.get(f"{side}_text")
    path = row.get(f"{side}_path")
    path = None if path in (None, "") else path
    if text == "" and path is None:
        raise ValueError(f"{side}_text is empty")
    text = None if text in (None, "") else text
    if (text is None) == (path is None):
        raise ValueError(f"needs exactly one of {side}_text and {side}_path (columns: {', '.join(map(str, row))})")
    if text is not None:
        if not isinstance(text, str):
            raise ValueError(f"{side}_text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{side}_text is empty")
        return (Text(text, side="query") if side == "query" else text), "text"
    file = Path(str(path))
    file = file if file.is_absolute() else root / file
    if not file.exists():
        raise ValueError(f"{side}_path {file} does not exist")
    modality = row.get(f"{side}_modality") or ""
    if not modality:
        ext = file.suffix.lower()
        modality = "video" if ext in VIDEO_EXT else "audio" if ext in AUDIO_EXT else ""
    if modality not in MODALITIES:
        raise ValueError(f"{side}_modality must be one of {', '.join(MODALITIES)} (got {modality!r} for {file.name})")
    return MODALITIES[modality](str(file)), modality


def parse_options(value: Any) -> list[str]:
    """A QA row's options: a list, or a string split on "|"."""
    return value.split("|") if isinstance(value, str) else [str(o) for o in value]


def answer_index(answer: Any, options: Sequence[str]) -> int:
    """The 0-based option a QA row's `answer` names: an index (int or digits), a letter (A = the first
    option, as the QA prompt lists them), or the exact text of one option. ValueError says why not."""
    n = len(options)
    if isinstance(answer, bool) or answer is None or answer == "":
        raise ValueError(f"answer {answer!r} is not an option index, letter or text")
    form: int | None = None  # the index the answer's form gives (a number or a letter), in range or not
    if isinstance(answer, int) or (isinstance(answer, float) and answer.is_integer()):
        form = int(answer)
    elif isinstance(answer, str) and answer.strip().isdecimal():
        form = int(answer.strip())
    elif isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
        form = ord(answer.upper()) - ord("A")
    by_text = [i for i, o in enumerate(options) if isinstance(answer, str) and o == answer]
    if form is not None and 0 <= form < n:
        if by_text and by_text != [form]:
            raise ValueError(f"answer {answer!r} is ambiguous: as an index or letter it names option {form} "
                             f"({options[form]!r}), but it is the text of option {by_text[0]}")
        return form
    if len(by_text) == 1:
        return by_text[0]
    if by_text:
        raise ValueError(f"answer {answer!r} is the text of several options ({by_text}); give its index or letter")
    last = chr(ord("A") + n - 1)
    raise ValueError(f"answer {answer!r} is not one of the {n} options: give an index 0-{n - 1}, a letter A-{last}, "
                     f"or the exact text of one of {list(options)}")


NEGATIVE_COLUMNS = ("negatives", "neg_text")  # ours, and WAVE's name for the same list


def parse_negatives(row: dict[str, Any], target: Any) -> tuple[str, ...]:
    """A row's explicit negatives: a list of texts (JSONL/Parquet), or in a CSV cell a JSON list or texts
    separated by '|'. They are embedded as text targets, like the target they compete with, so the target
    must be a text too."""
    given = [c for c in NEGATIVE_COLUMNS if row.get(c) not in (None, "", [])]
    if not given:
        return ()
    if len(given) > 1:
        raise ValueError(f"give the negatives in one column, not both {' and '.join(given)}")
    value = row[given[0]]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{given[0]}: not a JSON list ({exc.msg})") from None
        else:
            value = [part.strip() for part in text.split("|")]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{given[0]} must be a list of non-empty texts, got {value!r}")
    if not isinstance(target, str):
        raise ValueError(f"{given[0]} are texts and compete with the target: the target must be target_text")
    if target in value:
        raise ValueError(f"{given[0]} holds the target itself ({target!r})")
    return tuple(value)


def qa_target(row: dict[str, Any]) -> tuple[str | None, tuple[str, ...], int]:
    """A QA row as `wave-rt eval` reads it (`options`, `answer`, `question` or `instruction`): (question,
    options, answer index). It trains as eval asks it (PairSource, by the QA protocol): the answer as the
    target, the other options as its negatives."""
    if any(row.get(c) not in (None, "") for c in ("target_text", "target_path", *NEGATIVE_COLUMNS)):
        raise ValueError("a QA row (options and answer) gives its target and negatives through them: "
                         "leave target_text, target_path and negatives empty")
    options = parse_options(row["options"])
    if len(options) < 2 or not all(o.strip() for o in options):
        raise ValueError(f"options must be two or more non-empty texts, got {options!r}")
    answer = answer_index(row.get("answer"), options)
    if options.count(options[answer]) > 1:
        raise ValueError(f"the answer's option {options[answer]!r} appears more than once")
    question = row.get("question") or row.get("instruction") or None
    return question, tuple(options), answer


def load_pairs(manifest: str | Path, skipped: Counter | None = None) -> list[Pair]:
    """Parse and check every row (columns, non-empty texts, files that exist); bad rows are logged and
    counted in `skipped` by reason class, not returned."""
    manifest = Path(manifest)
    root = manifest.parent
    pairs: list[Pair] = []
    for n, row in enumerate(read_rows(manifest)):
        try:
            if "__error__" in row:
                raise ValueError(row["__error__"])
            query, modality = parse_side(row, "query", root)
            qa = None
            if row.get("options") not in (None, "", []):
                qa = qa_target(row)
                instruction, options, answer = qa
                target, negatives = options[answer], tuple(o for i, o in enumerate(options) if i != answer)
            else:
                target, _ = parse_side(row, "target", root)
                instruction = row.get("instruction") or None
                negatives = parse_negatives(row, target)
            pairs.append(Pair(n, query, target, instruction, str(row.get("task") or ""), str(row.get("id") or n),
                              modality, negatives, qa))
        except ValueError as exc:
            err = PairRowError(manifest, n, str(exc))
            log.warning("skipping %s", err)
            if skipped is not None:
                skipped["bad_row"] += 1
    if not pairs:
        raise PairRowError(manifest, -1, "no usable rows")
    return pairs


class PairSource:
    """Prepares pairs on demand through the inference processor; remembers failures (skipped, counted and
    logged once) and, with cache=True, the prepared tensors (small corpora: every epoch reuses them)."""

    def __init__(self, pairs: Sequence[Pair], processor: Any, cache: bool = False, qa_protocol: str = "letters"
                 ) -> None:
        self.pairs = list(pairs)
        self.processor = processor
        self.cache = cache
        self.qa_protocol = qa_protocol
        self._prepared: dict[int, tuple[Any, ...]] = {}
        self.bad: dict[int, str] = {}
        self.skipped: Counter = Counter()

    def __len__(self) -> int:
        return len(self.pairs)

    def prepare(self, index: int) -> tuple[Any, ...] | None:
        """(query, target), or (query, target, negatives) for a row with explicit negatives; None if it failed."""
        if index in self._prepared:
            return self._prepared[index]
        if index in self.bad:
            return None
        pair = self.pairs[index]
        instruction, target, negatives = pair.instruction, pair.target, pair.negatives
        try:
            if pair.qa is not None:
                question, options, answer = pair.qa
                instruction, scored = self.processor.qa_prompt(question, options, self.qa_protocol)
                target, negatives = scored[answer], tuple(t for i, t in enumerate(scored) if i != answer)
            out = (self.processor.prepare(pair.query, instruction, index=pair.row),
                   self.processor.prepare(target, index=pair.row))
            if negatives:
                out += (tuple(self.processor.prepare(n, index=pair.row) for n in negatives),)
        except (MediaError, InputError) as exc:
            self.bad[index] = f"{type(exc).__name__}: {exc}"
            self.skipped["media" if isinstance(exc, MediaError) else "input"] += 1
            log.warning("skipping training pair (row %d): %s", pair.row, self.bad[index])
            return None
        if self.cache:
            self._prepared[index] = out
        return out


def target_key(item: Any) -> str:
    """Identity of a target: its text, or its file (two rows with one caption share a target)."""
    return item if isinstance(item, str) else f"{type(item).__name__}:{getattr(item, 'source', item)}"


class BatchPlan:
    """Which rows form global batch k, a pure function of (seed, epoch): resuming at step s needs nothing
    but s. Rows are shuffled per epoch; with one_task_per_batch, every batch draws from a single task (WAVE's
    sampler), batches of all tasks then shuffled together. A task's last, incomplete batch is filled with the
    first rows of its own shuffled order (wrap-around, as WAVE's TypeAwareBatchSampler pads), so every row
    trains every epoch; a task with fewer rows than one batch cannot fill one and is left out, with a
    warning naming it. With distinct_targets, no batch holds two rows with the same target (an identical
    caption would be its twin's negative); there incomplete batches are dropped instead of filled."""

    def __init__(self, pairs: Sequence[Pair], global_batch: int, seed: int, one_task_per_batch: bool = False,
                 distinct_targets: bool = False) -> None:
        if global_batch < 1:
            raise ValueError(f"batch size must be >= 1, got {global_batch}")
        self.global_batch = global_batch
        self.seed = seed
        self.keys = [target_key(p.target) for p in pairs] if distinct_targets else None
        self.tasks: dict[str, list[int]] = {}
        for i, p in enumerate(pairs):
            # rows with explicit negatives train with another loss (ContrastiveLoss.options): never in a batch
            # with plain pairs, whatever one_task_per_batch says
            task = p.task if one_task_per_batch else ""
            self.tasks.setdefault(f"{task} (with negatives)" if p.negatives else task, []).append(i)
        self._lengths: list[int] = []
        self.left_out = {t: len(rows) for t, rows in self.tasks.items() if len(rows) < global_batch}
        if self.left_out and len(self.left_out) < len(self.tasks):
            log.warning("tasks with fewer rows than one global batch of %d are not trained: %s (add rows, lower "
                        "data.batch_size, or set one_task_per_batch = false)", global_batch,
                        ", ".join(f"{t or '(no task)'}: {n} rows" for t, n in sorted(self.left_out.items())))
        if not self.epoch_batches(0):
            raise ValueError(f"no task yields a batch of {global_batch} rows: lower the batch size (rows per task: "
                             f"{ {k: len(v) for k, v in self.tasks.items()} }, distinct targets: {distinct_targets})")

    def _split(self, rows: list[int]) -> list[list[int]]:
        b = self.global_batch
        if self.keys is None:
            if len(rows) < b:
                return []
            padded = rows + rows[:(-len(rows)) % b]  # the last batch wraps around to the first rows
            return [padded[i:i + b] for i in range(0, len(padded), b)]
        batches, pending = [], rows
        while len(pending) >= b:
            batch, seen, rest = [], set(), []
            for r in pending:
                if len(batch) < b and self.keys[r] not in seen:
                    batch.append(r)
                    seen.add(self.keys[r])
                else:
                    rest.append(r)
            if len(batch) < b:
                break
            batches.append(batch)
            pending = rest
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches = []
        for task in sorted(self.tasks):
            rows = list(self.tasks[task])
            rng.shuffle(rows)
            batches += self._split(rows)
        rng.shuffle(batches)
        return batches

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global step `step`."""
        epoch = 0
        while True:
            if epoch == len(self._lengths):
                self._lengths.append(len(self.epoch_batches(epoch)))
            if step < self._lengths[epoch]:
                return epoch, step
            step -= self._lengths[epoch]
            epoch += 1

    def batch(self, step: int) -> list[int]:
        epoch, k = self.position(step)
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch, self._cached = epoch, self.epoch_batches(epoch)
        return self._cached[k]
