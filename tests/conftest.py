"""Shared pytest setup: GPU tests are marked `gpu` and skipped on machines without CUDA."""

from __future__ import annotations

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)



# Checks that exist only where an optional reference installs (neither can be a test dependency): they are not
# collected rather than skipped, and the run's summary names each one, so a missing check is never silent.
def _optional_checks() -> list[tuple[str, bool, str]]:
    import importlib.util

    from wave_rt.train.demo_corpus import espeak_available

    return [
        ("torchaudio (no build for the CPU torch we pin)", importlib.util.find_spec("torchaudio") is not None,
         "tests/media/test_media_audio_features.py::test_beats_fbank_matches_torchaudio "
         "(kaldi-native-fbank and committed torchaudio golden outputs always run)"),
        ("espeak-ng (apt-get install espeak-ng)", espeak_available(),
         "tests/train/test_demo_model.py::test_spoken_words_are_in_the_heldout_corpus"),
    ]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    missing = [(name, test) for name, present, test in _optional_checks() if not present]
    if missing:
        terminalreporter.section("checks not collected on this machine")
        for name, test in missing:
            terminalreporter.write_line(f"{name}: {test}")
