"""patchify_video against transformers' Qwen2-VL processing of the same frames.

transformers' Qwen2VLVideoProcessor needs torchvision, which cannot be installed next to this torch. What runs
here is the PIL path: Qwen2VLImageProcessorPil (smart_resize, PIL bicubic, rescale, normalize, spatial patch
order) per frame, combined along time by transformers' own Qwen2VLVideoProcessor.patchify, whose source is
loaded from the installed file and run as is. Without Pillow, an independent loop-by-loop port of Pillow's
resampler in this file is the reference."""

from __future__ import annotations

import ast
import importlib.util
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from wave_rt.media import load_video, patchify_video, smart_resize
from wave_rt.media.features_video import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    patchify_native,
    patchify_reference,
    resize_bicubic_pil,
)

HAS_PIL = importlib.util.find_spec("PIL") is not None


def transformers_video_patchify():
    """transformers' Qwen2VLVideoProcessor.patchify, compiled from the installed source (the module itself
    cannot be imported without torchvision)."""
    spec = importlib.util.find_spec("transformers.models.qwen2_vl.video_processing_qwen2_vl")
    tree = ast.parse(open(spec.origin).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    module = ast.Module(body=[fn], type_ignores=[])
    namespace = {"torch": torch}
    exec(compile(module, spec.origin, "exec"), namespace)
    return namespace["patchify"]


def pillow_order() -> str:
    import PIL

    return "pillow13" if int(PIL.__version__.split(".")[0]) >= 13 else "classic"


def transformers_reference(frames: np.ndarray, min_pixels: int, max_pixels: int) -> tuple[np.ndarray, list[int]]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    size = proc.size
    normalized = []
    for f in frames:
        img = np.moveaxis(f, -1, 0)  # channel-first, as the PIL backend holds images
        img = proc.resize(img, size=size, resample=proc.resample, factor=28)
        img = proc.rescale(img, proc.rescale_factor)
        img = proc.normalize(img, proc.image_mean, proc.image_std)
        normalized.append(img)
    video = torch.from_numpy(np.stack(normalized))[None]  # [1, T, C, H, W]
    patches, t, h, w = transformers_video_patchify()(None, video, 14, 2, 2)
    # the image path of the same processor must agree on each frame's spatial layout
    single = proc(images=[frames[0]], return_tensors="np")
    assert single["image_grid_thw"].tolist() == [[1, h, w]]
    return patches[0].numpy(), [t, h, w]


# ---------------------------------------------------------------- independent Pillow port (no numpy tricks)
def pillow_axis_ref(in_size: int, out_size: int):
    scale = in_size / out_size
    fs = max(scale, 1.0)
    support = 2.0 * fs
    table = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        ws = []
        for x in range(xmin, xmax):
            d = abs((x - center + 0.5) / fs)
            ws.append(1.5 * d**3 - 2.5 * d**2 + 1 if d < 1 else (-0.5 * d**3 + 2.5 * d**2 - 4 * d + 2 if d < 2 else 0.0))
        total = sum(ws)
        table.append((xmin, [int(math.floor(w / total * (1 << 22) + 0.5)) if w >= 0 else
                             -int(math.floor(-w / total * (1 << 22) + 0.5)) for w in ws]))
    return table


def pillow_resize_ref(img: np.ndarray, height: int, width: int, vertical_first: bool = False) -> np.ndarray:
    def run(a, axis, size):
        table = pillow_axis_ref(a.shape[axis], size)
        a = np.moveaxis(a.astype(np.int64), axis, 0)
        out = np.empty((size, *a.shape[1:]), dtype=np.int64)
        for i, (start, ws) in enumerate(table):
            acc = np.full(a.shape[1:], 1 << 21, dtype=np.int64)
            for j, w in enumerate(ws):
                acc += a[start + j] * w
            out[i] = np.clip(acc >> 22, 0, 255)
        return np.moveaxis(out, 0, axis).astype(np.uint8)

    steps = [(1, width), (0, height)]
    if vertical_first:
        steps.reverse()
    for axis, size in steps:
        if img.shape[axis] != size:
            img = run(img, axis, size)
    return img


def numpy_reference(frames: np.ndarray, min_pixels: int, max_pixels: int) -> np.ndarray:
    t, h, w, _ = frames.shape
    height, width = smart_resize(h, w, 28, min_pixels, max_pixels)
    resized = np.stack([pillow_resize_ref(f, height, width) for f in frames]).astype(np.float64) / 255.0
    norm = (resized - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)  # [T, H, W, C]
    if t % 2:
        norm = np.concatenate([norm, norm[-1:]])
    gt, gh, gw = norm.shape[0] // 2, height // 14, width // 14
    x = norm.transpose(0, 3, 1, 2).reshape(gt, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14)
    return x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, 1176)


