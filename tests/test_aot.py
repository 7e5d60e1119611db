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
import torch

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
    assert {"q_sample", "posterior", "solver_step", "group_norm_silu_fwd", "group_norm_silu_bwd"} <= names
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
    sources = {r["name"].split(":")[0] for r in cuda}
    assert aot["nvcc"] and sources == {
        "noising_cuda.cu",
        "posterior_cuda.cu",
        "solver_step_cuda.cu",
        "vlb_terms_cuda.cu",
    }
    vlb = {r["name"].split(":")[1].split("<")[0] for r in cuda if r["name"].startswith("vlb_terms_cuda.cu")}
    assert vlb == {"vlb_terms_fwd_kernel", "vlb_terms_sum_kernel", "vlb_terms_bwd_kernel"}, vlb
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


# ---------------------------------------------------------------- the launchers (kernels/launch.py)
def _launcher_cases(device: str = "cpu") -> tuple[dict, list[torch.Tensor]]:
    """({name: a call of a Triton launcher}, the outputs they write), small shapes."""
    from ddpm_fast.kernels.triton_attention import attention_bwd_triton, attention_fwd_triton
    from ddpm_fast.kernels.triton_groupnorm import group_norm_silu_bwd_triton, group_norm_silu_fwd_triton
    from ddpm_fast.kernels.triton_noising import q_sample_triton
    from ddpm_fast.kernels.triton_posterior import posterior_step_triton

    gen = torch.Generator().manual_seed(0)
    n, c, s = 2, 3, 20
    x, z = torch.randn(n, c, s, generator=gen).to(device), torch.randn(n, c, s, generator=gen).to(device)
    x_cl = torch.randn(n, s, c, generator=gen).to(device).transpose(1, 2)  # an NHWC view
    mo = torch.randn(2 * n, 2 * c, s, generator=gen).to(device)  # guided halves, learned variance
    t, seed = torch.tensor([3, 700], device=device), torch.tensor([5], device=device)
    table, prev_t = torch.linspace(0.99, 0.01, 1000, device=device), t - 1
    out = [torch.zeros(n, c, s, device=device) for _ in range(3)]
    out_cl = [torch.zeros_like(x_cl) for _ in range(3)]
    misaligned = torch.randn(n * c * s + 1, generator=gen).to(device)[1:].view(n, c, s)  # 4 bytes off a boundary
    flags = (0, 2, 4, 1, True, False)  # ddpm, v prediction, learned_range, clip, guided
    threshold = (0, 0, 0, 2, False, False)  # ddpm, eps, fixed_small, dynamic thresholding (phase 1: |x0|)
    gx, w = torch.randn(1, 8, 64, generator=gen).to(device), torch.rand(8, generator=gen).to(device) + 0.5
    out_gn = [torch.zeros_like(gx)]
    stats = (torch.zeros(1, 4, device=device), torch.zeros(1, 4, device=device))  # mean, rstd
    sums = (torch.zeros(1, 8, device=device), torch.zeros(1, 8, device=device))
    q = torch.randn(1, 2, 32, 64, generator=gen).to(device=device, dtype=torch.float16)
    out_at, lse = [torch.zeros_like(q) for _ in range(4)], torch.zeros(1, 2, 32, device=device)
    cases = {
        "q_sample-given": lambda: q_sample_triton(x, t, table, table, z, None, out[0], None, None, 0),
        "q_sample-drawn-v-nhwc": lambda: q_sample_triton(x_cl, t, table, table, None, seed, *out_cl, 3),
        "q_sample-misaligned": lambda: q_sample_triton(misaligned, t, table, table, z, None, out[1], None, None, 0),
        "posterior-guided-learned": lambda: posterior_step_triton(
            mo, x, t, prev_t, table, None, seed, None, out[0], out[1], None, 1.0, 3.0, 1.0, 0.0, *flags
        ),
        "posterior-phase1-nhwc": lambda: posterior_step_triton(
            x_cl, x_cl, t, prev_t, table, z, None, None, out[0], None, out[2], 1.0, 1.0, 1.0, 0.0, *threshold
        ),
        # several kernels a call: GroupNorm's split path (N * G < 2 x SMs), attention's backward
        "group_norm_silu-split-fwd": lambda: group_norm_silu_fwd_triton(
            gx, w, w, None, None, None, None, 4, 1e-5, True, out_gn[0], *stats, sms=132
        ),
        "group_norm_silu-split-bwd": lambda: group_norm_silu_bwd_triton(
            gx, gx, w, w, None, None, None, *stats, 4, True, out_gn[0], *sums, None, sms=132
        ),
        "attention-fwd": lambda: attention_fwd_triton(q, q, q, out_at[0], lse, 0.125),
        "attention-bwd": lambda: attention_bwd_triton(q, q, q, q, q, lse, *out_at[1:], 0.125),
    }
    return cases, out + out_cl + out_gn + list(stats) + list(sums) + out_at + [lse]


