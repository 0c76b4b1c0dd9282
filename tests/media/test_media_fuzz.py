"""Mutated WAV/FLAC/OGG/MP3/MP4/WebM files through load_audio/load_video/load_av: each ends in a result or a
typed MediaError (tests/media/media_fuzz.py holds the corpus; bench/bench_media.py --fuzz runs 10,000)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import media_fuzz  # noqa: E402

from wave_rt.media import CorruptMediaError, DecodeTimeoutError, MediaLimits, load_av, load_video  # noqa: E402

# Issue 16's repro: a valid 2 s H.264 + AAC MP4 with 7 bits flipped that kept load_video seeking back over the
# same frames for ~90 s of CPU until the global max_frames_decoded=200000 stopped it (then the frame budget, in
# 0.2 s; now the first seek that lands back makes it decode front to back, as ffmpeg and decord read it).
REPRO = Path(__file__).resolve().parent / "data" / "slow-decode-7bitflips.mp4"


@pytest.fixture(scope="module")
def seeds() -> dict[str, bytes]:
    return media_fuzz.seed_media()


def test_seed_media_decode(seeds):
    # The mutations must start from files the loaders accept, or the fuzzing only exercises the header checks.
    for fmt, data in seeds.items():
        for name in media_fuzz.loaders_for(fmt):
            media_fuzz.LOADERS[name](data)


@pytest.mark.timeout(600)
def test_mutated_media_end_in_a_result_or_a_media_error(seeds):
    report = media_fuzz.FuzzReport()
    for case in media_fuzz.cases(300, seed=0, seeds=seeds):
        media_fuzz.run_case(case, report)
    assert report.findings == []
    assert report.runs == 300 // 6 * (1 + 3 + 1 + 1 + 3 + 1)
    # Both outcomes occur: the mutations neither all break the files nor all leave them intact.
    assert report.results > 0 and sum(report.media_errors.values()) > 0


def test_a_stream_that_seeks_back_is_decoded_once_front_to_back(seeds, monkeypatch):
    # Its seeks land back over frames already decoded: the first frame after the seek tells, and the clip is
    # decoded in one forward pass (what ffmpeg and decord do with it: 20 frames), not seek after seek.
    from wave_rt.media.backends import cpu

    passes: list[bool] = []
    real = cpu._decode_frames

    def counted(*a, seek, **kw):  # noqa: ANN002, ANN003, ANN202
        passes.append(seek)
        return real(*a, seek=seek, **kw)

    monkeypatch.setattr(cpu, "_decode_frames", counted)
    data = REPRO.read_bytes()
    clip = load_video(data, backend="cpu", limits=MediaLimits(max_frames_decoded=10**9))
    assert passes == [True, False]
    assert clip.frames.shape[0] == 4 and clip.duration == 2.0
    # its audio track has flipped bits mid-file: damaged, not cut off (the bytes go on past the failure)
    with pytest.raises(CorruptMediaError, match="decoding audio fails at byte .* damaged"):
        load_av(data, backend="cpu")


def test_decode_work_is_bounded_by_what_the_stream_declares(monkeypatch):
    # The frame budget (from the stream's declared duration x frame rate, or its packet count) stops a decoder
    # that yields more frames than the stream declares, far below the global max_frames_decoded cap.
    from wave_rt.media.backends import cpu

    monkeypatch.setattr(cpu.VideoIndex, "frame_budget", lambda self: 5)
    with pytest.raises(CorruptMediaError, match="what the stream declares"):
        load_video(REPRO.read_bytes(), backend="cpu", limits=MediaLimits(max_frames_decoded=10**9))


def test_wall_clock_budget_per_decode(seeds):
    # A budget already spent when decoding starts: the first check between frames ends it, typed.
    with pytest.raises(DecodeTimeoutError, match="max_decode_seconds"):
        load_video(seeds["mp4"], backend="cpu", limits=MediaLimits(max_decode_seconds=1e-9))
    with pytest.raises(DecodeTimeoutError, match="max_decode_seconds"):
        load_av(seeds["webm"], backend="cpu", limits=MediaLimits(max_decode_seconds=1e-9))


def test_decode_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_decode_seconds"):
        MediaLimits(max_decode_seconds=0)
