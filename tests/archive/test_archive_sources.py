"""Sources: directory walk, glob, manifests (JSONL / CSV / TSV / Parquet), single files, stable ids, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from wave_rt.archive.errors import SourceError
from wave_rt.archive.pipeline import resolve_modality
from wave_rt.archive.sources import (
    DirectorySource,
    FileSource,
    GlobSource,
    ManifestSource,
    SourceEntry,
    open_source,
)


def _touch(root: Path, *names: str) -> None:
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_archive_sources_directory_walk_is_sorted_recursive_and_filtered(tmp_path: Path) -> None:
    _touch(tmp_path, "b.WAV", "a/z.mp4", "a/b/c.flac", "a/readme.txt", ".git/x.wav", "a/.hidden.ogg", "c.webm",
           "m.parquet")
    src = open_source(tmp_path)
    assert isinstance(src, DirectorySource)
    items = list(src)
    assert [i.id for i in items] == ["b.WAV", "c.webm", "a/z.mp4", "a/b/c.flac"]
    assert all(os.path.isabs(i.path) and i.modality == "auto" and i.text is None for i in items)
    assert list(open_source(tmp_path)) == items  # deterministic: same ids, same order, every time
    assert {i.modality for i in open_source(tmp_path, "video")} == {"video"}
    with pytest.raises(SourceError, match="manifest"):
        open_source(tmp_path, "text")


def test_archive_sources_glob_ids_relative_to_fixed_prefix(tmp_path: Path) -> None:
    _touch(tmp_path, "clips/a/1.mp4", "clips/b/2.mp4", "clips/b/3.wav", "clips/top.mp4")
    src = open_source(str(tmp_path / "clips" / "**" / "*.mp4"))
    assert isinstance(src, GlobSource)
    assert [i.id for i in src] == ["a/1.mp4", "b/2.mp4", "top.mp4"]


def test_archive_sources_single_file_and_unknown(tmp_path: Path) -> None:
    _touch(tmp_path, "one.ogg", "x.bin")
    src = open_source(tmp_path / "one.ogg")
    assert isinstance(src, FileSource) and [i.id for i in src] == ["one.ogg"]
    with pytest.raises(SourceError, match="unknown file type"):
        open_source(tmp_path / "x.bin")
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "missing")
    with pytest.raises(ValueError, match="modality"):
        open_source(tmp_path, "smell")


def test_archive_sources_jsonl_rows(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    lines = [
        {"path": "media/a.wav"},
        {"id": 7, "text": "hello", "instruction": "ignored for text"},
        {"text": "no id"},
        {"path": "/abs/v.mp4", "modality": "video", "text": "a caption", "instruction": "Describe."},
        {"path": "b.txt", "modality": "text"},
        {"id": "bad", "path": 3},
        {"id": "both-missing"},
        {"id": "m", "text": "x", "modality": "audio"},
        [1, 2],
    ]
    body = "\n".join(json.dumps(x) for x in lines[:3]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[3:])
    (tmp_path / "m.jsonl").write_text(body + "\n{oops\n")
    src = open_source(tmp_path / "m.jsonl", modality="audio")
    assert isinstance(src, ManifestSource)
    items = list(src)
    assert items[0] == SourceEntry(id="media/a.wav", path=str(tmp_path / "media" / "a.wav"), modality="audio")
    assert items[1] == SourceEntry(id="7", text="hello", modality="text", instruction="ignored for text")
    assert items[2].id == "text:2" and items[2].modality == "text"
    assert items[3] == SourceEntry(id="/abs/v.mp4", path="/abs/v.mp4", text="a caption", modality="video",
                                  instruction="Describe.")
    assert items[4].modality == "text" and items[4].path == str(tmp_path / "b.txt")
    assert items[5].problem and "'path' must be a string" in items[5].problem
    assert items[6].problem == "row has neither 'path' nor 'text'"
    assert items[7].problem and "text row cannot have modality 'audio'" in items[7].problem
    assert items[8].id == "row:8" and "not an object" in items[8].problem
    assert items[9].id == "row:9" and "not valid JSON" in items[9].problem
    assert all(i.problem is None for i in items[:5])


def test_archive_sources_csv_tsv_parquet(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,path,text,modality\na,x.wav,,\nb,,some text,\n,y.mp4,cap,av\n")
    items = list(open_source(tmp_path / "m.csv"))
    assert [(i.id, i.modality, i.text) for i in items] == [("a", "auto", None), ("b", "text", "some text"),
                                                           ("y.mp4", "av", "cap")]
    (tmp_path / "m.tsv").write_text("text\tid\nfirst\tq1\nsecond\tq2\n")
    assert [(i.id, i.text) for i in open_source(tmp_path / "m.tsv")] == [("q1", "first"), ("q2", "second")]
    (tmp_path / "bad.csv").write_text("name,caption\nx,y\n")
    with pytest.raises(SourceError, match="'path' or a 'text' column"):
        open_source(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SourceError, match="empty CSV"):
        open_source(tmp_path / "empty.csv")

    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 10_000  # more than one record batch
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(n)], "extra": list(range(n))}), tmp_path / "m.parquet",
                   row_group_size=3000)
    items = list(open_source(tmp_path / "m.parquet"))
    assert len(items) == n and items[-1].id == f"text:{n - 1}" and items[-1].text == f"t{n - 1}"
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(SourceError, match="'path' or a 'text' column"):
        open_source(tmp_path / "nocol.parquet")


def test_archive_sources_demo_resolves_to_the_bundled_manifest() -> None:
    src = open_source("demo")
    items = list(src)
    assert src.kind == "manifest" and len(items) == 16
    assert {i.id for i in items if i.path} == {"audio/tone_a440.wav", "audio/chirp.flac", "audio/rain_noise.ogg",
                                              "audio/beeps.wav", "video/square.webm", "video/ball.mp4",
                                              "video/red_circle_left.mp4", "video/red_circle_right.mp4",
                                              "video/blue_circle_left.mp4", "video/red_bar_left.mp4"}
    assert all(os.path.exists(i.path) for i in items if i.path)


def test_archive_sources_modality_resolution() -> None:
    def probe(streams: tuple[bool, bool]):  # noqa: ANN202
        return lambda path: streams

    v = SourceEntry(id="v", path="/x/clip.mp4")
    assert resolve_modality(v, probe((True, True))) == "av"
    assert resolve_modality(v, probe((False, True))) == "video"
    assert resolve_modality(v, probe((True, False))) == "audio"
    assert resolve_modality(SourceEntry(id="a", path="/x/a.FLAC"), probe((False, True))) == "audio"  # no probe
    assert resolve_modality(SourceEntry(id="t", text="hi"), probe((True, True))) == "text"
    assert resolve_modality(SourceEntry(id="f", path="/x/clip.mp4", modality="video"), probe((True, True))) == "video"
    from wave_rt.errors import MediaError

    with pytest.raises(MediaError, match="neither"):
        resolve_modality(v, probe((False, False)))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_archive_sources_byte_order_mark_and_bytes_that_are_not_utf8(tmp_path: Path, fmt: str) -> None:
    # Excel's "CSV UTF-8" starts with a byte-order mark; a manifest saved as Latin-1 has bytes that are not
    # UTF-8. The mark is dropped (the first column keeps its name); a row with bad bytes is reported alone.
    sep = "\t" if fmt == "tsv" else ","
    rows = ["caf\u00e9 au lait", "caf\u00e9 cr\u00e8me", "plain tea"]
    if fmt == "jsonl":
        lines = [json.dumps({"text": r}, ensure_ascii=False).encode() for r in rows]
    else:
        lines = [f"text{sep}id".encode()] + [f"{r}{sep}r{i}".encode() for i, r in enumerate(rows)]
    lines[-2] = lines[-2].decode().encode("latin-1")  # the middle caption, as a Latin-1 editor saves it
    path = tmp_path / f"m.{fmt}"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    items = list(open_source(str(path)))
    assert [it.text for it in items if it.problem is None] == [rows[0], rows[2]]
    (bad,) = [it for it in items if it.problem is not None]
    assert "not valid UTF-8" in bad.problem and "0xe9" in bad.problem
