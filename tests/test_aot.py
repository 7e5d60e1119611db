"""Every Triton kernel, at the launch configurations its launcher picks, compiles for sm_90
and sm_80 with no register spills and shared memory within the device limit (no GPU needed:
Triton compiles ahead of time; cuobjdump reads the cubin); so does every CUDA C++ kernel of
csrc/ (nvcc -Xptxas -v), where nvcc is installed."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from ddpm_fast._aot import SHARED_LIMIT

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def aot():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot compile
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_fast._aot", "--json"], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reports(aot):
    return [r for r in aot["reports"] if r["source"] == "triton"]


def test_every_triton_kernel_of_the_package_is_recorded(aot):
    assert aot["unrecorded"] == []


def test_every_kernel_and_target_is_covered(reports):
    names = {r["name"].split("[")[0] for r in reports}
    assert {"q_sample", "posterior", "group_norm_silu_fwd", "group_norm_silu_bwd"} <= names
    assert {r["arch"] for r in reports} == {"sm_90", "sm_80"}
    assert any("phase1" in r["name"] for r in reports) and any("drawn" in r["name"] for r in reports)
    gn_paths = {r["name"].split("-")[-1].rstrip("]") for r in reports if r["name"].startswith("group_norm_silu_fwd[")}
    assert gn_paths == {"tile", "loop", "split"}  # every GroupNorm launch path


def test_no_spills_and_shared_memory_within_limits(reports):
    for r in reports:
        assert r["spill_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], r


def test_occupancy_and_roofline_are_reported(reports):
    for r in reports:
        assert 0 < r["occupancy"] <= 1, r
        assert r["bytes_moved"] > 0 and r["roofline_us"] > 0, r


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_kernels_compile_without_spills(aot):
    cuda = [r for r in aot["reports"] if r["source"] == "cuda"]
    assert aot["nvcc"] and {r["name"].split(":")[0] for r in cuda} == {"noising_cuda.cu", "posterior_cuda.cu"}
    assert {r["arch"] for r in cuda} == {"sm_90", "sm_80"}
    for r in cuda:
        assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255, r
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]] and r["occupancy"] > 0, r


def test_occupancy_calculation():
    from ddpm_fast._aot import occupancy

    assert occupancy("sm_90", 32, 0, 4) == 1.0  # 64 warps resident
    assert occupancy("sm_90", 255, 0, 8) == 0.125  # 256 regs/thread: one 8-warp block
    assert occupancy("sm_80", 64, 100 * 1024, 4) == 4 / 64  # shared memory: one block per SM


def test_attention_kernels_use_tensor_cores_in_low_precision(reports):
    attention = [r for r in reports if r["name"].startswith("attention_") and "float32" not in r["name"]]
    matmuls = [r for r in attention if not r["name"].startswith("attention_bwd_delta")]  # delta is a row sum
    assert matmuls and all(r["tensor_cores"] for r in matmuls), [r["name"] for r in matmuls if not r["tensor_cores"]]


def test_hot_kernels_are_recorded_at_head_dims_up_to_512(reports):
    head_dims = {int(r["name"].split("x")[3].split("-")[0]) for r in reports if r["name"].startswith("attention_fwd")}
    assert {256, 512} <= head_dims
