"""Videos as real archives hold them: MPEG transport and program streams (whose seeks are approximate), an MP4
cut by stream copy (an edit list with pre-roll frames), a single group of pictures in a transport stream, a
display-matrix rotation (phone clips), a frame shape the video processor refuses. The reference is a plain
front-to-back decode of every frame (no seek), and for rotation the geometry of a marked corner, checked
against ffmpeg's auto-rotation (ffmpeg CLI, decord) when the test was written."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from media_factory import pattern_frames, write_video

from wave_rt.media import UnsupportedFrameShapeError, load_av, load_video, sample_frame_ids
from wave_rt.media.backends import cpu as cpu_backend
from wave_rt.media.limits import DEFAULT_LIMITS
from wave_rt.media.source import as_source


def decoded_in_order(path: Path) -> tuple[list[int], list[np.ndarray]]:
    """(pts, rgb) of every frame the decoder shows, front to back, without seeking."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        pairs = sorted(((f.pts, f.to_ndarray(format="rgb24")) for f in c.decode(s)), key=lambda p: p[0])
    return [p for p, _ in pairs], [f for _, f in pairs]


def packet_pts(path: Path) -> tuple[list[int], float]:
    """Every packet's pts, sorted (the frames decord's index and ours address), and the average frame rate."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        pts = sorted(int(p.pts) for p in c.demux(s) if p.size)
        return pts, float(s.average_rate)


def expected_frames(path: Path) -> np.ndarray:
    """WAVE's sample of the clip, from the front-to-back decode: for each sampled packet the frame shown at its
    time (the next shown one where that packet is never shown, e.g. a pre-roll frame an edit list drops)."""
    pts, fps = packet_pts(path)
    shown_pts, shown = decoded_in_order(path)
    out = []
    for i in sample_frame_ids(len(pts), fps):
        j = next(j for j, p in enumerate(shown_pts) if p >= pts[i])
        out.append(shown[j])
    return np.stack(out)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("containers")
    frames = pattern_frames(200, 96, 128, seed=3)  # 8 s at 25 fps, every frame different
    write_video(d / "gop25.ts", frames, 25, gop=25, bframes=2)
    write_video(d / "gop12.mpg", frames, 25, codec="mpeg2video", gop=12)
    write_video(d / "one_gop.ts", frames[:100], 25, gop=1000)
    write_video(d / "gop25.mp4", frames, 25, gop=25, bframes=2)
    write_video(d / "gop25_av.ts", frames[:100], 25, gop=25, audio=0.1 * np.ones(4 * 44100, np.float32))
    _cut_by_stream_copy(d / "gop25.mp4", d / "cut.mp4", seconds=1.3)
    return d


def _cut_by_stream_copy(src: Path, dst: Path, seconds: float) -> None:
    """What `ffmpeg -ss 1.3 -i src -c copy dst` does: packets from the keyframe before the cut, shifted so that
    the cut is time 0; the frames before it get negative times and the MP4 muxer writes an edit list that
    hides them (pre-roll), which is what makes seeks in such files restart at the first frame."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        s = inp.streams.video[0]
        o = out.add_stream_from_template(s)
        cut = int(seconds / s.time_base)
        packets = [p for p in inp.demux(s) if p.size]
        start = max(p.pts for p in packets if p.is_keyframe and p.pts <= cut)
        for p in packets:
            if p.dts is not None and p.dts >= start - 2 * 512 and p.pts >= start:
                p.pts -= cut
                p.dts -= cut
                p.stream = o
                out.mux(p)


@pytest.mark.parametrize("name", ["gop25.ts", "gop12.mpg", "one_gop.ts", "gop25.mp4", "cut.mp4"])
def test_sampled_frames_are_the_frames_shown_at_their_times(clips, name):
    clip = load_video(str(clips / name))
    np.testing.assert_array_equal(clip.frames.numpy(), expected_frames(clips / name))


def test_the_cut_clip_really_has_pre_roll_and_a_seek_that_misses(clips):
    # The fixture must be the hard case: packets before time 0, and a seek to a later keyframe that lands back
    # at the first frame; otherwise the test above would pass without the fallback it is there to check.
    pts, _ = packet_pts(clips / "cut.mp4")
    assert pts[0] < 0
    index = cpu_backend.video_index(as_source(str(clips / "cut.mp4"), DEFAULT_LIMITS), DEFAULT_LIMITS)
    late_key = index.keyframe_pts[-1]
    with av.open(str(clips / "cut.mp4")) as c:
        s = c.streams.video[0]
        c.seek(late_key, stream=s, backward=True, any_frame=False)
        first = next(iter(c.decode(s))).pts
    assert first < late_key - 10 * 512  # the seek went back to the start


def test_transport_stream_with_audio_loads_both_tracks(clips):
    av_clip = load_av(str(clips / "gop25_av.ts"))
    np.testing.assert_array_equal(av_clip.video.frames.numpy(), expected_frames(clips / "gop25_av.ts"))
    assert av_clip.audio is not None and av_clip.audio.shape[-1] >= 16000


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_display_rotation_turns_the_frames_upright(tmp_path, degrees):
    # A white block in the stored frame's top-left corner, 64 wide x 32 tall, on a 160x96 black frame. Turned
    # counter-clockwise by `degrees` (the display matrix's convention, which ffmpeg's auto-rotation and decord
    # apply; checked against both on ffmpeg-written files when this was written) the block moves to:
    stored = np.zeros((10, 96, 160, 3), np.uint8)
    stored[:, :32, :64] = 255
    path = tmp_path / f"rot{degrees}.mp4"
    write_video(path, stored, 10, options={"crf": "10"}, rotation=degrees)
    frame = load_video(str(path)).frames[0].numpy().astype(int)
    h, w = (160, 96) if degrees in (90, 270) else (96, 160)
    assert frame.shape == (h, w, 3)
    block = frame.mean(axis=2) > 128
    rows, cols = np.nonzero(block)
    corner = {0: ("top", "left"), 90: ("bottom", "left"), 180: ("bottom", "right"), 270: ("top", "right")}[degrees]
    assert (rows.min() == 0) == (corner[0] == "top") and (rows.max() == h - 1) == (corner[0] == "bottom")
    assert (cols.min() == 0) == (corner[1] == "left") and (cols.max() == w - 1) == (corner[1] == "right")
    size = (64, 32) if degrees in (90, 270) else (32, 64)  # (rows, cols) of the block once turned
    assert abs(int(block.sum()) - size[0] * size[1]) < 0.05 * size[0] * size[1]
    index = cpu_backend.video_index(as_source(str(path), DEFAULT_LIMITS), DEFAULT_LIMITS)
    assert index.rotation == degrees and (index.width, index.height) == (160, 96)  # the stored size


def test_a_frame_shape_the_processor_refuses_is_a_typed_media_error(tmp_path):
    path = tmp_path / "sliver.mp4"
    write_video(path, np.full((4, 16, 4000, 3), 90, np.uint8), 4)
    with pytest.raises(UnsupportedFrameShapeError, match=r"sliver\.mp4.*4000x16.*200:1"):
        load_video(str(path))


def test_time_base_of_the_cut_clip_is_what_the_fixture_assumes(clips):
    # _cut_by_stream_copy keeps two frame durations of decode-order slack in the MP4's 1/12800 time base
    with av.open(str(clips / "gop25.mp4")) as c:
        assert c.streams.video[0].time_base == Fraction(1, 12800)
