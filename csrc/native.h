// Registration hooks: each csrc/*.cpp file adds its functions to the one wave_rt._native module.
#pragma once
#include <pybind11/pybind11.h>

namespace wave_rt {
void register_video(pybind11::module_& m);
}  // namespace wave_rt
