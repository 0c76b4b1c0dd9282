"""Bad inputs give the MediaError subclass that names the cause, with the file in the message, and never an
allocation sized by a header."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

import wave_rt
from wave_rt.media import (
    CorruptMediaError,
    EmptyMediaError,
    MediaError,
    MediaLimits,
    MediaNotFoundError,
    MediaTooLargeError,
    MediaTooLongError,
    MissingStreamError,
    TruncatedMediaError,
    UnsupportedCodecError,
    UnsupportedFrameShapeError,
    load_audio,
    load_av,
    load_video,
    probe,
)


def test_error_hierarchy():
    for cls in (CorruptMediaError, EmptyMediaError, TruncatedMediaError, UnsupportedCodecError, MissingStreamError,
                MediaTooLongError, MediaTooLargeError, MediaNotFoundError, UnsupportedFrameShapeError):
        assert issubclass(cls, wave_rt.MediaError) and issubclass(cls, wave_rt.WaveRTError)


@pytest.mark.parametrize("loader", [load_video, load_av, probe])
def test_truncated_mp4(media, loader):
    path = str(media / "truncated.mp4")
    with pytest.raises(TruncatedMediaError, match="truncated.mp4") as info:
        loader(path)
    assert "declares data up to byte" in str(info.value)


def test_truncated_mp4_bytes(media):
    with pytest.raises(TruncatedMediaError, match="bytes"):
        load_audio((media / "truncated.mp4").read_bytes())


@pytest.mark.parametrize("loader", [load_audio, load_video, probe])
def test_zero_byte_file(media, loader):
    with pytest.raises(EmptyMediaError, match="empty.wav.*0 bytes"):
        loader(str(media / "empty.wav"))
    with pytest.raises(EmptyMediaError):
        loader(b"")


@pytest.mark.parametrize("loader", [load_audio, load_video, probe])
def test_random_bytes_named_mp4(media, loader):
    with pytest.raises(CorruptMediaError, match="random.mp4"):
        loader(str(media / "random.mp4"))


def test_ten_hour_wav_header_with_one_second_of_data(media):
    """The header promises 10 h (1.15 GB of samples); nothing may be sized from it."""
    path = str(media / "ten_hours_header.wav")
    with pytest.raises(TruncatedMediaError, match="ten_hours_header.wav"):
        load_audio(path)
    with pytest.raises(TruncatedMediaError):
        probe(path)


def test_unsupported_codec(media):
    with pytest.raises(UnsupportedCodecError, match="unknown_codec.wav.*no decoder"):
        load_audio(str(media / "unknown_codec.wav"))


def test_missing_file_and_bad_types(tmp_path):
    with pytest.raises(MediaNotFoundError, match="no such file"):
        load_audio(str(tmp_path / "nope.wav"))
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for callers that catch that
        load_video(tmp_path / "nope.mp4")
    with pytest.raises(MediaNotFoundError, match="not a regular file"):
        load_audio(str(tmp_path))
    with pytest.raises(TypeError):
        load_audio(12345)  # type: ignore[arg-type]


def test_wrong_stream_kind(media):
    with pytest.raises(MissingStreamError, match="no video stream"):
        load_video(str(media / "tone16k.wav"))
    with pytest.raises(MissingStreamError, match="no audio stream"):
        load_audio(str(media / "vp9.webm"))
    with pytest.raises(MissingStreamError):
        load_video(str(media / "with_cover.mp3"))  # a cover picture is not a video


def test_limits(media, tmp_path):
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        load_audio(str(media / "tone16k.wav"), limits=MediaLimits(max_bytes=1000))
    with pytest.raises(MediaTooLongError, match="max_seconds"):
        load_audio(str(media / "tone16k.wav"), limits=MediaLimits(max_seconds=1.0))
    with pytest.raises(MediaTooLongError, match="max_seconds"):
        load_video(str(media / "long70s.mp4"), limits=MediaLimits(max_seconds=10.0))
    with pytest.raises(MediaTooLargeError, match="frame size"):
        load_video(str(media / "vp9.webm"), limits=MediaLimits(max_pixels_decoded=96 * 64 - 1))
    with pytest.raises(MediaTooLargeError, match="channels"):
        load_audio(str(media / "stereo44k.wav"), limits=MediaLimits(max_channels=1))
    with pytest.raises(ValueError):
        MediaLimits(max_seconds=0)
    # sparse sampling seeks instead of decoding everything: 5 frames of 280 need about 5 GOPs of 12
    clip = load_video(str(media / "long70s.mp4"), max_frames=5, limits=MediaLimits(max_frames_decoded=100))
    assert clip.frames.shape[0] == 5
    with pytest.raises(MediaTooLargeError, match="max_frames_decoded"):
        load_video(str(media / "long70s.mp4"), limits=MediaLimits(max_frames_decoded=100))


def test_cut_off_stream_without_header_lies(tmp_path):
    """A FLAC whose STREAMINFO declares more samples than the file holds is truncated, not silently short."""
    path = tmp_path / "cut.flac"
    sf.write(path, (0.3 * np.random.default_rng(0).standard_normal(16000 * 20)).astype(np.float32), 16000)
    data = path.read_bytes()
    (tmp_path / "cut_half.flac").write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedMediaError, match="declare 20.00 s"):
        load_audio(str(tmp_path / "cut_half.flac"))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_damaged_data_of_full_length_is_corrupt_not_truncated(tmp_path, seed):
    """Flipped bytes inside a FLAC of full length: the decoder drops or refuses frames mid-file, but the bytes
    are all there, so the file is damaged (CorruptMediaError), not cut off; the same file halved is cut off."""
    path = tmp_path / "tone.flac"
    t = np.arange(16000 * 3) / 16000
    sf.write(path, (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    for i in rng.integers(2000, len(data) - 100, 200):
        data[i] ^= 0xFF
    damaged = tmp_path / "damaged.flac"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CorruptMediaError, match="damaged.flac.*damaged"):
        load_audio(str(damaged))
    (tmp_path / "halved.flac").write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(TruncatedMediaError, match="halved.flac"):
        load_audio(str(tmp_path / "halved.flac"))


def test_every_media_error_names_the_source(media):
    for name in ("truncated.mp4", "random.mp4", "empty.wav", "ten_hours_header.wav", "unknown_codec.wav"):
        with pytest.raises(MediaError) as info:
            load_audio(str(media / name))
        assert name in str(info.value) and info.value.reason


def test_decoded_output_is_bounded_for_a_lying_header(media):
    """Even with the structural check bypassed, the 10-hour header sizes nothing: the decoder yields the one
    second that exists (FFmpeg clamps the data chunk to the file) and samples are gathered as they come."""
    from wave_rt.media.backends.cpu import decode_audio
    from wave_rt.media.limits import DEFAULT_LIMITS
    from wave_rt.media.source import Source

    data = (media / "ten_hours_header.wav").read_bytes()
    src = Source(None, data, len(data))  # skips as_source's structure check on purpose
    decoded = decode_audio(src, DEFAULT_LIMITS)
    assert decoded.samples.shape == (16000,) and decoded.samples.nbytes == 64000


def test_junk_after_a_complete_mp4_is_not_an_error(media, tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_bytes((media / "silent.mp4").read_bytes() + b"\x00\x00\x00\x05junk-appended-by-a-camera")
    assert load_video(str(path)).frames.shape[0] == 6
