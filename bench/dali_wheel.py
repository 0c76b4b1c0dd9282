"""Carry DALI's 199 MB wheel (nvidia-dali-cuda130) to the GPU machine in parts: the device tool carries at most
64 MiB per call (working tree included), and the GPU image has no network.

    # here (once): the wheel split into parts of at most 56 MiB in .dali-parts (git ignores it, so a part
    # travels only in the call whose `carry` names it); DALI's small pure dependencies go to .whl
    pip download --no-deps --python-version 3.12 --only-binary=:all: nvidia-dali-cuda130 -d /tmp/dali
    python bench/dali_wheel.py split /tmp/dali/nvidia_dali_cuda130-*.whl --out .dali-parts   # 4 parts
    pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl astunparse gast dm-tree nvtx six

    # device calls, back to back (a machine stays warm 30 s after a call; /tmp survives between calls):
    #  calls 1-4, one per part, each carrying [".dali-parts/<wheel>.partNN", ".dali-parts/<wheel>.json"]:
    #     python3 bench/dali_wheel.py stash .dali-parts --into /tmp/dali-parts
    #  call 5, carrying [".whl"] (PyAV, soundfile, cffi, pycparser + the DALI dependencies above):
    #     python3 bench/dali_wheel.py stash .dali-parts --into /tmp/dali-parts; \
    #     CALL_S=540 WAVE_RT_COMMIT=<commit> bash bench/gpu_session.sh dali
    #  (the smallest part may ride along with .whl in call 5 when `du -cb` of both stays under 62 MiB)
    # The stage's first step, `dali_wheel.py install --parts /tmp/dali-parts --target /tmp/site`, joins the
    # parts, checks every sha256 and pip-installs DALI where gpu_session.sh puts its PYTHONPATH.

`split` writes <wheel>.partNN files and <wheel>.json (size + sha256 of the whole wheel and of each part);
`stash` copies whatever parts a call carried into a folder outside the tree; `install` joins them, checks the
sha256 and pip-installs the wheel with --no-deps into --target (what gpu_session.sh puts on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

PART_MIB = 56  # leaves 8 MiB of the 64 MiB carry limit for the working tree


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split(wheel: Path, out: Path, part_mib: int = PART_MIB) -> list[Path]:
    if not wheel.name.endswith(".whl"):
        raise ValueError(f"{wheel} is not a wheel")
    out.mkdir(parents=True, exist_ok=True)
    size = wheel.stat().st_size
    step = part_mib << 20
    parts = []
    with open(wheel, "rb") as f:
        for i in range((size + step - 1) // step):
            p = out / f"{wheel.name}.part{i:02d}"
            p.write_bytes(f.read(step))
            parts.append(p)
    meta = {"wheel": wheel.name, "size": size, "sha256": _sha256(wheel),
            "parts": [{"name": p.name, "size": p.stat().st_size, "sha256": _sha256(p)} for p in parts]}
    (out / f"{wheel.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return parts


def stash(src: Path, into: Path) -> list[str]:
    into.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.glob("*.whl.part*")) + sorted(src.glob("*.whl.json")):
        shutil.copyfile(p, into / p.name)
        copied.append(p.name)
    return copied


def join(parts_dir: Path, out_dir: Path) -> Path:
    """Reassemble the wheel described by the one <wheel>.json in parts_dir; checks every part and the whole."""
    metas = sorted(parts_dir.glob("*.whl.json"))
    if len(metas) != 1:
        raise FileNotFoundError(f"{parts_dir}: expected one <wheel>.json, found {len(metas)}")
    meta = json.loads(metas[0].read_text())
    missing = [p["name"] for p in meta["parts"] if not (parts_dir / p["name"]).exists()]
    if missing:
        raise FileNotFoundError(f"{parts_dir}: parts not carried over yet: {', '.join(missing)}")
    for p in meta["parts"]:
        got = _sha256(parts_dir / p["name"])
        if got != p["sha256"]:
            raise ValueError(f"{p['name']}: sha256 {got} != {p['sha256']} (a part was cut or mixed up)")
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / meta["wheel"]
    with open(wheel, "wb") as w:
        for p in meta["parts"]:
            with open(parts_dir / p["name"], "rb") as f:
                shutil.copyfileobj(f, w)
    if wheel.stat().st_size != meta["size"] or _sha256(wheel) != meta["sha256"]:
        raise ValueError(f"{wheel}: the joined wheel does not match {metas[0].name}")
    return wheel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("wheel", type=Path)
    s.add_argument("--out", type=Path, default=Path(".dali-parts"))
    s.add_argument("--part-mib", type=int, default=PART_MIB)
    st = sub.add_parser("stash")
    st.add_argument("src", type=Path)
    st.add_argument("--into", type=Path, default=Path("/tmp/dali-parts"))
    i = sub.add_parser("install")
    i.add_argument("--parts", type=Path, default=Path("/tmp/dali-parts"))
    i.add_argument("--target", type=Path, default=Path("/tmp/site"))
    for p in (s, st, i):
        p.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")
    args = ap.parse_args(argv)
    if args.cmd == "split":
        if args.dry_run:
            print(f"dry-run: would split {args.wheel} into {args.part_mib} MiB parts under {args.out}")
            return 0
        for p in split(args.wheel, args.out, args.part_mib):
            print(p, p.stat().st_size)
        return 0
    if args.cmd == "stash":
        if args.dry_run:
            print(f"dry-run: would copy {args.src}/*.whl.part* to {args.into}")
            return 0
        print("stashed:", ", ".join(stash(args.src, args.into)) or "nothing")
        return 0
    try:
        import nvidia.dali  # noqa: F401

        print("nvidia.dali already importable: nothing to install")
        return 0
    except ImportError:
        pass
    if args.dry_run:
        have = sorted(p.name for p in args.parts.glob("*.whl.*")) if args.parts.exists() else []
        print(f"dry-run: would join the parts in {args.parts} ({len(have)} present here) and "
              f"pip install --no-deps --target {args.target}")
        return 0
    wheel = join(args.parts, args.parts / "joined")
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--no-cache-dir", "--upgrade", "--target", str(args.target), str(wheel)])


if __name__ == "__main__":
    raise SystemExit(main())
