"""One JobOptions for the whole job: the CLI, the Python API and both engines read the same settings, and a
bad value is one typed error (JobOptionsError) raised before anything is read or written."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from archive_helpers import FakeEncoder

from wave_rt import cli
from wave_rt.archive import job, pipeline, ray_engine
from wave_rt.archive.errors import JobOptionsError
from wave_rt.archive.options import JobOptions
from wave_rt.archive.pipeline import PipelineStats

# Every field away from its default (local engine), spelled as the CLI and as the API spell it.
CLI_LOCAL = ["--instruction", "Describe it.", "--modality", "text", "--device", "cpu", "--dtype", "bf16",
             "--max-batch-tokens", "640", "--workers", "3", "--embedding-dtype", "float16", "--shard-rows", "100",
             "--commit-every", "5", "--retry-errors", "--no-progress", "--log-every", "7", "--decode", "threads",
             "--item-timeout", "9"]
API_LOCAL = dict(instruction="Describe it.", modality="text", device="cpu", dtype="bf16", max_batch_tokens=640,
                 workers=3, embedding_dtype="float16", shard_rows=100, commit_seconds=5.0, retry_errors=True,
                 progress=False, log_every=7.0, decode="threads", item_timeout=9.0)


def test_every_field_is_changed_by_the_table_above():
    changed = {f.name for f in dataclasses.fields(JobOptions)
               if getattr(JobOptions(**API_LOCAL), f.name) != f.default}
    assert changed == set(API_LOCAL)
    assert set(API_LOCAL) | {"engine", "replicas", "ray_address", "normalize"} == \
        {f.name for f in dataclasses.fields(JobOptions)}


def _source(tmp_path: Path, n: int = 5) -> Path:
    src = tmp_path / "m.jsonl"
    src.write_text("".join(f'{{"id": "t{i}", "text": "caption number {i}"}}\n' for i in range(n)))
    return src


def _cli_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str]) -> JobOptions:
    seen: dict[str, Any] = {}

    def capture(source: Any, out: Any, model: Any = None, options: JobOptions | None = None, **kw: Any) -> Any:
        seen["options"], seen["kw"] = options, kw
        raise KeyboardInterrupt  # stop here: the CLI's part is done

    monkeypatch.setattr(job, "embed_archive", capture)
    code = cli.run(["embed", str(_source(tmp_path)), "--out", str(tmp_path / "o"), *argv], out=io.StringIO(),
                   err=io.StringIO())
    assert code == cli.EXIT_INTERRUPTED and seen["kw"] == {}
    return seen["options"]


def _api_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **kwargs: Any) -> JobOptions:
    seen: dict[str, JobOptions] = {}

    def capture(src: Any, out_dir: Path, model: Any, opts: JobOptions, stream: Any) -> Any:
        seen["options"] = opts
        return "captured"

    monkeypatch.setattr(job, "_run_job", capture)
    assert job.embed_archive(_source(tmp_path), tmp_path / "api", **kwargs) == "captured"
    return seen["options"]


def test_cli_and_api_build_the_same_options(monkeypatch, tmp_path):
    from_cli = _cli_options(monkeypatch, tmp_path, CLI_LOCAL)
    assert from_cli == JobOptions(**API_LOCAL)
    assert from_cli.dtype == "bfloat16"  # one spelling, whatever the caller wrote
    monkeypatch.undo()
    assert _api_options(monkeypatch, tmp_path, **API_LOCAL) == from_cli
    assert _api_options(monkeypatch, tmp_path, options=JobOptions(**API_LOCAL)) == from_cli
    # keywords override the options object's fields
    assert _api_options(monkeypatch, tmp_path, options=JobOptions(**API_LOCAL), workers=5) == \
        dataclasses.replace(from_cli, workers=5)
    assert _api_options(monkeypatch, tmp_path, dtype=torch.bfloat16, **{k: v for k, v in API_LOCAL.items()
                                                                        if k != "dtype"}) == from_cli


def test_cli_and_api_build_the_same_ray_options(monkeypatch, tmp_path):
    from_cli = _cli_options(monkeypatch, tmp_path, ["--engine", "ray", "--replicas", "2", "--ray-address",
                                                    "ray://head:10001", "--dtype", "fp32"])
    expected = JobOptions(engine="ray", replicas=2, ray_address="ray://head:10001", dtype="float32")
    assert from_cli == expected
    monkeypatch.undo()
    # the API's older spelling of the replica count (workers with engine="ray") is the same job
    old = dict(engine="ray", workers=2, ray_address="ray://head:10001", dtype="fp32")
    assert _api_options(monkeypatch, tmp_path, **old) == expected
    assert _api_options(monkeypatch, tmp_path, engine="ray", replicas=2, ray_address="ray://head:10001",
                        dtype="fp32") == expected


def test_the_local_engine_runs_on_the_jobs_options(monkeypatch, tmp_path):
    opts = JobOptions(**{**API_LOCAL, "device": None, "dtype": None, "modality": "auto"})
    seen: dict[str, Any] = {}

    def run(self: pipeline.LocalPipeline, pending: Any) -> PipelineStats:
        seen["pipe"] = self
        for _ in pending:  # consume the work list as the real engine would
            pass
        return PipelineStats()

    monkeypatch.setattr(pipeline.LocalPipeline, "run", run)
    job.embed_archive(_source(tmp_path), tmp_path / "out", model=FakeEncoder(), options=opts)
    pipe = seen["pipe"]
    assert pipe.options == opts
    assert (pipe.instruction, pipe.budget, pipe.workers, pipe.decode, pipe.item_timeout, pipe.runner.normalize) == \
        (opts.instruction, 640, 3, "threads", 9.0, True)
    # defaults are resolved from the options too
    pipe = pipeline.LocalPipeline(FakeEncoder(), pipe.writer, JobOptions())
    assert (pipe.budget, pipe.workers) == (FakeEncoder.default_max_batch_tokens, JobOptions().decode_workers())
    with pytest.raises(ValueError, match="engine='local'"):
        pipeline.LocalPipeline(FakeEncoder(), pipe.writer, JobOptions(engine="ray"))


def test_the_ray_engine_runs_on_the_jobs_options(monkeypatch, tmp_path):
    """The driver hands run_ray the job's options (dtype read from the model files, the ones the manifest
    records); each actor builds its encoder and runner from them. No Ray cluster is needed for either."""
    seen: dict[str, Any] = {}

    def run_ray(pending: Any, writer: Any, model: Any, options: JobOptions, fingerprint: str | None = None
                ) -> PipelineStats:
        seen["model"], seen["options"], seen["fingerprint"] = model, options, fingerprint
        for _ in pending:
            pass
        return PipelineStats()

    monkeypatch.setattr(ray_engine, "run_ray", run_ray)
    opts = JobOptions(engine="ray", replicas=2, dtype="fp32", instruction="Describe it.", max_batch_tokens=300,
                      normalize=False, progress=False)
    job.embed_archive(_source(tmp_path), tmp_path / "out", options=opts)
    assert seen["model"] is None and seen["options"] == opts
    assert seen["fingerprint"] == job.load_encoder(None, opts).fingerprint  # what every actor's model must match

    shipped = pickle.loads(pickle.dumps(opts))  # what Ray sends each actor
    actor = ray_engine.EmbedActor(None, shipped, decode_threads=1, torch_threads=0)
    assert (actor.instruction, actor.budget, actor.runner.normalize) == ("Describe it.", 300, False)
    assert actor.encoder.dtype == torch.float32 and str(actor.encoder.device) == "cpu"


@pytest.mark.parametrize("field,value", [
    ("engine", "spark"), ("modality", "smell"), ("embedding_dtype", "int8"), ("decode", "fork"),
    ("dtype", "fp8"), ("device", "gpu9"), ("max_batch_tokens", 0), ("max_batch_tokens", 2.5),
    ("workers", -1), ("workers", True), ("shard_rows", 0), ("commit_seconds", -1), ("log_every", float("nan")),
    ("item_timeout", -1.0), ("instruction", 3), ("replicas", 2), ("ray_address", "auto"),
])
def test_bad_values_are_one_typed_error(tmp_path, field, value):
    with pytest.raises(JobOptionsError, match=f"option {field}=") as info:
        JobOptions(**{field: value})
    assert info.value.option == field and isinstance(info.value, ValueError)
    out = tmp_path / "out"
    with pytest.raises(JobOptionsError, match=f"option {field}="):
        job.embed_archive(_source(tmp_path), out, model=FakeEncoder(), **{field: value})
    assert not out.exists()  # refused before anything was written


def test_zero_seconds_mean_every_chance():
    assert (JobOptions(commit_seconds=0).commit_seconds, JobOptions(log_every=0).log_every) == (0, 0)
    with pytest.raises(JobOptionsError, match="item_timeout=0: must be a positive number"):
        JobOptions(item_timeout=0)


def test_unknown_and_conflicting_options(tmp_path):
    with pytest.raises(JobOptionsError, match="option shard_size=.*not a job option"):
        job.embed_archive(_source(tmp_path), tmp_path / "out", shard_size=10)
    with pytest.raises(JobOptionsError, match="must be a JobOptions"):
        job.embed_archive(_source(tmp_path), tmp_path / "out", None, {"workers": 2})
    with pytest.raises(JobOptionsError, match="option workers=.*takes replicas"):
        JobOptions(engine="ray", replicas=2, workers=3)
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_bad_option_value_in_one_line(tmp_path):
    err = io.StringIO()
    code = cli.run(["embed", str(_source(tmp_path)), "--out", str(tmp_path / "o"), "--workers", "0"],
                   out=io.StringIO(), err=err)
    assert code == cli.EXIT_ERROR
    assert err.getvalue().strip() == "wave-rt embed: error: option workers=0: must be a positive whole number"