def _cached_launch_report() -> dict:
    """Each launcher case three times through ddpm_fast._aot.StandInDriver (the JIT compiles for
    sm_90, the launcher records): once with the cached launch off, twice with it on. Per case: its
    kernel launches a call, the JIT runs of the two cached calls, and whether all three passed the
    compiled kernels' launcher the same arguments (tensors by dtype, shape and strides; the launch
    metadata, a fresh object per call, aside)."""
    from triton.runtime.jit import JITFunction

    from ddpm_fast._aot import StandInDriver
    from ddpm_fast.kernels import launch

    runs = [0]
    jit_run = JITFunction.run

    def counted(self, *args, **kwargs):
        runs[0] += 1
        return jit_run(self, *args, **kwargs)

    def launched(call) -> tuple:
        driver.launches.clear()
        call()
        return tuple(
            tuple(
                (a.dtype, a.shape, a.stride()) if isinstance(a, torch.Tensor) else a
                for i, a in enumerate(args)
                if i != 6
            )
            for args in driver.launches
        )

    JITFunction.run = counted
    report = {}
    with StandInDriver(keep=64) as driver:
        for name, call in _launcher_cases()[0].items():
            launch.CACHED_LAUNCH = False
            plain = launched(call)
            launch.CACHED_LAUNCH = True
            jit_runs, seen = [], []
            for _ in range(2):
                before = runs[0]
                seen.append(launched(call))
                jit_runs.append(runs[0] - before)
            report[name] = {"launches": len(plain), "jit_runs": jit_runs, "same_args": seen[0] == plain == seen[1]}
    return report


@pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-in driver is for hosts without a GPU")
def test_cached_launch_passes_what_the_jit_passes():
    """kernels.launch's cached path calls the compiled kernel's launcher with exactly the arguments
    JITFunction.run gives it, and skips the JIT from the second call on; a pointer off a 16-byte
    boundary takes the JIT every time (Triton specialises on alignment)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = "import json, test_aot; print(json.dumps(test_aot._cached_launch_report()))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=os.path.dirname(__file__),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == set(_launcher_cases()[0])
    for name, case in report.items():
        assert case["same_args"], name
        calls = case["launches"]
        assert case["jit_runs"] == ([calls, calls] if name.endswith("misaligned") else [calls, 0]), (name, case)
    assert report["group_norm_silu-split-bwd"]["launches"] == 2 and report["attention-bwd"]["launches"] == 3


def test_launchers_read_and_write_any_layout(schedule_table):
    """Under the interpreter: outputs in a layout the kernels do not index (a permuted view) get
    the same values as contiguous ones, through a temporary and a copy (launch.Operands); an
    NHWC input next to NCHW outputs is read in place."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels under the interpreter (the GPU tests cover them on CUDA)")
    from ddpm_fast.kernels.launch import NCHW, NHWC, layout_of
    from ddpm_fast.kernels.triton_noising import q_sample_triton

    gen = torch.Generator().manual_seed(1)
    n, c, s = 2, 3, 10
    x0, noise = torch.randn(n, c, s, generator=gen), torch.randn(n, c, s, generator=gen)
    t = torch.tensor([10, 900])
    want = torch.empty(n, c, s)
    q_sample_triton(x0, t, *schedule_table, noise, None, want, None, None, 0)
    permuted = torch.empty(c, n, s).transpose(0, 1)  # dense, (N, C, S) strides (s, n s, 1)
    nhwc = x0.transpose(1, 2).contiguous().transpose(1, 2)
    assert layout_of(permuted) is None and layout_of(nhwc) == NHWC and layout_of(x0) == NCHW
    q_sample_triton(nhwc, t, *schedule_table, noise, None, permuted, None, None, 0)
    assert torch.equal(permuted, want)


@pytest.fixture
def schedule_table():
    from ddpm_fast import Schedule

    schedule = Schedule.from_config()
    return schedule.kernel_table("sqrt_alphas_cumprod"), schedule.kernel_table("sqrt_one_minus_alphas_cumprod")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launches on a GPU")
def test_cached_launch_on_the_gpu():
    """On CUDA: the launcher cases write the same bits through the cached launch (its first and
    later calls) as through the JIT."""
    from ddpm_fast.kernels import launch

    def run() -> list[torch.Tensor]:
        cases, outputs = _launcher_cases("cuda")
        results = []
        for call in cases.values():
            call()
            results += [o.clone() for o in outputs]
        return results

    cached = launch.CACHED_LAUNCH
    try:
        launch.CACHED_LAUNCH = False
        want = run()
        launch.CACHED_LAUNCH = True
        for _ in range(2):
            assert all(torch.equal(a, b) for a, b in zip(run(), want, strict=True))
    finally:
        launch.CACHED_LAUNCH = cached