CASES = [(4, 48, 64), (3, 37, 53), (1, 20, 300), (5, 120, 90), (2, 28, 28), (6, 31, 500), (3, 360, 640)]


@pytest.mark.skipif(not HAS_PIL, reason="Pillow is not installed; the numpy port below is the reference")
@pytest.mark.parametrize("t,h,w", CASES)
def test_patchify_equals_transformers_pil_path(t, h, w):
    rng = np.random.default_rng(t * h + w)
    frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    ref, grid = transformers_reference(frames, 784, 176400)
    order = pillow_order()
    height, width = smart_resize(h, w, 28, 784, 176400)
    feats = patchify_video(frames, fps=2.0)
    assert feats.video_grid_thw.tolist() == grid and feats.video_grid_thw.dtype == torch.long
    exact = patchify_reference(torch.from_numpy(frames), height, width, order=order)
    np.testing.assert_allclose(exact.numpy(), ref, rtol=0, atol=1e-5)
    native = torch.full((ref.shape[0], 1176), float("nan"))
    patchify_native(torch.from_numpy(frames), height, width, native, order=order)
    np.testing.assert_allclose(native.numpy(), ref, rtol=0, atol=1e-5)
    if order == "classic" or not (h - height > 0 and h - height > 2 * (w - width)):
        # the default (Pillow <= 12 pass order) agrees with the installed Pillow wherever the orders agree
        np.testing.assert_allclose(feats.pixel_values_videos.numpy(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("t,h,w", CASES[:4])
def test_patchify_equals_independent_numpy_port(t, h, w):
    rng = np.random.default_rng(100 + t * h + w)
    frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    ref = numpy_reference(frames, 784, 176400)
    feats = patchify_video(frames)
    np.testing.assert_allclose(feats.pixel_values_videos.numpy(), ref, rtol=0, atol=1e-5)
    assert feats.video_second_per_grid == 1.0  # 2 / the processor's default 2 fps


def test_native_equals_torch_reference_and_overwrites_poisoned_output():
    rng = np.random.default_rng(5)
    for (t, h, w) in [(3, 240, 320), (5, 97, 41), (1, 700, 60), (2, 56, 84)]:
        frames = torch.from_numpy(rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8))
        height, width = smart_resize(h, w, 28, 784, 176400)
        for order in ("classic", "pillow13"):
            ref = patchify_reference(frames, height, width, order=order)
            out = torch.full_like(ref, float("nan"))
            for threads in (1, 3):
                out.fill_(float("nan"))
                patchify_native(frames, height, width, out, order=order, threads=threads)
                assert torch.equal(out, ref)


def test_preallocated_and_pinned_style_output_buffer():
    frames = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 50, 70, 3), dtype=np.uint8))
    first = patchify_video(frames)
    buf = torch.full(first.pixel_values_videos.shape, float("nan"))
    second = patchify_video(frames, out=buf)
    assert second.pixel_values_videos.data_ptr() == buf.data_ptr()
    assert torch.equal(buf, first.pixel_values_videos)
    with pytest.raises(ValueError, match="out must be"):
        patchify_video(frames, out=torch.empty(3, 1176))


def test_worker_output_in_shared_memory_equals_private(monkeypatch):
    # Decode workers write pixels straight into shared memory (nothing to copy when sending them).
    import wave_rt.media.features_video as fv

    frames = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (5, 97, 141, 3), dtype=np.uint8))
    private = patchify_video(frames).pixel_values_videos
    monkeypatch.setattr(fv, "SHARED_OUTPUT", True)
    shared = patchify_video(frames).pixel_values_videos
    assert shared.is_shared() and not private.is_shared()
    assert shared.shape == private.shape and shared.is_contiguous() and torch.equal(shared, private)


