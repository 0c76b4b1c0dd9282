"""The command line: help everywhere, global options anywhere, --version, and one-line errors with exit 1."""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import pytest

import wave_rt
from wave_rt import cli
from wave_rt.cli import build_parser, run


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(argv, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _assert_one_line_error(code: int, err: str, command: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wave-rt {command}: error: "), err
    assert "Traceback" not in err


def _commands() -> list[tuple[list[str], argparse.ArgumentParser]]:
    """Every (nested) subcommand that runs something: ["embed"], ..., ["export", "bundle"], ..."""
    found = []

    def walk(path: list[str], parser: argparse.ArgumentParser) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if path and not subs:
            found.append((path, parser))
        for action in subs:
            for name, child in action.choices.items():
                walk([*path, name], child)

    walk([], build_parser())
    return found


def _minimal_args(parser: argparse.ArgumentParser) -> list[str]:
    """Positionals and required options filled with placeholders: enough for parse_args."""
    argv: list[str] = []
    grouped = {id(a) for g in parser._mutually_exclusive_groups for a in g._group_actions}
    for action in parser._actions:
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            argv.append("X")
        elif action.required and id(action) not in grouped:
            argv += [action.option_strings[0], "X"]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            argv += [group._group_actions[0].option_strings[0], "X"]
    return argv


COMMAND_PATHS = [" ".join(path) for path, _ in _commands()]


def test_the_walk_finds_nested_subcommands():
    assert {"embed", "index", "search", "export bundle", "export tensorrt", "export triton-repo"} <= set(COMMAND_PATHS)


@pytest.mark.parametrize("command", COMMAND_PATHS + ["export"])
def test_every_subcommand_has_help(capsys, command):
    assert run([*command.split(), "--help"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: wave-rt {command}"), printed


def test_every_option_has_help():
    missing = []
    for parser in cli.subcommand_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_shared_options_have_one_spelling():
    """An option that several subcommands take is spelled, typed and explained the same way in each."""
    seen: dict[str, tuple] = {}
    clashes = []
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            for opt in action.option_strings:
                key = (action.dest, action.choices and tuple(action.choices), action.type)
                if opt in seen and seen[opt][0] != key:
                    clashes.append(f"{opt}: {seen[opt][1]} vs {name}")
                seen.setdefault(opt, (key, name))
    assert clashes == []
    for name in ("embed", "search"):
        opts = {o for a in _subparsers(build_parser())[name]._actions for o in a.option_strings}
        assert {"--model", "--device", "--dtype", "--instruction"} <= opts, name


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"wave-rt {wave_rt.__version__}"


@pytest.mark.parametrize("argv", [["-v", "index", "X"], ["index", "X", "-v"], ["index", "-v", "X"],
                                  ["index", "X", "--verbose"]])
def test_verbose_anywhere(argv):
    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(["index", "X"]).verbose is False


@pytest.mark.parametrize("command", COMMAND_PATHS)
def test_verbose_at_every_place_of_every_subcommand(command):
    path = command.split()
    parser = dict((" ".join(p), sub) for p, sub in _commands())[command]
    args = _minimal_args(parser)
    assert build_parser().parse_args([*path, *args]).verbose is False
    for argv in ([*path, *args, "-v"], ["-v", *path, *args], [*path, "-v", *args], [*path, *args, "--verbose"]):
        assert build_parser().parse_args(argv).verbose is True, argv
    if len(path) > 1:  # between the command and its subcommand: `wave-rt export -v bundle ...`
        assert build_parser().parse_args([path[0], "-v", *path[1:], *args]).verbose is True


def test_verbose_after_the_subcommand_logs_and_shows_tracebacks(tmp_path, monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # let run() install its stderr handler
    code, _, err = _run(["index", str(tmp_path / "nope"), "-v"])
    assert code == 1
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("wave-rt index: error: ")


@pytest.mark.parametrize("argv,command", [
    (["embed", "demo"], "embed"),  # --out missing
    (["embed", "demo", "--out", "o", "--dtype", "fp8"], "embed"),
    (["embed", "demo", "--out", "o", "--modality", "smell"], "embed"),
    (["embed", "demo", "--out", "o", "--max-batch-tokens", "many"], "embed"),
    (["embed", "demo", "--out", "o", "--no-such-option"], "--no-such-option"),
    (["search", "DIR"], "search"),  # no query
    (["frobnicate"], ""),
    ([], ""),
])
def test_bad_options_are_one_line_errors(argv, command):
    code, out, err = _run(argv)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wave-rt") and ": error: " in lines[0], err
    assert command in lines[0]


def test_option_combinations_that_make_no_sense(tmp_path):
    out = str(tmp_path / "o")
    _assert_one_line_error(*_run(["embed", "demo", "--out", out, "--engine", "ray", "--workers", "2"])[::2], "embed")
    _assert_one_line_error(*_run(["embed", "demo", "--out", out, "--replicas", "2"])[::2], "embed")
    _assert_one_line_error(*_run(["embed", "demo", "--out", out, "--device", "gpu9"])[::2], "embed")
    _assert_one_line_error(*_run(["search", str(tmp_path), "--text", "x", "-k", "0"])[::2], "search")
    assert not (tmp_path / "o").exists()


def test_missing_source_and_archive(tmp_path):
    code, _, err = _run(["embed", str(tmp_path / "no_such_dir"), "--out", str(tmp_path / "o"), "--no-progress"])
    _assert_one_line_error(code, err, "embed")
    assert "no_such_dir" in err
    code, _, err = _run(["search", str(tmp_path / "no_archive"), "--text", "x"])
    _assert_one_line_error(code, err, "search")
    code, _, err = _run(["index", str(tmp_path)])
    _assert_one_line_error(code, err, "index")


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for out in (blocker, blocker / "sub"):
        code, _, err = _run(["embed", "demo", "--out", str(out), "--no-progress"])
        _assert_one_line_error(code, err, "embed")
        assert str(blocker) in err


def test_bad_model_directory(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    code, _, err = _run(["embed", "demo", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "model"),
                         "--no-progress"])
    _assert_one_line_error(code, err, "embed")
    assert "model" in err


@pytest.mark.parametrize("exc", [PermissionError(13, "Permission denied", "/archive/part-00000.parquet"),
                                 RuntimeError("CUDA error: device-side assert\ntriggered"),
                                 OSError(28, "No space left on device")])
def test_os_and_runtime_errors_are_one_line(monkeypatch, tmp_path, exc):
    import wave_rt.archive.job as job

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(job, "embed_archive", fail)
    code, _, err = _run(["embed", "demo", "--out", str(tmp_path / "o")])
    _assert_one_line_error(code, err, "embed")
    if isinstance(exc, PermissionError):
        assert "Permission denied" in err and "/archive/part-00000.parquet" in err


def test_interrupt_exit_code(monkeypatch, tmp_path):
    import wave_rt.archive.job as job

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "embed_archive", interrupted)
    code, _, err = _run(["embed", "demo", "--out", str(tmp_path / "o")])
    assert code == cli.EXIT_INTERRUPTED and "resume" in err


def test_console_script_is_declared():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'wave-rt = "wave_rt.cli:main"' in text


@pytest.mark.parametrize("device", ["cuda:99", "tpu0"])
def test_a_device_this_machine_lacks_is_one_line_for_every_command(tmp_path, device):
    # cuda:99 exists on no machine (a GPU box has fewer cards); on a CPU-only torch torch itself raises an
    # AssertionError deep inside the first layer built on the device, which used to reach the user raw.
    (tmp_path / "pairs.jsonl").write_text('{"query_text": "a", "target_text": "b"}\n')
    (tmp_path / "train.toml").write_text(f'[model]\npath = "demo"\n[data]\ntrain = "{tmp_path / "pairs.jsonl"}"\n'
                                         f'[run]\nout_dir = "{tmp_path / "run"}"\ndevice = "{device}"\n')
    for argv in (["train", str(tmp_path / "train.toml")],["eval", str(tmp_path / "pairs.jsonl"), "--device", device],
                 ["bench-latency", "demo", "--device", device],
                 ["export", "bundle", "demo", "--out", str(tmp_path / "b"), "--device", device],
                 ["embed", "demo", "--out", str(tmp_path / "o"), "--device", device, "--no-progress"]):
        code, out, err = _run(argv)
        _assert_one_line_error(code, err, argv[0])
        assert f"device '{device}'" in err or f"device='{device}'" in err, err
    assert not (tmp_path / "b").exists() and not (tmp_path / "o").exists() and not (tmp_path / "run").exists()


def test_resolve_device_is_typed(monkeypatch):
    import torch

    from wave_rt.dtypes import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(wave_rt.DeviceError, match="cuda:99"):
        wave_rt.WaveEncoder.from_pretrained(None, device="cuda:99")
    with pytest.raises(wave_rt.DeviceError, match="'gpu9'"):
        resolve_device("gpu9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(wave_rt.DeviceError, match="cpu"):
        resolve_device("cuda")
    assert resolve_device(None) == torch.device("cpu")
