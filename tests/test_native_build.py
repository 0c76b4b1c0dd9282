"""The native extension (csrc/, setup.py) builds beyond x86, and a machine that cannot build it still installs
wave_rt: the extension is optional, its torch implementation takes over (tests/media covers that fallback)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc").glob("*.cpp"))


def _includes() -> list[str]:
    import pybind11

    return [f"-I{ROOT / 'csrc'}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_sources_compile_for_aarch64(source, tmp_path):
    # target_clones("avx2", ...) is an x86-only attribute: aarch64 g++ refused the whole file.
    cxx = shutil.which("aarch64-linux-gnu-g++")
    if cxx is None:
        pytest.skip("aarch64-linux-gnu-g++ (the cross compiler) is not installed on this machine")
    # -O0: the attribute is refused at any level, and the test stays quick
    r = subprocess.run([cxx, "-std=c++17", "-O0", "-c", str(source), "-o", str(tmp_path / "x.o"), *_includes()],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_x86_still_gets_the_avx2_clones():
    # The aarch64 guard must not switch multiversioning off where it belongs.
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        pytest.skip(f"multiversioning is x86-only; this machine is {platform.machine()}")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++ / c++) on this machine")
    r = subprocess.run([cxx, "-std=c++17", "-E", str(ROOT / "csrc" / "video.cpp"), *_includes()],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('target_clones("avx2", "default")') == 2


def _build_tree(tmp_path: Path) -> Path:
    """What setup.py needs to build: its metadata, csrc/ and the (here empty) package folders it maps."""
    tree = tmp_path / "repo"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    for package in ("wave_rt", "kernels", "export"):
        (tree / package).mkdir()
        (tree / package / "__init__.py").write_text("")
    return tree


def _failing_compiler_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WAVE_RT_REQUIRE_NATIVE"}
    env.update(CC="false", CXX="false", **extra)
    return env


def test_failed_native_build_warns_and_build_ext_completes(tmp_path):
    tree = _build_tree(tmp_path)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=_failing_compiler_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "WARNING: building the optional native extension wave_rt._native failed" in r.stderr
    assert "torch implementation" in r.stderr
    assert not list((tree / "wave_rt").glob("_native*"))


def test_failed_native_build_still_makes_a_wheel(tmp_path):
    # What `pip install` runs: the wheel must come out without the extension.
    tree = _build_tree(tmp_path)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-w",
           str(tmp_path / "dist"), str(tree)]
    r = subprocess.run(cmd, env=_failing_compiler_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert len(list((tmp_path / "dist").glob("*.whl"))) == 1


def test_require_native_makes_a_failed_build_an_error(tmp_path):
    tree = _build_tree(tmp_path)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                       env=_failing_compiler_env(WAVE_RT_REQUIRE_NATIVE="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