def test_resize_equals_installed_pillow():
    if not HAS_PIL:
        pytest.skip("Pillow is not installed")
    from PIL import Image

    rng = np.random.default_rng(11)
    order = pillow_order()
    for _ in range(40):
        h, w, H, W = (int(v) for v in rng.integers(1, 90, 4))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.asarray(Image.fromarray(img).resize((W, H), Image.BICUBIC))
        got = resize_bicubic_pil(torch.from_numpy(img)[None], H, W, order=order)[0].numpy()
        np.testing.assert_array_equal(got, want)


def test_torch_resize_equals_numpy_port_both_orders():
    rng = np.random.default_rng(12)
    for (h, w, H, W) in [(37, 53, 28, 56), (40, 50, 56, 28), (9, 9, 28, 84), (120, 30, 28, 28)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for vf, order in ((False, "classic"), (h - H > 0 and h - H > 2 * (w - W), "pillow13")):
            want = pillow_resize_ref(img, H, W, vertical_first=vf)
            got = resize_bicubic_pil(torch.from_numpy(img)[None], H, W, order=order)[0].numpy()
            np.testing.assert_array_equal(got, want)


def test_smart_resize_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(2)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(10, 4000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        assert smart_resize(h, w, 28, 784, 176400) == hf_smart_resize(h, w, 28, 784, 176400)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)


def test_odd_frame_count_repeats_last_frame():
    frames = np.random.default_rng(4).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    odd = patchify_video(frames).pixel_values_videos
    even = patchify_video(np.concatenate([frames, frames[-1:]])).pixel_values_videos
    assert torch.equal(odd, even)
    assert patchify_video(frames).video_grid_thw.tolist() == [2, 4, 4]


def test_bad_frames_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        patchify_video(torch.zeros(2, 28, 28, 3))
    with pytest.raises(ValueError, match="at least one frame"):
        patchify_video(torch.zeros(0, 28, 28, 3, dtype=torch.uint8))


def test_decoded_clip_end_to_end(media):
    clip = load_video(str(media / "vp9.webm"))
    feats = patchify_video(clip.frames, fps=clip.fps)
    assert feats.video_second_per_grid == pytest.approx(2 / clip.fps)
    ref = numpy_reference(clip.frames.numpy(), 784, 176400)
    np.testing.assert_allclose(feats.pixel_values_videos.numpy(), ref, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_gpu_path_equals_cpu():
    frames = torch.from_numpy(np.random.default_rng(9).integers(0, 256, (5, 360, 640, 3), dtype=np.uint8))
    cpu = patchify_video(frames)
    gpu = patchify_video(frames.cuda())
    assert gpu.pixel_values_videos.is_cuda
    torch.testing.assert_close(gpu.pixel_values_videos.cpu(), cpu.pixel_values_videos, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- native contract
def _native_call_args(t: int = 2, h: int = 56, w: int = 56, height: int = 56, width: int = 56):
    from wave_rt.media import features_video as fv

    frames = np.random.default_rng(0).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    hb, hc = fv.bicubic_coefficients(w, width)
    vb, vc = fv.bicubic_coefficients(h, height)
    out = np.full(((t + 1) // 2 * (height // 14) * (width // 14), 1176), np.nan, np.float32)
    return frames, hb, hc, vb.copy(), vc, out


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_native_refuses_an_out_it_would_not_write(dtype):
    # A cast `out` used to be a temporary copy: filled, dropped, the caller's array left as it was.
    from wave_rt.media import features_video as fv

    frames, hb, hc, vb, vc, out = _native_call_args()
    wrong = out.astype(dtype)
    with pytest.raises(TypeError, match=f"out must be a float32.*{np.dtype(dtype).name}"):
        fv._native().resize_normalize_patchify(frames, 56, 56, fv.normalize_lut(), hb, hc, vb, vc, wrong)
    with pytest.raises(TypeError, match="out must be a float32"):
        patchify_native(torch.from_numpy(frames), 56, 56, torch.from_numpy(wrong))


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.int16])
def test_native_refuses_frames_that_are_not_uint8(dtype):
    # A cast would read float pixels in [0, 1] as levels 0 and 1, and wrap int16 levels above 255.
    from wave_rt.media import features_video as fv

    frames, hb, hc, vb, vc, out = _native_call_args()
    with pytest.raises(TypeError, match=f"frames must be uint8.*{np.dtype(dtype).name}"):
        fv._native().resize_normalize_patchify(frames.astype(dtype), 56, 56, fv.normalize_lut(), hb, hc, vb, vc, out)
    assert np.isnan(out).all()
    # a non-contiguous uint8 view is still fine (copied, same values)
    view = np.ascontiguousarray(frames[:, :, ::-1])[:, :, ::-1]
    fv._native().resize_normalize_patchify(view, 56, 56, fv.normalize_lut(), hb, hc, vb, vc, out)
    np.testing.assert_array_equal(out, patchify_reference(torch.from_numpy(frames), 56, 56).numpy())


@pytest.mark.parametrize("case", ["starts_go_back", "last_ends_before_first"])
def test_native_refuses_non_monotonic_tables(case):
    # The horizontal-first path resamples only the rows between the first row's start and the last row's
    # end; a table that goes back read outside that band (heap overflow under ASan) or wrapped its size.
    from wave_rt.media import features_video as fv

    frames, hb, hc, vb, vc, out = _native_call_args(1, 100, 60, 56, 28)
    if case == "starts_go_back":
        vb[0] = vb[-1] = (90, 5)
        vb[1] = (0, 5)
    else:
        vb[0], vb[-1] = (90, 5), (0, 5)
    with pytest.raises(ValueError, match="vertical resampling table is not monotonic at row 1"):
        fv._native().resize_normalize_patchify(frames, 56, 28, fv.normalize_lut(), hb, hc, vb, vc, out, False, 2)


WORKER_FAILURE = r"""
import resource
import numpy as np
from wave_rt import _native
T, W, height, width = 2, 200_000, 2800, 28
frames = np.zeros((T, 1, W, 3), np.uint8)
one = 1 << 22
hb = np.stack([np.arange(width) * (W // width), np.ones(width)], 1).astype(np.int32)
hc = np.full((width, 1), one, np.int32)
vb = np.tile(np.array([[0, 1]], np.int32), (height, 1))
vc = np.full((height, 1), one, np.int32)
out = np.zeros(((T + 1) // 2 * (height // 14) * (width // 14), 1176), np.float32)
lut = np.zeros((3, 256), np.float32)
vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize")) * 1024
# the vertical-first scratch frame (height x W x 3 = 1.7 GB) cannot be allocated under this limit
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
try:
    _native.resize_normalize_patchify(frames, height, width, lut, hb, hc, vb, vc, out, True, 2)
except MemoryError:
    print("MemoryError")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and sets RLIMIT_AS")
def test_native_worker_failure_is_a_python_exception_not_an_abort():
    # A C++ exception escaping a std::thread calls std::terminate: the interpreter used to abort (SIGABRT).
    r = subprocess.run([sys.executable, "-c", WORKER_FAILURE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "MemoryError"


@pytest.fixture
def native_missing(monkeypatch):
    import wave_rt
    from wave_rt.media import features_video as fv

    monkeypatch.delattr(wave_rt, "_native", raising=False)
    monkeypatch.setitem(sys.modules, "wave_rt._native", None)  # the import now raises ImportError
    clear = getattr(fv._native, "cache_clear", lambda: None)
    clear()
    yield
    clear()


def test_missing_native_falls_back_to_torch_and_says_so_once(native_missing, caplog):
    from wave_rt.media import features_video as fv

    frames = np.random.default_rng(3).integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
    height, width = smart_resize(50, 70, 28, 784, 176400)
    ref = patchify_reference(torch.from_numpy(frames), height, width)
    with caplog.at_level(logging.INFO, logger="wave_rt.media.features_video"):
        first = patchify_video(frames).pixel_values_videos
        buf = torch.full_like(ref, float("nan"))
        second = patchify_video(frames, out=buf).pixel_values_videos
    assert not fv.has_native()
    assert torch.equal(first, ref) and torch.equal(second, ref) and second.data_ptr() == buf.data_ptr()
    notes = [r for r in caplog.records if "torch implementation" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
