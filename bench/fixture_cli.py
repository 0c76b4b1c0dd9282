"""The command line both golden-fixture scripts share: an output folder (created, checked writable), a seed, and
`--dry-run`, which checks only those."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def parse_fixture_args(doc: str, argv: list[str] | None) -> tuple[argparse.Namespace, Path]:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="check arguments and the output folder, compute nothing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out):  # writable?
        pass
    return args, out
