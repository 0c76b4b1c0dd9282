"""Build script: the pybind11 extension in csrc/ and the kernels/ + export/ package mapping.

Metadata lives in pyproject.toml; this file only adds what needs code.
"""

from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError as exc:  # pragma: no cover - only hit when building without pybind11
    raise SystemExit(
        "building wave_rt needs pybind11 in the build environment: "
        "pip install -e .  (or, with --no-build-isolation, pip install pybind11 first)"
    ) from exc


def _packages() -> tuple[list[str], dict[str, str]]:
    """wave_rt/* as usual, plus kernels/ -> wave_rt.kernels and export/ -> wave_rt.export."""
    packages = ["wave_rt"] + [f"wave_rt.{p}" for p in find_packages("wave_rt")]
    package_dir = {"wave_rt": "wave_rt"}
    for top in ("kernels", "export"):
        packages.append(f"wave_rt.{top}")
        package_dir[f"wave_rt.{top}"] = top
        for sub in find_packages(top):
            packages.append(f"wave_rt.{top}.{sub}")
            package_dir[f"wave_rt.{top}.{sub}"] = os.path.join(top, *sub.split("."))
    return packages, package_dir


packages, package_dir = _packages()

native = Pybind11Extension(
    "wave_rt._native",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    # -O3 and native-width vector code for the host-side hot loops; no -march=native so
    # wheels stay portable across x86-64 machines.
    extra_compile_args=["-O3", "-fno-math-errno"],
)

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=[native],
    cmdclass={"build_ext": build_ext},
)
