"""A fresh run (no --resume) refuses a run folder that already holds a run, naming it and the way out, and
leaves that run untouched; --resume continues it; an empty or missing folder starts a run."""

from __future__ import annotations

import io
import json

import pytest
from train_helpers import train_config, write_text_pairs

HEADS = {"name": "wave", "trainable": "heads", "one_task_per_batch": False}  # no peft needed


def _cfg(ckpts, tmp_path, out, **optim):
    manifest = tmp_path / "pairs.jsonl"
    if not manifest.exists():
        write_text_pairs(manifest, 12)
    cfg = train_config(ckpts["all_layer"], manifest, out, optim={"max_steps": 3, **optim})
    cfg["recipe"] = dict(HEADS)
    return cfg


def _steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fresh_run_into_an_existing_run_is_refused(tiny_ckpts, tmp_path):
    from wave_rt.train import fit
    from wave_rt.train.trainer import RunExistsError

    run = tmp_path / "run"
    fit(_cfg(tiny_ckpts, tmp_path, run))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    final = (run / "final" / "model.safetensors").read_bytes()
    with pytest.raises(RunExistsError) as info:
        fit(_cfg(tiny_ckpts, tmp_path, run, lr=5e-4, max_steps=2))
    message = str(info.value)
    assert str(run) in message and "--resume" in message and "another run.out_dir" in message
    assert "step-00000003" in message
    # run A is as it was
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ckpts
    assert _steps(run) == [1, 2, 3]
    assert (run / "final" / "model.safetensors").read_bytes() == final
    # the way out it names works: --resume continues the run
    result = fit(_cfg(tiny_ckpts, tmp_path, run, max_steps=4), resume=True)
    assert result.steps == 4 and _steps(run) == [1, 2, 3, 4]


def test_cli_refuses_in_one_line(tiny_ckpts, tmp_path):
    from wave_rt.cli import run

    toml = tmp_path / "c.toml"
    toml.write_text(f'[model]\npath = "{tiny_ckpts["all_layer"]}"\n[recipe]\nname = "wave"\ntrainable = "heads"\n'
                    '[data]\ntrain = "pairs.jsonl"\nbatch_size = 6\nchunk_size = 2\n[optim]\nmax_steps = 1\n'
                    '[run]\nout_dir = "run"\ndevice = "cpu"\nprogress = false\n')
    write_text_pairs(tmp_path / "pairs.jsonl", 12)
    assert run(["train", str(toml)], out=io.StringIO(), err=io.StringIO()) == 0
    err = io.StringIO()
    assert run(["train", str(toml)], out=io.StringIO(), err=err) == 1
    line = err.getvalue()
    assert line.startswith(f"wave-rt train: error: {tmp_path / 'run'}: already holds a training run")
    assert "--resume" in line and line.count("\n") == 1


def test_metrics_without_a_checkpoint_count_as_a_run_and_resume_redoes_them(tiny_ckpts, tmp_path):
    """A run killed before its first checkpoint left metric lines only: a fresh run would append to them;
    --resume starts from step 0 and drops them."""
    from wave_rt.train import fit
    from wave_rt.train.trainer import RunExistsError

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    with pytest.raises(RunExistsError, match="metrics.jsonl"):
        fit(_cfg(tiny_ckpts, tmp_path, run, max_steps=1))
    fit(_cfg(tiny_ckpts, tmp_path, run, max_steps=1), resume=True)
    assert _steps(run) == [1] and json.loads((run / "metrics.jsonl").read_text())["loss"] != 9.0


@pytest.mark.parametrize("existing", [False, True])
def test_empty_or_missing_out_dir_starts_a_run(tiny_ckpts, tmp_path, existing):
    from wave_rt.train import fit

    run = tmp_path / "run"
    if existing:
        run.mkdir()
    assert fit(_cfg(tiny_ckpts, tmp_path, run, max_steps=1)).steps == 1
