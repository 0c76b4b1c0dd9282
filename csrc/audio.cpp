// Interleaved PCM -> mono float32 (first channel), the first step of every audio decode.
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include <pybind11/numpy.h>

#include "native.h"

namespace py = pybind11;

namespace wave_rt {
namespace {

// Below this many frames a second thread costs more than it saves.
constexpr int64_t kMinFramesPerThread = 1 << 16;

template <typename F>
void parallel_for(int64_t n, int threads, F&& body) {
    const int64_t want = std::max<int64_t>(1, std::min<int64_t>(threads, n / kMinFramesPerThread));
    if (want <= 1) {
        body(0, n);
        return;
    }
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(want));
    const int64_t step = (n + want - 1) / want;
    for (int64_t t = 0; t < want; ++t) {
        const int64_t lo = t * step, hi = std::min(n, lo + step);
        if (lo >= hi) break;
        pool.emplace_back([&body, lo, hi] { body(lo, hi); });
    }
    for (auto& th : pool) th.join();
}

py::array_t<float> pcm16_to_mono_float(
    py::array_t<int16_t, py::array::c_style | py::array::forcecast> pcm, int channels, int threads) {
    if (channels < 1) throw std::invalid_argument("channels must be >= 1");
    const auto total = static_cast<int64_t>(pcm.size());
    if (total % channels != 0)
        throw std::invalid_argument("sample count is not a multiple of the channel count");
    const int64_t frames = total / channels;
    py::array_t<float> out(frames);
    const int16_t* src = pcm.data();
    float* dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        // 1/32768 matches soundfile/PyAV's int16 -> float convention (full scale -> [-1, 1)).
        constexpr float kScale = 1.0f / 32768.0f;
        parallel_for(frames, threads, [=](int64_t lo, int64_t hi) {
            for (int64_t i = lo; i < hi; ++i) dst[i] = static_cast<float>(src[i * channels]) * kScale;
        });
    }
    return out;
}

}  // namespace

void register_audio(py::module_& m) {
    m.def("pcm16_to_mono_float", &pcm16_to_mono_float, py::arg("pcm"), py::arg("channels") = 1,
          py::arg("threads") = 4,
          "Interleaved int16 PCM -> float32 mono (first channel) scaled by 1/32768; releases the GIL.");
}

}  // namespace wave_rt
