"""Kill and resume: `wave-rt train` SIGKILLed at a random step, then `--resume`, reproduces the uninterrupted
run's per-step losses and final merged weights (dropout on, so the RNG states must be restored too)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import train_config, write_text_pairs


def _toml(cfg: dict) -> str:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def _cli(config: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "wave_rt.cli", "train", str(config), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))


def test_sigkill_then_resume_matches_uninterrupted(tiny_ckpts, tmp_path):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    manifest = tmp_path / "pairs.jsonl"
    write_text_pairs(manifest, 18)
    runs = {}
    for tag in ("ref", "killed"):
        cfg = train_config(tiny_ckpts["all_layer"], manifest, tmp_path / tag,
                           recipe={"lora_dropout": 0.2}, optim={"max_steps": 12},
                           run={"checkpoint_every": 3})
        runs[tag] = tmp_path / f"{tag}.toml"
        runs[tag].write_text(_toml(cfg))

    ref = _cli(runs["ref"])
    assert ref.wait(timeout=600) == 0, ref.stdout.read()[-3000:]

    # a step after a checkpoint, or in the middle of one; several steps before the end, so that the kill
    # lands before the run finishes however fast the machine is
    kill_at = random.Random(1234).randint(4, 9)
    proc = _cli(runs["killed"])
    deadline = time.monotonic() + 600
    while _steps_logged(tmp_path / "killed") < kill_at and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    from wave_rt.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(tmp_path / "killed")
    assert ckpt is not None and int(ckpt.name.split("-")[1]) >= 3  # resume starts from here, not from scratch

    resumed = _cli(runs["killed"], "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()[-3000:]

    want, got = _losses(tmp_path / "ref"), _losses(tmp_path / "killed")
    assert sorted(got) == sorted(want) == list(range(1, 13))
    # steps after the checkpoint were logged before the kill and again after the resume: the resume
    # dropped the stale lines instead of appending duplicates
    assert _steps_logged(tmp_path / "killed") == 12
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got, want)
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-6 * max(1.0, float(a[name].abs().max())), name
