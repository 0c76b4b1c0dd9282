"""Media items through the processor: WAVE's templates, doubled audio placeholders, 300 s segments,
positions equal to transformers' get_rope_index, and file/array inputs agreeing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from media_factory import pattern_frames, write_video
from tiny_checkpoints import make_tiny_checkpoint

import wave_rt
from wave_rt.embed.encoder import WaveEncoder
from wave_rt.embed.processor import whisper_tokens


def tone(seconds: float, freq: float = 440.0, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def wave_encoder(tmp_path_factory) -> WaveEncoder:
    return WaveEncoder.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("wave"), use_beats=True, seed=4))


@pytest.fixture(scope="module")
def thinker_encoder(tmp_path_factory) -> WaveEncoder:
    return WaveEncoder.from_pretrained(
        make_tiny_checkpoint(tmp_path_factory.mktemp("thinker"), recipe="last_token", use_beats=False, seed=5))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media")
    sf.write(d / "tone.wav", tone(2.5), 16000)
    sf.write(d / "stereo44k.wav", np.stack([tone(1.7, 300, 44100), tone(1.7, 900, 44100)], 1), 44100)
    # 3 s of 64x48 test video at 10 fps, with and without a 440 Hz audio track
    frames = pattern_frames(30, 48, 64)
    write_video(d / "silent.webm", frames, 10, "libvpx-vp9")
    write_video(d / "av.mp4", frames, 10, "libx264", audio=tone(3.0, 440, 44100), audio_rate=44100)
    # audio shorter than the video: the block ends on a video chunk whose top position is below the audio's
    write_video(d / "av_short_audio.mp4", frames[:20], 10, "libx264", audio=tone(0.9, 440, 44100), audio_rate=44100)
    return d


def decode(enc: WaveEncoder, ids: torch.Tensor) -> str:
    return enc.processor.tokenizer.decode(ids.tolist(), skip_special_tokens=False)


def test_audio_template_with_doubled_placeholders(wave_encoder, media_dir):
    p = wave_encoder.prepare(wave_rt.Audio(str(media_dir / "tone.wav")))
    n = whisper_tokens(math.ceil(2.5 * 16000 / 160))
    assert decode(wave_encoder, p.inputs.input_ids) == (
        "<|audio_bos|>" + "<|AUDIO|>" * (2 * n) + "<|audio_eos|>Please describe the audio.<|im_end|>")
    assert p.inputs.audio[0].tokens == n and p.inputs.audio[0].fbank is not None
    q = wave_encoder.prepare(wave_rt.Audio(str(media_dir / "tone.wav")), instruction="Is anyone speaking?")
    assert decode(wave_encoder, q.inputs.input_ids).endswith("<|audio_eos|>Is anyone speaking?<|im_end|>")
    assert p.modality == "audio" and p.duration == pytest.approx(2.5, abs=0.01)


def test_plain_thinker_audio_is_not_doubled(thinker_encoder, media_dir):
    p = thinker_encoder.prepare(wave_rt.Audio(str(media_dir / "tone.wav")))
    n = whisper_tokens(math.ceil(2.5 * 16000 / 160))
    assert int((p.inputs.input_ids == thinker_encoder.processor.ids["audio"]).sum()) == n


def test_long_audio_is_split_in_300s_segments(wave_encoder):
    wav = tone(301.5, 220)
    p = wave_encoder.prepare(wave_rt.Audio(wav, sample_rate=16000))
    frames = [s.mel_len for s in p.inputs.audio]
    assert frames == [30000, 150]  # 300 s, then 1.5 s
    n = sum(whisper_tokens(f) for f in frames)
    assert int((p.inputs.input_ids == wave_encoder.processor.ids["audio"]).sum()) == 2 * n


def test_file_and_array_inputs_agree(wave_encoder, media_dir):
    wav, sr = sf.read(media_dir / "tone.wav", dtype="float32")
    a = wave_encoder.encode(wave_rt.Audio(str(media_dir / "tone.wav")))
    b = wave_encoder.encode(wave_rt.Audio(wav, sample_rate=sr))
    c = wave_encoder.encode(wave_rt.Audio((media_dir / "tone.wav").read_bytes()))
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)
    # multi-channel at 44.1 kHz: first channel, resampled
    d = wave_encoder.prepare(wave_rt.Audio(str(media_dir / "stereo44k.wav")))
    assert d.duration == pytest.approx(1.7, abs=0.02)


def test_video_and_av_templates_and_positions(thinker_encoder, media_dir):
    import transformers

    enc = thinker_encoder
    v = enc.prepare(wave_rt.Video(str(media_dir / "silent.webm")))
    text = decode(enc, v.inputs.input_ids)
    assert text.startswith("<|vision_bos|><|VIDEO|>") and text.endswith("<|vision_eos|>Please describe the video.<|im_end|>")
    av = enc.prepare(wave_rt.AudioVisual(str(media_dir / "av.mp4")))
    text = decode(enc, av.inputs.input_ids)
    assert text.startswith("<|vision_bos|><|audio_bos|><|VIDEO|>")
    assert text.endswith("<|audio_eos|><|vision_eos|>Please describe the video.<|im_end|>")
    # positions: exactly what transformers derives from the same ids
    cfg = enc.config.hf_config
    with torch.device("meta"):
        hf = transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    short = enc.prepare(wave_rt.AudioVisual(str(media_dir / "av_short_audio.mp4")))
    for p, use_av in ((v, False), (av, True), (short, True)):
        x = p.inputs
        ids_ = x.input_ids[None]
        mel_lens = torch.tensor([[s.mel_len for s in x.audio]]).sum(-1) if x.audio else None
        pos, _ = (hf.model if hasattr(hf.model, "language_model") else hf).get_rope_index(ids_, None, torch.tensor([x.grid_thw]), torch.ones_like(ids_), use_av, mel_lens,
                                         torch.tensor([x.second_per_grid]))
        assert torch.equal(pos[:, 0], x.position_ids)


def test_av_without_audio_track_is_a_typed_error(thinker_encoder, media_dir):
    with pytest.raises(wave_rt.InputError, match="no audio track"):
        thinker_encoder.prepare(wave_rt.AudioVisual(str(media_dir / "silent.webm")))


def test_mixed_media_batch_equals_items_alone(wave_encoder, media_dir):
    items = ["a text", wave_rt.Audio(str(media_dir / "tone.wav")), wave_rt.Video(str(media_dir / "silent.webm")),
             wave_rt.AudioVisual(str(media_dir / "av.mp4")), wave_rt.Text("a query", side="query")]
    together = wave_encoder.encode(items)
    for k, item in enumerate(items):
        np.testing.assert_allclose(wave_encoder.encode(item), together[k], atol=1e-5)


def test_qa_helper_scores_letters(wave_encoder, media_dir):
    res = wave_encoder.answer(wave_rt.Audio(str(media_dir / "tone.wav")), "What is heard?", ["a tone", "speech", "silence"])
    assert res.letter in ("A", "B", "C") and len(res.scores) == 3
    assert res.scores[res.choice] == max(res.scores)
    instr, letters = wave_encoder.processor.qa_instruction("What is heard?", ["a tone", "speech"])
    assert instr == "What is heard?\nA. a tone\nB. speech\nPlease respond with only the letter of the correct answer."


@pytest.mark.parametrize("seconds", [0.01, 0.3, 1.0, 2.5])
def test_duration_is_the_clips_own_length_not_the_padded_one(wave_encoder, tmp_path, seconds):
    # A clip under 1 s is zero-padded to 1 s for the model; its recorded duration (the archive's `duration`
    # column, the progress line's audio seconds) is what the file holds.
    sf.write(tmp_path / "clip.wav", tone(seconds, sr=44100), 44100)
    from_file = wave_encoder.prepare(wave_rt.Audio(str(tmp_path / "clip.wav")))
    from_array = wave_encoder.prepare(wave_rt.Audio(tone(seconds, sr=44100), sample_rate=44100))
    assert from_file.duration == pytest.approx(seconds, abs=1e-4)
    assert from_array.duration == pytest.approx(seconds, abs=1e-4)
    assert from_file.num_tokens == from_array.num_tokens


def test_qa_letters_given_are_the_letters_listed_and_scored(wave_encoder, media_dir):
    instr, letters = wave_encoder.processor.qa_instruction("What is heard?", ["a tone", "speech"], ["X", "Y"])
    assert letters == ["X", "Y"] and "X. a tone\nY. speech" in instr and "A." not in instr
    res = wave_encoder.answer(wave_rt.Audio(str(media_dir / "tone.wav")), "What is heard?", ["a tone", "speech"],
                              letters=["X", "Y"])
    assert res.letter in ("X", "Y") and len(res.scores) == 2
    for bad in (["X"], ["X", "Y", "Z"], ["X", "X"]):
        with pytest.raises(ValueError, match="letter"):
            wave_encoder.answer(wave_rt.Audio(str(media_dir / "tone.wav")), "What is heard?", ["a tone", "speech"],
                                letters=bad)
    with pytest.raises(ValueError, match="26"):
        wave_encoder.processor.qa_instruction("Which?", [str(i) for i in range(27)])


def test_integer_pcm_waveforms_embed_as_their_wav_file(wave_encoder, tmp_path):
    # an int16 array is the PCM soundfile writes: the same samples as a file or scaled floats embed alike
    # (they were used unscaled, 32768x too loud: cosine -0.49 against the file)
    pcm = (tone(1.3) * 32767).astype(np.int16)
    sf.write(tmp_path / "pcm.wav", pcm, 16000, subtype="PCM_16")
    from_file = wave_encoder.encode(wave_rt.Audio(str(tmp_path / "pcm.wav")))
    for arr in (pcm, torch.from_numpy(pcm), pcm.astype(np.int32) << 16):
        got = wave_encoder.encode(wave_rt.Audio(arr, sample_rate=16000))
        np.testing.assert_allclose(got, from_file, atol=1e-5)
    s8 = (pcm >> 8).astype(np.int8)  # 8-bit PCM, signed and unsigned, is its value / 128
    as_float = wave_encoder.encode(wave_rt.Audio(s8.astype(np.float32) / 128, sample_rate=16000))
    u8 = (s8.astype(np.int16) + 128).astype(np.uint8)
    for arr in (s8, u8):
        np.testing.assert_allclose(wave_encoder.encode(wave_rt.Audio(arr, sample_rate=16000)), as_float, atol=1e-6)
    with pytest.raises(wave_rt.InputError, match="dtype"):
        wave_encoder.prepare(wave_rt.Audio(pcm.astype(np.int64), sample_rate=16000))


def test_a_samples_by_channels_array_is_refused_not_read_as_two_samples(wave_encoder):
    stereo = np.stack([tone(2.0), tone(2.0, 880)], 1)  # soundfile's [samples, channels]
    with pytest.raises(wave_rt.InputError, match=r"looks like \[samples, channels\].*wav\.T"):
        wave_encoder.prepare(wave_rt.Audio(stereo, sample_rate=16000))
    np.testing.assert_allclose(wave_encoder.encode(wave_rt.Audio(stereo.T, sample_rate=16000)),
                               wave_encoder.encode(wave_rt.Audio(stereo[:, 0], sample_rate=16000)), atol=1e-6)


@pytest.mark.parametrize(("rate", "seconds"), [(30.0, 10.0), (25.0, 100.0), (None, 7.0), (2.0, 70.0)])
def test_raw_frames_are_sampled_as_a_decoded_file_is(thinker_encoder, rate, seconds):
    # frame k holds the value k, so the frames kept are readable; a file of this rate and length keeps
    # sample_frame_ids' frames (about 2 fps over the clip, at most max_frames)
    from wave_rt.media.video import sample_frame_ids

    m = thinker_encoder.config.media
    n = int(round(seconds * (rate or m.fps)))
    frames = np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, 56, 56, 3)).copy()
    p = thinker_encoder.prepare(wave_rt.Video(frames, fps=rate), defer_features=True)
    want = sample_frame_ids(n, rate or m.fps, m.fps, m.max_frames)
    assert p.inputs.frames[:, 0, 0, 0].tolist() == (want % 256).tolist()
    assert len(want) == min(m.max_frames, round(seconds * m.fps))
    assert p.duration == pytest.approx(seconds)


def test_raw_frames_embed_as_their_file(thinker_encoder, tmp_path):
    frames = pattern_frames(60, 48, 64)  # 6 s at 10 fps
    write_video(tmp_path / "clip.webm", frames, 10, "libvpx-vp9")
    from_file = thinker_encoder.prepare(wave_rt.Video(str(tmp_path / "clip.webm")))
    raw = thinker_encoder.prepare(wave_rt.Video(frames, fps=10))
    assert raw.inputs.grid_thw == from_file.inputs.grid_thw and raw.num_tokens == from_file.num_tokens
    assert torch.equal(raw.inputs.position_ids, from_file.inputs.position_ids)


@pytest.mark.parametrize(("item", "why"), [
    (wave_rt.Video(np.zeros((0, 56, 56, 3), np.uint8)), "at least one frame"),
    (wave_rt.Video(np.zeros((4, 56, 56, 3), np.uint8), fps=0), "fps must be"),
    (wave_rt.Video(np.zeros((4, 56, 56, 3), np.uint8), fps=-1.0), "fps must be"),
    (wave_rt.Video(np.zeros((4, 56, 56, 3), np.uint8), fps=float("nan")), "fps must be"),
    (wave_rt.Video(np.zeros((2, 10, 3000, 3), np.uint8)), "aspect ratio"),
    (wave_rt.Audio(np.zeros(16000, np.float32), sample_rate=0), "sample_rate must be"),
    (wave_rt.Audio(np.zeros(16000, np.float32), sample_rate=-16000), "sample_rate must be"),
])
def test_bad_raw_media_are_typed_errors_naming_their_position(thinker_encoder, item, why):
    # they were bare ValueErrors without the item (fps=0 silently meant the default rate)
    with pytest.raises(wave_rt.InputError, match=why) as err:
        thinker_encoder.encode(["fine", "also fine", item])
    assert err.value.index == 2 and str(err.value).startswith("item 2 ")


def test_media_errors_name_the_position_of_an_unnamed_source(thinker_encoder):
    import pickle

    with pytest.raises(wave_rt.MediaError) as err:
        thinker_encoder.encode(["fine", wave_rt.Audio(b"not a media file at all")])
    assert err.value.index == 1 and str(err.value).startswith("item 1 <23 bytes>: ")
    back = pickle.loads(pickle.dumps(err.value))  # errors cross process boundaries pickled
    assert type(back) is type(err.value) and str(back) == str(err.value)
    with pytest.raises(wave_rt.InputError) as err2:
        thinker_encoder.encode(["fine", wave_rt.Text("   ")])
    assert str(pickle.loads(pickle.dumps(err2.value))) == str(err2.value) and "item 1 " in str(err2.value)
