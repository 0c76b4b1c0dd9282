"""One media input (a path or encoded bytes) with the checks every backend does before decoding:
existence, size limits, and cheap structural checks that tell a truncated file from a corrupt one."""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Union

from wave_rt.media.errors import (
    CorruptMediaError,
    EmptyMediaError,
    MediaError,
    MediaTooLargeError,
    TruncatedMediaError,
)
from wave_rt.media.limits import MediaLimits

MediaSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


class MediaNotFoundError(MediaError, FileNotFoundError):
    """The path does not exist or is not a regular file."""


@dataclass(frozen=True)
class Source:
    """A validated input: exactly one of `path` / `data` is set; `label` is what errors name."""

    path: str | None
    data: bytes | None
    size: int

    @property
    def label(self) -> object:
        return self.path if self.path is not None else self.data

    def open(self) -> BinaryIO | str:
        """What PyAV's av.open accepts: the path itself (lets FFmpeg read and seek natively) or a BytesIO."""
        return self.path if self.path is not None else io.BytesIO(self.data)  # type: ignore[arg-type]

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:  # type: ignore[arg-type]
            return f.read()

    def head(self, n: int) -> bytes:
        if self.data is not None:
            return self.data[:n]
        with open(self.path, "rb") as f:  # type: ignore[arg-type]
            return f.read(n)

    def read_at(self, offset: int, n: int) -> bytes:
        if self.data is not None:
            return self.data[offset: offset + n]
        with open(self.path, "rb") as f:  # type: ignore[arg-type]
            f.seek(offset)
            return f.read(n)


def as_source(src: object, limits: MediaLimits) -> Source:
    """Validate `src` (path or bytes) against the limits; raise the MediaError subclass that names the cause."""
    if isinstance(src, Source):
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        source = Source(None, data, len(data))
    elif isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not isinstance(path, str):
            raise TypeError(f"media paths must be str, got {type(path).__name__}")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise MediaNotFoundError(path, "no such file") from None
        except OSError as exc:
            raise MediaNotFoundError(path, f"cannot stat: {exc.strerror or exc}") from None
        if not os.path.isfile(path):
            raise MediaNotFoundError(path, "not a regular file")
        source = Source(path, None, st.st_size)
    else:
        raise TypeError(f"a media source is a path or bytes, got {type(src).__name__}")
    if source.size == 0:
        raise EmptyMediaError(source.label, "the file is empty (0 bytes)")
    if limits.max_bytes is not None and source.size > limits.max_bytes:
        raise MediaTooLargeError(source.label, f"{source.size} bytes exceeds MediaLimits.max_bytes={limits.max_bytes}")
    check_structure(source)
    return source


# ---------------------------------------------------------------------------------------------- structure
# Demuxers report a cut-off file as generic "invalid data"; the container's own size fields say whether the
# file ends early. These walks read a few header bytes only.

def check_structure(source: Source) -> None:
    head = source.head(16)
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"AVI "):
        _check_riff(source)
    elif len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        _check_bmff(source)
    elif head[:4] == b"\x1a\x45\xdf\xa3":
        _check_ebml(source)


def _truncated(source: Source, what: str, end: int) -> TruncatedMediaError:
    return TruncatedMediaError(
        source.label, f"{what} declares data up to byte {end} but the file has only {source.size} bytes")


def _check_bmff(source: Source) -> None:
    """ISO base media (MP4/MOV/M4A): the top-level boxes must fit in the file. Junk after a complete movie
    (some writers append it) is left to FFmpeg; a cut inside the movie or media data is a truncation."""
    offset, boxes, seen_moov = 0, 0, False
    while offset + 8 <= source.size and boxes < 10_000:
        hdr = source.read_at(offset, 16)
        size, kind = struct.unpack(">I4s", hdr[:8])
        name = kind.decode("latin-1")
        if size == 1:
            if len(hdr) < 16:
                raise _truncated(source, f"MP4 box '{name}'", offset + 16)
            size = struct.unpack(">Q", hdr[8:16])[0]
        elif size == 0:  # box extends to the end of the file
            return
        if size < 8:
            if seen_moov:
                return
            raise CorruptMediaError(source.label, f"MP4 box '{name}' at byte {offset} has size {size}")
        if offset + size > source.size:
            if seen_moov and kind not in (b"mdat", b"moof", b"moov"):
                return
            raise _truncated(source, f"MP4 box '{name}'", offset + size)
        seen_moov = seen_moov or kind == b"moov"
        offset += size
        boxes += 1


def _read_vint(buf: bytes, pos: int) -> tuple[int, int, bool]:
    """EBML variable-length integer at buf[pos]: (value, length, all-ones i.e. 'unknown size')."""
    first = buf[pos]
    length = 1
    mask = 0x80
    while length <= 8 and not first & mask:
        mask >>= 1
        length += 1
    if length > 8 or pos + length > len(buf):
        raise ValueError("bad vint")
    value = first & (mask - 1)
    for b in buf[pos + 1: pos + length]:
        value = (value << 8) | b
    return value, length, value == (1 << (7 * length)) - 1


def _check_ebml(source: Source) -> None:
    """Matroska/WebM: the EBML header and the Segment element must fit in the file (unless size is unknown)."""
    buf = source.head(4096)
    try:
        pos = 4
        size, n, _ = _read_vint(buf, pos)
        pos += n + size  # skip the EBML header element
        if pos + 4 > len(buf):
            raise _truncated(source, "Matroska EBML header", pos + 4)
        if buf[pos: pos + 4] != b"\x18\x53\x80\x67":
            return
        size, n, unknown = _read_vint(buf, pos + 4)
    except (ValueError, IndexError):
        raise CorruptMediaError(source.label, "malformed Matroska/WebM header") from None
    end = pos + 4 + n + size
    if not unknown and end > source.size:
        raise _truncated(source, "Matroska Segment", end)


def _check_riff(source: Source) -> None:
    """WAV/AVI: the 'data' (or 'movi') chunk must fit. Size 0 or 0xFFFFFFFF means 'unknown' (streamed files)."""
    offset, chunks = 12, 0
    while offset + 8 <= source.size and chunks < 1000:
        kind, size = struct.unpack("<4sI", source.read_at(offset, 8))
        if kind in (b"data", b"LIST") or size in (0, 0xFFFFFFFF):
            if size not in (0, 0xFFFFFFFF) and offset + 8 + size > source.size:
                raise _truncated(source, f"RIFF chunk '{kind.decode('latin-1')}'", offset + 8 + size)
            if kind == b"data" or size in (0, 0xFFFFFFFF):
                return
        offset += 8 + size + (size & 1)
        chunks += 1
