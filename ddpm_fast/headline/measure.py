"""What the headline run measures with: device facts, versions, commit, peaks and timers.

Timing: warm-up calls first (compilation, cuDNN choices, CUDA-graph capture), then ``repeats``
timed runs, each of ``inner`` back-to-back calls, and the median per call. On CUDA each run is
timed with CUDA events on the current stream (the stream's time from the first launch to the end
of the last kernel, host launch gaps included) and the end event is waited for; on the CPU with
``time.perf_counter``.

Peaks: the FLOP/s peak is the datasheet's dense bf16/fp16 tensor-core figure of known GPUs (no
sparsity), nothing on the CPU (no defensible figure: the row's % of peak is left out). The copy
bandwidth is measured in the same run: a ``copy_`` of a large buffer, bytes read + written.
"""

from __future__ import annotations

import importlib
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peaks from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name in this order (the first substring found wins).
NOMINAL_BF16_FLOPS = (
    ("H100 PCIe", 756e12, "H100 PCIe datasheet, dense bf16"),
    ("H100 NVL", 835e12, "H100 NVL datasheet, dense bf16"),
    ("H100", 989.4e12, "H100 SXM datasheet, dense bf16"),
    ("H200", 989.4e12, "H200 SXM datasheet, dense bf16 (the H100 SXM's compute)"),
    ("A100", 312e12, "A100 datasheet, dense bf16"),
)
# Short device names for file names, matched in this order against the lower-case GPU name.
DEVICE_SLUGS = ("h200", "h100", "a100", "l40s", "l4", "a10g", "v100", "t4")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({cpu_cores()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """'cpu', or a short GPU name ('h100', 'h200', ...), else the GPU name made file-safe."""
    if device.type != "cuda":
        return device.type
    return slug_of(torch.cuda.get_device_name(device))


def slug_of(gpu_name: str) -> str:
    lower = gpu_name.lower()
    for slug in DEVICE_SLUGS:
        if re.search(rf"(?<![a-z0-9]){slug}(?![a-z0-9])", lower):
            return slug
    return re.sub(r"[^a-z0-9]+", "-", lower).strip("-") or "gpu"


def nominal_peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 FLOP/s, source) for a known GPU; (None, why) elsewhere."""
    if device.type != "cuda":
        return None, "no defensible peak FLOP/s for a CPU: % of peak left out"
    name = torch.cuda.get_device_name(device)
    for key, flops, source in NOMINAL_BF16_FLOPS:
        if key in name:
            return flops, source
    return None, f"no datasheet peak known for {name}: % of peak left out"


def optional_import(name: str) -> tuple[ModuleType | None, str]:
    """(module, '') or (None, why it is missing). Any import error counts as missing."""
    try:
        return importlib.import_module(name), ""
    except Exception as err:  # noqa: BLE001 (a broken optional install is reported, not raised)
        return None, f"`import {name}` failed ({type(err).__name__}: {err})"


def versions() -> dict[str, str | None]:
    """Versions of what ran. An optional package counts as used if imported (None if its import
    was blocked), else as installed (its metadata), else None."""
    from importlib.metadata import PackageNotFoundError, version

    import ddpm_fast

    found: dict[str, str | None] = {}
    for name in ("triton", "diffusers", "liger_kernel"):
        if name in sys.modules:
            module = sys.modules[name]
            found[name] = None if module is None else getattr(module, "__version__", "unknown")
            continue
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "ddpm_fast": ddpm_fast.__version__,
        **found,
    }


def git_commit(root: Path) -> dict[str, object]:
    """{'commit', 'source', 'dirty'}: ``git rev-parse HEAD`` in ``root``; where that fails (no
    .git, as on the GPU machines), the DDPM_FAST_COMMIT environment variable; else 'unknown'."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head and head.strip():
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.strip(), "source": "git rev-parse HEAD", "dirty": bool(status and status.strip())}
    env = os.environ.get("DDPM_FAST_COMMIT", "").strip()
    if env:
        return {"commit": env, "source": "DDPM_FAST_COMMIT", "dirty": None}
    return {"commit": "unknown", "source": "no git checkout and no DDPM_FAST_COMMIT", "dirty": None}


def steady_malloc(device: torch.device) -> str:
    """On the CPU, keep freed memory for reuse, as a long-running loop's heap does (glibc: no
    mmap below 32 MiB, no trimming), as benchmarks/conftest.py does: with glibc's defaults each
    fresh multi-MB output is mmapped and page-faulted in, and the same eager call swings 2-20x with
    the malloc history. Applies to every implementation alike, for the rest of the process.
    DDPM_FAST_BENCH_MALLOC=default keeps glibc's defaults. Returns what was set."""
    if device.type != "cpu" or os.environ.get("DDPM_FAST_BENCH_MALLOC") == "default":
        return "default"
    if platform.libc_ver()[0] != "glibc":
        return "default"
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30):
        return "glibc mmap_threshold=32MiB trim_threshold=1GiB"
    return "default"


# ---------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call: the median of ``runs`` (each the mean over its ``inner`` calls)."""

    median: float
    runs: list[float]
    inner: int
    warmup_s: float

    def to_dict(self) -> dict[str, object]:
        return {"median_s": self.median, "runs_s": self.runs, "inner": self.inner, "warmup_s": self.warmup_s}


def measure(
    fn: Callable[[], object], device: torch.device, *, repeats: int = 3, warmup: int = 1, inner: int = 1
) -> Timing:
    """Time ``fn``: ``warmup`` untimed calls, then ``repeats`` runs of ``inner`` calls each."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    warmup_s = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            runs.append(begin.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            runs.append((time.perf_counter() - t0) / inner)
    return Timing(statistics.median(runs), runs, inner, warmup_s)


def copy_bandwidth(device: torch.device) -> tuple[float, int]:
    """(GB/s, bytes moved per copy) of ``dst.copy_(src)`` on a 256 MiB (GPU) or 64 MiB (CPU)
    fp32 buffer, bytes read + written, best of several."""
    side = (256 if device.type == "cuda" else 64) * 2**20
    src = torch.ones(side // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, repeats=10 if device.type == "cuda" else 5, warmup=2)
    moved = 2 * side
    return moved / min(timing.runs) / 1e9, moved


def matmul_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """FLOP/s of one square matmul in ``dtype`` measured here (best of a few): a practical
    ceiling beside the datasheet's, recorded in the JSON."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    timing = measure(lambda: torch.matmul(a, b), device, repeats=5, warmup=2)
    return 2 * n**3 / min(timing.runs), f"{n}x{n} {str(dtype).removeprefix('torch.')} matmul (best of 5)"
