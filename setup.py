"""Build script: the pybind11 extension in csrc/ and the kernels/ + export/ package mapping.

Metadata lives in pyproject.toml; this file only adds what needs code.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.errors import BaseError, CCompilerError

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

# Set to 1 (CI, wheel builds) to make a failed native build fail the install instead of falling back.
REQUIRE_NATIVE_ENV = "WAVE_RT_REQUIRE_NATIVE"
REQUIRE_NATIVE = os.environ.get(REQUIRE_NATIVE_ENV, "") not in ("", "0")


class OptionalBuildExt(build_ext):
    """pybind11's build_ext, except that a failed compile or link of wave_rt._native warns and lets the
    install go on: every native kernel has a torch implementation (wave_rt.media.features_video), which
    runs instead, slower. pip shows a build's output only with -v, so the warning is loud when it is seen."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, BaseError, OSError) as exc:
            if not ext.optional:
                raise
            bar = "*" * 78
            sys.stderr.write(
                f"\n{bar}\nWARNING: building the optional native extension {ext.name} failed:\n  {exc}\n"
                "wave_rt installs without it and preprocesses video on the CPU with its torch implementation\n"
                "(same results, slower). Install a C++17 compiler and the Python headers and reinstall to get\n"
                f"it; set {REQUIRE_NATIVE_ENV}=1 to make this failure an error.\n{bar}\n\n")
            self.warn(f"building optional extension {ext.name} failed: {exc}")


native = Pybind11Extension(
    "wave_rt._native",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    # -O3 and native-width vector code for the host-side hot loops; no -march=native so
    # wheels stay portable across x86-64 machines.
    extra_compile_args=["-O3", "-fno-math-errno"],
    # optional: setuptools then skips the missing file when it copies or lists the build's outputs
    optional=not REQUIRE_NATIVE,
)

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=[native],
    cmdclass={"build_ext": OptionalBuildExt},
)
