// Fused Qwen-VL video preprocessing for CPU frames: Pillow-exact bicubic resize (8-bit fixed point, the
// resampling tables come from Python so both paths share them), CLIP normalization through a per-channel
// lookup table, and the temporal/spatial patch layout, written straight into a caller-provided float32
// [N, 1176] buffer (which may be pinned). One frame per task, frames spread over threads, GIL released.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <pybind11/numpy.h>

#include "native.h"

namespace py = pybind11;

namespace wave_rt {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's 8-bit layout
constexpr int kPatch = 14;
constexpr int kMerge = 2;
constexpr int kTemporal = 2;
constexpr int kPatchDim = 3 * kTemporal * kPatch * kPatch;

struct Axis {
    const int32_t* bounds;  // [out, 2]: first tap, tap count
    const int32_t* coeffs;  // [out, ksize]
    int ksize;
    int out;
};

// Pixels are 3 bytes; these move them between [rows, cols] and [cols, rows] layouts in cache-sized blocks.
void transpose3(const uint8_t* src, int rows, int cols, uint8_t* dst) {
    constexpr int B = 32;
    for (int r0 = 0; r0 < rows; r0 += B)
        for (int c0 = 0; c0 < cols; c0 += B) {
            const int r1 = std::min(rows, r0 + B), c1 = std::min(cols, c0 + B);
            for (int r = r0; r < r1; ++r)
                for (int c = c0; c < c1; ++c) {
                    const uint8_t* s = src + (static_cast<int64_t>(r) * cols + c) * 3;
                    uint8_t* d = dst + (static_cast<int64_t>(c) * rows + r) * 3;
                    d[0] = s[0];
                    d[1] = s[1];
                    d[2] = s[2];
                }
        }
}

// "avx2" names an x86 target: other architectures (aarch64, ...) reject the attribute outright, so
// multiversioning is x86-only and elsewhere the loops are compiled once for the baseline ISA.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define WAVE_RT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define WAVE_RT_CLONES
#endif

// The one inner loop: acc[i] += line[i] * w over a contiguous run. On x86, compiled for AVX2 and for the
// baseline; the loader picks the variant the CPU supports (GCC function multiversioning).
WAVE_RT_CLONES void mac_run(int32_t* acc, const uint8_t* line, int32_t w, int n) {
    for (int i = 0; i < n; ++i) acc[i] += line[i] * w;
}

WAVE_RT_CLONES void clip_run(const int32_t* acc, uint8_t* out, int n) {
    for (int i = 0; i < n; ++i) {
        const int32_t v = acc[i] >> kPrecisionBits;
        out[i] = static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
    }
}

// Resample along the outer axis: src [in_lines, n] (line `first` of the image at src line 0) -> dst [out, n].
// Every output line is a weighted sum of whole input lines, so the work is contiguous and vectorizes.
void resample_lines(const uint8_t* src, int n, int first, const Axis& ax, int32_t* acc, uint8_t* dst) {
    for (int yy = 0; yy < ax.out; ++yy) {
        const int ymin = ax.bounds[2 * yy] - first, count = ax.bounds[2 * yy + 1];
        const int32_t* k = ax.coeffs + static_cast<int64_t>(yy) * ax.ksize;
        std::fill(acc, acc + n, 1 << (kPrecisionBits - 1));
        for (int y = 0; y < count; ++y) mac_run(acc, src + static_cast<int64_t>(ymin + y) * n, k[y], n);
        clip_run(acc, dst + static_cast<int64_t>(yy) * n, n);
    }
}

struct Scratch {
    std::vector<uint8_t> a, b;
    std::vector<int32_t> acc;
};

// Vertical pass: src [in_h, width, 3] -> dst [out_h, width, 3].
void vertical(const uint8_t* src, int width, int first, const Axis& ax, Scratch& s, uint8_t* dst) {
    s.acc.resize(static_cast<size_t>(width) * 3);
    resample_lines(src, width * 3, first, ax, s.acc.data(), dst);
}

// Horizontal pass: src [rows, in_w, 3] -> dst [rows, out_w, 3], done as a line pass on the transposed image
// (same integer sums in the same order per output value, so the result is identical).
void horizontal(const uint8_t* src, int rows, int in_w, const Axis& ax, Scratch& s, uint8_t* dst) {
    s.a.resize(static_cast<size_t>(rows) * in_w * 3);
    s.b.resize(static_cast<size_t>(rows) * ax.out * 3);
    s.acc.resize(static_cast<size_t>(rows) * 3);
    transpose3(src, rows, in_w, s.a.data());
    resample_lines(s.a.data(), rows * 3, 0, ax, s.acc.data(), s.b.data());
    transpose3(s.b.data(), ax.out, rows, dst);
}

// One resized frame [H, W, 3] -> its temporal slot `tp` of temporal group `t` in the patch buffer.
void scatter(const uint8_t* img, int height, int width, const float* lut, int t, int tp, float* out) {
    const int gh = height / kPatch, gw = width / kPatch;
    const int64_t base_row = static_cast<int64_t>(t) * gh * gw;
    for (int y = 0; y < height; ++y) {
        const int hb = y / (kPatch * kMerge), mh = (y / kPatch) % kMerge, ph = y % kPatch;
        const uint8_t* line = img + static_cast<int64_t>(y) * width * 3;
        for (int x0 = 0; x0 < width; x0 += kPatch) {
            const int wb = x0 / (kPatch * kMerge), mw = (x0 / kPatch) % kMerge;
            const int64_t row = base_row + ((static_cast<int64_t>(hb) * (gw / kMerge) + wb) * kMerge + mh) * kMerge + mw;
            float* dst_row = out + row * kPatchDim;
            for (int c = 0; c < 3; ++c) {
                float* d = dst_row + ((c * kTemporal + tp) * kPatch + ph) * kPatch;
                const float* l = lut + c * 256;
                const uint8_t* s = line + x0 * 3 + c;
                for (int pw = 0; pw < kPatch; ++pw) d[pw] = l[s[3 * pw]];
            }
        }
    }
}

// Bounds must stay inside the frame and be non-decreasing (first tap and end tap alike, as Pillow's tables
// are): the horizontal-first path resamples only rows [first row's start, last row's end) and the vertical
// pass indexes into that band, so a non-monotonic table would read outside it.
void check_axis(const py::array_t<int32_t>& bounds, const py::array_t<int32_t>& coeffs, int in, int out,
                const char* name) {
    if (bounds.ndim() != 2 || bounds.shape(0) != out || bounds.shape(1) != 2 || coeffs.ndim() != 2 ||
        coeffs.shape(0) != out)
        throw std::invalid_argument(std::string(name) + " resampling table has the wrong shape");
    const int32_t* b = bounds.data();
    for (int i = 0; i < out; ++i) {
        const int64_t start = b[2 * i], count = b[2 * i + 1];
        if (start < 0 || count < 0 || count > coeffs.shape(1) || start + count > in)
            throw std::invalid_argument(std::string(name) + " resampling table reads outside the frame");
        if (i > 0 && (start < b[2 * (i - 1)] || start + count < int64_t{b[2 * (i - 1)]} + b[2 * (i - 1) + 1]))
            throw std::invalid_argument(std::string(name) + " resampling table is not monotonic at row " +
                                        std::to_string(i) + ": taps must start and end in non-decreasing order");
    }
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

void resize_normalize_patchify(
    py::array frames_in, int height, int width,
    py::array_t<float, py::array::c_style | py::array::forcecast> lut,
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> h_bounds,
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> h_coeffs,
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> v_bounds,
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> v_coeffs, py::array out,
    bool vertical_first, int threads) {
    // No casting of frames or out: a cast would read float pixels in [0, 1] as levels 0..1 (frames), or fill a
    // temporary copy the caller never sees (out). A non-contiguous uint8 frames view is still copied, harmlessly.
    if (!py::isinstance<py::array_t<uint8_t>>(frames_in))
        throw py::type_error("frames must be uint8 [T, H, W, 3], got dtype " + dtype_str(frames_in));
    if (!py::isinstance<py::array_t<float>>(out))
        throw py::type_error("out must be a float32 [N, 1176] array, got dtype " + dtype_str(out));
    const auto frames = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(frames_in);
    if (!frames) throw py::error_already_set();
    if (frames.ndim() != 4 || frames.shape(3) != 3) throw std::invalid_argument("frames must be uint8 [T, H, W, 3]");
    const int T = static_cast<int>(frames.shape(0)), H = static_cast<int>(frames.shape(1)),
              W = static_cast<int>(frames.shape(2));
    if (T < 1 || H < 1 || W < 1) throw std::invalid_argument("frames must be non-empty");
    if (height % (kPatch * kMerge) || width % (kPatch * kMerge) || height <= 0 || width <= 0)
        throw std::invalid_argument("output size must be positive multiples of 28");
    if (lut.ndim() != 2 || lut.shape(0) != 3 || lut.shape(1) != 256) throw std::invalid_argument("lut must be [3, 256]");
    check_axis(h_bounds, h_coeffs, W, width, "horizontal");
    check_axis(v_bounds, v_coeffs, H, height, "vertical");
    const int groups = (T + kTemporal - 1) / kTemporal;
    const int64_t n_rows = static_cast<int64_t>(groups) * (height / kPatch) * (width / kPatch);
    if (out.ndim() != 2 || out.shape(0) != n_rows || out.shape(1) != kPatchDim ||
        !(out.flags() & py::array::c_style) || !out.writeable())
        throw std::invalid_argument("out must be a writable C-contiguous float32 [N, 1176] array");

    const uint8_t* src = frames.data();
    const float* table = lut.data();
    float* dst = static_cast<float*>(out.mutable_data());
    const Axis hx{h_bounds.data(), h_coeffs.data(), static_cast<int>(h_coeffs.shape(1)), width};
    const Axis vy{v_bounds.data(), v_coeffs.data(), static_cast<int>(v_coeffs.shape(1)), height};
    const bool need_h = W != width, need_v = H != height;
    // Rows the vertical pass reads (Pillow resamples only those horizontally).
    const int first = vy.bounds[0], last = vy.bounds[2 * (height - 1)] + vy.bounds[2 * (height - 1) + 1];

    // An exception escaping a std::thread calls std::terminate (the interpreter aborts), so every worker
    // catches, records the first failure and stops the others; it is rethrown once all are joined and the
    // GIL is held again, where pybind11 turns it into a Python exception.
    std::exception_ptr failure;
    std::mutex failure_mutex;
    std::atomic<bool> failed{false};
    {
        py::gil_scoped_release release;
        const int workers = std::max(1, std::min(threads, T));
        std::atomic<int> next{0};
        auto work = [&] {
            Scratch scratch;
            std::vector<uint8_t> tmp, img;
            for (int f; !failed.load() && (f = next.fetch_add(1)) < T;) {
                const uint8_t* frame = src + static_cast<int64_t>(f) * H * W * 3;
                const uint8_t* result = frame;
                if (need_h && need_v) {
                    img.resize(static_cast<size_t>(height) * width * 3);
                    if (vertical_first) {
                        tmp.resize(static_cast<size_t>(height) * W * 3);
                        vertical(frame, W, 0, vy, scratch, tmp.data());
                        horizontal(tmp.data(), height, W, hx, scratch, img.data());
                    } else {
                        tmp.resize(static_cast<size_t>(last - first) * width * 3);
                        horizontal(frame + static_cast<int64_t>(first) * W * 3, last - first, W, hx, scratch,
                                   tmp.data());
                        vertical(tmp.data(), width, first, vy, scratch, img.data());
                    }
                    result = img.data();
                } else if (need_h) {
                    img.resize(static_cast<size_t>(height) * width * 3);
                    horizontal(frame, H, W, hx, scratch, img.data());
                    result = img.data();
                } else if (need_v) {
                    img.resize(static_cast<size_t>(height) * width * 3);
                    vertical(frame, width, 0, vy, scratch, img.data());
                    result = img.data();
                }
                scatter(result, height, width, table, f / kTemporal, f % kTemporal, dst);
                if (f == T - 1 && T % kTemporal)  // the processor repeats the last frame to fill the temporal patch
                    scatter(result, height, width, table, f / kTemporal, 1, dst);
            }
        };
        auto guarded = [&] {
            try {
                work();
            } catch (...) {
                std::lock_guard<std::mutex> lock(failure_mutex);
                if (!failure) failure = std::current_exception();
                failed.store(true);
            }
        };
        std::vector<std::thread> pool;
        pool.reserve(static_cast<size_t>(workers));
        for (int i = 1; i < workers; ++i) {
            try {
                pool.emplace_back(guarded);
            } catch (const std::system_error&) {
                break;  // no more threads to be had: the ones running (and this one) share the frames
            }
        }
        guarded();
        for (auto& th : pool) th.join();
    }
    if (failure) std::rethrow_exception(failure);
}

}  // namespace

void register_video(py::module_& m) {
    m.def("resize_normalize_patchify", &resize_normalize_patchify, py::arg("frames"), py::arg("height"),
          py::arg("width"), py::arg("lut"), py::arg("h_bounds"), py::arg("h_coeffs"), py::arg("v_bounds"),
          py::arg("v_coeffs"), py::arg("out"), py::arg("vertical_first") = false, py::arg("threads") = 4,
          "uint8 frames [T, H, W, 3] -> Qwen-VL pixel_values_videos written into `out` float32 [N, 1176]: "
          "Pillow-exact bicubic resize with the given tables, LUT normalization, patch layout; releases the GIL.");
}

}  // namespace wave_rt
