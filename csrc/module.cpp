// wave_rt._native: host-side hot paths. Every function here releases the GIL and has a
// Python reference plus a benchmark row that justifies it (see bench/).
#include "native.h"

PYBIND11_MODULE(_native, m) {
    m.doc() = "wave_rt native host-side kernels (pybind11)";
    wave_rt::register_video(m);
}
