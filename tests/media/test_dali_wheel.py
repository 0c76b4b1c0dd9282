"""bench/dali_wheel.py: a wheel split into parts (the device tool carries at most 64 MiB per call) joins back
bit for bit; a missing, cut or swapped part is refused before pip sees it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("dali_wheel", ROOT / "bench" / "dali_wheel.py")
dali_wheel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dali_wheel)


def _wheel(tmp_path: Path, size: int) -> Path:
    p = tmp_path / "nvidia_dali_cuda130-1.0-py3-none-manylinux_2_28_x86_64.whl"
    p.write_bytes(os.urandom(size))
    return p


def test_split_stash_join_roundtrip(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path, (5 << 20) // 2 + 123)  # 2.5 MiB + a tail: three 1 MiB parts, the last one short
    parts = dali_wheel.split(wheel, tmp_path / "parts", part_mib=1)
    assert [p.stat().st_size for p in parts] == [1 << 20, 1 << 20, wheel.stat().st_size - (2 << 20)]
    stash = tmp_path / "stash"
    for p in parts:  # one device call per part: each call carries one part and stashes it
        call = tmp_path / f"call-{p.name}"
        call.mkdir()
        (call / p.name).write_bytes(p.read_bytes())
        (call / f"{wheel.name}.json").write_bytes((tmp_path / "parts" / f"{wheel.name}.json").read_bytes())
        dali_wheel.stash(call, stash)
    joined = dali_wheel.join(stash, tmp_path / "out")
    assert joined.name == wheel.name and joined.read_bytes() == wheel.read_bytes()


def test_join_refuses_missing_or_corrupt_parts(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path, 3 << 20)
    parts = dali_wheel.split(wheel, tmp_path / "parts", part_mib=1)
    parts[1].unlink()
    with pytest.raises(FileNotFoundError, match="part01"):
        dali_wheel.join(tmp_path / "parts", tmp_path / "out")
    parts = dali_wheel.split(wheel, tmp_path / "parts", part_mib=1)
    data = bytearray(parts[2].read_bytes())
    data[7] ^= 1
    parts[2].write_bytes(bytes(data))
    with pytest.raises(ValueError, match="part02"):
        dali_wheel.join(tmp_path / "parts", tmp_path / "out")


def test_install_dry_run(tmp_path: Path, capsys) -> None:
    assert dali_wheel.main(["install", "--parts", str(tmp_path), "--target", str(tmp_path / "site"),
                            "--dry-run"]) == 0
