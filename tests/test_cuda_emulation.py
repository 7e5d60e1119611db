"""The CUDA C++ elementwise kernels, run on the CPU: csrc/noising_cuda.cu and posterior_cuda.cu
compiled with g++ against stand-in CUDA headers (tests/cuda_emulation/), each launch stepped
one thread at a time. GPUs are rare on the machines this project is built on; this checks the
kernels' indexing (which elements each thread takes, the in-kernel noise lanes) everywhere.
The math libraries and fp16/bf16 rounding are the host's, so values are compared against the
kernels' own other paths (drawn vs given noise), not against a GPU."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
LAUNCH = re.compile(r"(\w+<[^<>]*>)<<<([^,]+), (\w+), 0, stream>>>\(([^;]*)\);")


def rewrite_launches(source: str) -> str:
    """kernel<<<blocks, threads, 0, stream>>>(args); -> emulate_launch(blocks, threads, [&] { kernel(args); });"""
    rewritten, count = LAUNCH.subn(r"emulate_launch(\2, \3, [&] { \1(\4); });", source)
    assert count == 1, f"expected one kernel launch, found {count}"
    return rewritten


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cuda_kernels_emulated_on_cpu(tmp_path):
    sources = []
    for name in ("noising_cuda.cu", "posterior_cuda.cu"):
        out = tmp_path / name.replace(".cu", ".cpp")
        out.write_text(rewrite_launches((ROOT / "csrc" / name).read_text()))
        sources.append(str(out))
    binary = tmp_path / "emulated"
    command = [
        "g++",
        "-std=c++17",
        "-O1",
        "-D__CUDA_ARCH__=900",  # the kernels' device branches (sincosf, __umulhi)
        f"-I{EMULATION}",
        f"-I{ROOT / 'csrc'}",
        "-include",
        "emulate.h",
        *sources,
        str(EMULATION / "harness.cpp"),
        "-o",
        str(binary),
    ]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "all match" in run.stdout, run.stdout + run.stderr
