"""Reading the text manifests users hand us (CSV, TSV, JSONL) the way spreadsheets and editors write them:
the archive job's sources and the training/eval pair manifests share it."""

from __future__ import annotations

import os
from typing import TextIO


def open_text(path: str | os.PathLike[str]) -> TextIO:
    """A text manifest for reading: UTF-8, a leading byte-order mark dropped (Excel's "CSV UTF-8" writes one,
    which would otherwise stick to the first column's name), and bytes that are not UTF-8 kept as surrogates so
    that the row holding them is reported alone (see undecodable) instead of stopping the whole source."""
    return open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")


def undecodable(text: str) -> str | None:
    """Why a row read by open_text is unusable, when it holds bytes that are not UTF-8 (None: it is fine)."""
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            return (f"the row is not valid UTF-8 (byte 0x{ord(ch) - 0xDC00:02x}); save the manifest as UTF-8 "
                    "(e.g. iconv -f latin1 -t utf-8)")
    return None
