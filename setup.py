"""Builds ddpm_fast._C with CMake + Ninja against the torch installed in this environment.

Environment variables:
  DDPM_FAST_BUILD_EXT=0    install without compiling anything (pure-Python reference fallback)
  DDPM_FAST_BUILD_CUDA=0|1 force the CUDA kernels off or on (default: on when torch has CUDA
                           and nvcc is found)
  DDPM_FAST_CUDA_ARCH      CMAKE_CUDA_ARCHITECTURES (default "80;90")
  DDPM_FAST_BUILD_JOBS     parallel compile jobs
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

ISOLATION_HELP = (
    "ddpm_fast builds its C++/CUDA extension against the torch that will run it, so it must see "
    "that torch at build time. Install torch first, then build without isolation:\n"
    "    pip install torch==2.13.0 cmake ninja pybind11 setuptools wheel\n"
    '    pip install --no-build-isolation -e ".[test]"\n'
    "(or set DDPM_FAST_BUILD_EXT=0 to install the pure-Python fallback only)."
)


def _import_torch():
    try:
        import torch
    except ImportError:
        sys.exit(f"error: torch is not importable in the build environment.\n{ISOLATION_HELP}")
    if "pip-build-env" in torch.__file__ or "build-env" in Path(torch.__file__).parts[-4:-1]:
        sys.exit(f"error: torch was found in pip's isolated build environment ({torch.__file__}).\n{ISOLATION_HELP}")
    return torch


def _want_cuda(torch) -> tuple[bool, str]:
    flag = os.environ.get("DDPM_FAST_BUILD_CUDA", "").strip()
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (CUDA_HOME and str(Path(CUDA_HOME, "bin", "nvcc")))
    have_nvcc = bool(nvcc) and Path(nvcc).exists()
    if flag == "0":
        return False, "DDPM_FAST_BUILD_CUDA=0"
    if flag == "1":
        if torch.version.cuda is None or not have_nvcc:
            sys.exit(
                "error: DDPM_FAST_BUILD_CUDA=1 but "
                + (
                    "this torch has no CUDA (torch.version.cuda is None)"
                    if torch.version.cuda is None
                    else "nvcc was not found"
                )
            )
        return True, "forced by DDPM_FAST_BUILD_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    if not have_nvcc:
        return False, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is at {nvcc}"


def _abi_args(torch) -> list[str]:
    """Build with the std::string ABI of the torch that runs the extension. A mismatch is silent
    until a std::string crosses into torch: a TORCH_CHECK with a formatted message then
    segfaulted (seen with a GPU machine's torch 2.11) instead of raising."""
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    return [] if abi is None else [f"-DCMAKE_CXX_FLAGS=-D_GLIBCXX_USE_CXX11_ABI={int(abi)}"]


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        torch = _import_torch()
        import pybind11

        with_cuda, why = _want_cuda(torch)
        print(f"ddpm_fast: CUDA kernels {'ON' if with_cuda else 'skipped'}: {why}", flush=True)

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp, "cmake").resolve()
        build_temp.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake") or sys.exit("error: cmake not found: pip install cmake")
        ninja = shutil.which("ninja") or sys.exit("error: ninja not found: pip install ninja")
        args = [
            cmake,
            str(ROOT),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DDDPM_FAST_TORCH_VERSION={torch.__version__}",
            *_abi_args(torch),
            f"-DDDPM_FAST_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('DDPM_FAST_CUDA_ARCH', '80;90')}")
        jobs = os.environ.get("DDPM_FAST_BUILD_JOBS", str(os.cpu_count() or 1))
        try:
            subprocess.run(args, cwd=build_temp, check=True)
            subprocess.run([cmake, "--build", ".", "-j", jobs], cwd=build_temp, check=True)
        except subprocess.CalledProcessError as err:
            hint = (
                " The CUDA kernels failed to build: retry with DDPM_FAST_BUILD_CUDA=0 for CPU kernels only."
                if with_cuda
                else ""
            )
            raise RuntimeError(f"ddpm_fast: building the extension failed ({err}).{hint}") from err
        info = {"torch_version": torch.__version__, "with_cuda": with_cuda, "cuda_reason": why}
        # Beside the .so (and in the source tree too, where an editable install imports from).
        for folder in {extdir, ROOT / "ddpm_fast"}:
            (folder / "_C_build_info.json").write_text(json.dumps(info, indent=1))


build_ext_enabled = os.environ.get("DDPM_FAST_BUILD_EXT", "1") != "0"
if not build_ext_enabled:
    print("ddpm_fast: DDPM_FAST_BUILD_EXT=0, installing without compiled kernels", flush=True)

setup(
    ext_modules=[CMakeExtension("ddpm_fast._C")] if build_ext_enabled else [],
    cmdclass={"build_ext": CMakeBuild},
    package_data={"ddpm_fast": ["_C_build_info.json"]},
)
