"""The shared benchmark harness: device, cases, roofline numbers, session metadata, results JSON.

Run with ``pytest benchmarks/ --benchmark-only``. Benchmarks run on CUDA when a GPU is present,
else on the CPU (``DDPM_FAST_BENCH_DEVICE=cpu`` forces the CPU). Without ``--benchmark-json``
the run writes ``benchmarks/results/<device-slug>-<date>.json``; a table of median time, GB/s,
% of copy bandwidth and TFLOP/s closes the terminal output.

A benchmark asks for the ``roofline`` fixture and hands it the callable and the bytes it must
move (and/or the FLOPs it does); ``roofline`` warms the callable up outside the timed region,
synchronizes CUDA inside it, and writes the roofline numbers into ``benchmark.extra_info``.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_benchmark
import torch

import ddpm_fast
from ddpm_fast.headline.measure import cpu_cores, cpu_model, steady_malloc

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def _bench_device() -> torch.device:
    requested = os.environ.get("DDPM_FAST_BENCH_DEVICE")
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICE = _bench_device()
ON_CUDA = DEVICE.type == "cuda"

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
# (shape, dtype name) cases of the elementwise ops: CIFAR batch (launch-bound on GPU), 256x256
# images, and on GPU a >= 100 MB tensor (64x3x512x512: 201 MB fp32, 101 MB bf16).
SHAPES = [(256, 3, 32, 32), (16, 3, 256, 256)] + ([(64, 3, 512, 512)] if ON_CUDA else [])
CASES = [(shape, dtype) for dtype in (("fp32", "bf16") if ON_CUDA else ("fp32",)) for shape in SHAPES]
# Per-benchmark time budget (pytest-benchmark's max_time) unless --benchmark-max-time is given.
DEFAULT_MAX_TIME = 0.1 if ON_CUDA else 0.5
# pytest-benchmark's own table, unless --benchmark-columns is given (the roofline table follows it).
DEFAULT_COLUMNS = ["min", "median", "iqr", "rounds"]
# Nominal dense peaks (not measured here): H100/H200 SXM tensor-core bf16/fp16, CUDA-core fp32.
NOMINAL_FLOPS = {
    "H100": {torch.bfloat16: 800e12, torch.float16: 800e12, torch.float32: 60e12},
    "H200": {torch.bfloat16: 800e12, torch.float16: 800e12, torch.float32: 60e12},
}


MALLOC = steady_malloc(DEVICE)  # glibc keeps freed memory: see ddpm_fast.headline.measure


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def kernel_backends() -> list[str]:
    """The fast backends that run on DEVICE here (never the Triton interpreter)."""
    available = ddpm_fast.backends()
    wanted = ("triton", "cuda") if ON_CUDA else ("cpp",)
    return [name for name in wanted if available[name][0]]


def op_cases(op: str, cases: list, variants, impls) -> list:
    """pytest params (impl, shape, dtype, variant) for every case x variant x implementation, with
    ids ``<impl>-<dtype>-<shape>-<variant>`` and one benchmark group per (op, shape, dtype, variant),
    so implementations of the same case are compared side by side."""
    return [
        pytest.param(
            impl,
            shape,
            dtype,
            variant,
            id=f"{impl}-{dtype}-{shape_id(shape)}-{variant}",
            marks=pytest.mark.benchmark(group=f"{op}-{shape_id(shape)}-{dtype}-{variant}"),
        )  # fmt: skip
        for shape, dtype in cases
        for variant in variants
        for impl in impls
    ]


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype, count: int) -> int:
    """Bytes moved by ``count`` full reads or writes of a ``shape`` tensor of ``dtype``."""
    numel = 1
    for d in shape:
        numel *= d
    return count * numel * torch.empty((), dtype=dtype).element_size()


def compile_fn(fn: Callable) -> Callable:
    """torch.compile(fn) with static shapes; a recompile limit hit raises instead of silently running eager."""
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    # One entry per (shape, dtype, layout, requires_grad) case of a benchmark file: more than the
    # default 8 (the GroupNorm file has 14 per dtype).
    if getattr(torch._dynamo.config, "recompile_limit", 64) < 64:
        torch._dynamo.config.recompile_limit = 64
    return torch.compile(fn, dynamic=False, fullgraph=True)


# ---------------------------------------------------------------- device facts and peaks
def cpu_name() -> str:
    return f"{cpu_model()} ({cpu_cores()} cores, {torch.get_num_threads()} torch threads)"


def device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if ON_CUDA else cpu_name()


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(DEVICE).lower()).strip("-") if ON_CUDA else "cpu"


def sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)


def _best_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def copy_gbps(nbytes: int | None = None) -> float:
    """GB/s of a torch ``copy_`` moving ``nbytes`` (read + write), best of a few; None = the peak
    measurement on a large buffer (256 MB on GPU, 64 MB on CPU, per side)."""
    side = (256 if ON_CUDA else 64) * 2**20 if nbytes is None else max(nbytes // 2, 4)
    src = torch.ones(side // 4, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    reps = 20 if ON_CUDA else 5
    if nbytes is not None:  # small copies: repeat until the loop is long enough to time
        reps = max(reps, min(1000, int(0.05 / max(_best_time(lambda: dst.copy_(src), 1), 1e-6))))
    return 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src), reps) / 1e9


@functools.cache
def peak_flops(dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, source): the nominal table on known GPUs, else a measured square matmul."""
    if ON_CUDA:
        name = torch.cuda.get_device_name(DEVICE)
        for key, table in NOMINAL_FLOPS.items():
            if key in name and dtype in table:
                return table[dtype], "nominal"
    n = 8192 if ON_CUDA else 1024
    a = torch.randn(n, n, device=DEVICE).to(dtype)
    b = torch.randn(n, n, device=DEVICE).to(dtype)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        seconds = _best_time(lambda: torch.matmul(a, b), 5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return 2 * n**3 / seconds, f"measured {n}x{n} matmul"


# ---------------------------------------------------------------- the roofline fixture
@pytest.fixture(scope="module")
def one_cpu_thread():
    """CPU: one torch thread for a module (pytestmark = pytest.mark.usefixtures("one_cpu_thread")).
    Its models are small, and two threads on cores shared with other processes made the times
    swing far more than the differences measured (both sides alike)."""
    if ON_CUDA:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def time_split(fn: Callable[[], object]) -> dict[str, float]:
    """One profiled call of fn on the CPU: milliseconds in convolutions (forward and backward)
    and in everything else, so a report can say where the non-convolution time goes (the
    profiler's own cost inflates both a little). Empty on CUDA (kernels run asynchronously)."""
    if ON_CUDA:
        return {}
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key)
    top = sorted((e for e in events if "conv" not in e.key), key=lambda e: -e.self_cpu_time_total)[:5]
    return {
        "conv_ms": conv / 1e3,
        "other_ms": (total - conv) / 1e3,
        "other_top": {e.key: round(e.self_cpu_time_total / 1e3, 2) for e in top},
    }


class Roofline:
    """Runs one benchmark and reports it against the device's bandwidth and FLOP/s peaks."""

    def __init__(self, benchmark):
        self.benchmark = benchmark

    def __call__(
        self,
        fn: Callable[[], object],
        *,
        bytes_moved: int = 0,
        flops: int = 0,
        flop_dtype: torch.dtype = torch.float32,
        warmup: int = 2,
    ) -> object:
        """Time ``fn()`` (warmed up ``warmup`` times first, which also compiles) and record
        median time, GB/s = bytes_moved / median, TFLOP/s = flops / median and % of peaks."""

        def timed():
            out = fn()
            sync()
            return out

        for _ in range(warmup):
            timed()
        result = self.benchmark(timed)
        if ON_CUDA and self.benchmark.stats is not None:
            # Each timed call above includes the Python call and a sync. Back-to-back calls let
            # the host run ahead of the GPU, so this time is the kernels' own where they are
            # longer than the host overhead (large tensors).
            runs = 20
            self.benchmark.extra_info["back_to_back_s"] = _best_time(lambda: [fn() for _ in range(runs)], 3) / runs
        self.record(bytes_moved, flops, flop_dtype)
        return result

    def record(self, bytes_moved: int, flops: int, flop_dtype: torch.dtype) -> None:
        stats = self.benchmark.stats
        if stats is None:  # --benchmark-disable: ran once, nothing timed
            return
        median = stats.stats.median
        info = self.benchmark.extra_info
        info["device"] = device_name()
        info["median_s"] = median
        if bytes_moved:
            gbps = bytes_moved / median / 1e9
            info.update(
                {
                    "bytes": bytes_moved,
                    "GB/s": gbps,
                    "copy_GB/s": copy_gbps(),
                    "% of copy": 100 * gbps / copy_gbps(),
                    "same_size_copy_GB/s": copy_gbps(bytes_moved),
                    "% of same-size copy": 100 * gbps / copy_gbps(bytes_moved),
                }
            )
            if "back_to_back_s" in info:
                b2b = bytes_moved / info["back_to_back_s"] / 1e9
                info.update({"GB/s back-to-back": b2b, "% of copy back-to-back": 100 * b2b / copy_gbps()})
        if flops:
            peak, source = peak_flops(flop_dtype)
            info.update(
                {
                    "flops": flops,
                    "TFLOP/s": flops / median / 1e12,
                    "peak_TFLOP/s": peak / 1e12,
                    "peak_source": f"{source} ({DTYPE_NAMES.get(flop_dtype, str(flop_dtype))})",
                    "% of peak FLOP/s": 100 * flops / median / peak,
                }
            )


@pytest.fixture
def roofline(benchmark) -> Roofline:
    return Roofline(benchmark)


# ---------------------------------------------------------------- session metadata and results
def git_commit() -> str:
    if os.environ.get("DDPM_FAST_COMMIT"):
        return os.environ["DDPM_FAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def session_info() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": str(DEVICE),
        "device_name": device_name(),
        "host_cpu": cpu_name(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "malloc": MALLOC,
        "backends": {name: list(value) for name, value in ddpm_fast.backends().items()},
    }


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["ddpm_fast"] = session_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    peaks = {"copy_GB/s": copy_gbps(), "copy_bytes": 2 * (256 if ON_CUDA else 64) * 2**20}
    output_json["ddpm_fast"] = {**session_info(), "peaks": peaks}
    if getattr(config, "_ddpm_fast_default_json", False):  # keep the stats, drop the per-round timings
        for bench in output_json["benchmarks"]:
            bench["stats"].pop("data", None)


def _benchmarks_run(config) -> bool:
    if config.getoption("collectonly", False):
        return False
    if config.getoption("benchmark_only", False):
        return True
    return not (config.getoption("benchmark_disable", False) or config.getoption("benchmark_skip", False))


def _passed(config, flag: str) -> bool:
    given = [str(a) for a in config.invocation_params.args] + os.environ.get("PYTEST_ADDOPTS", "").split()
    return any(a == flag or a.startswith(flag + "=") for a in given)


def pytest_configure(config):
    # inductor's CPU backend still goes through torch.jit internally
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    if not hasattr(config.option, "benchmark_json"):  # pytest-benchmark is not active (-p no:benchmark)
        return
    if not _passed(config, "--benchmark-max-time"):
        config.option.benchmark_max_time = DEFAULT_MAX_TIME
    if not _passed(config, "--benchmark-columns"):
        config.option.benchmark_columns = DEFAULT_COLUMNS
    if config.option.benchmark_json is None and _benchmarks_run(config):
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"{device_slug()}-{datetime.date.today().isoformat()}.json"
        # pytest-benchmark 5 takes a Path; 4.x an open binary file (argparse.FileType("wb"))
        target = path if int(pytest_benchmark.__version__.split(".")[0]) >= 5 else open(path, "wb")  # noqa: SIM115
        config.option.benchmark_json = target
        config._ddpm_fast_default_json = True
        session = getattr(config, "_benchmarksession", None)  # set up already when this conftest loads late
        if session is not None:
            session.json = target


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    runs = [b for b in (session.benchmarks if session else []) if b and b.stats and "median_s" in b.extra_info]
    if not runs:
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"roofline on {device_name()}")
    write(f"copy_ peak {copy_gbps():.1f} GB/s (measured this session); % of copy = GB/s / copy_ peak")
    name_width = max(len(b.name) for b in runs)
    header = (
        f"{'name':<{name_width}}  {'median':>9}  {'GB/s':>8}  {'% copy':>7}  {'%sz-copy':>8}  {'TFLOP/s':>8}"
        f"  {'b2b %copy':>9}"
    )
    for group in sorted({b.group or "" for b in runs}):
        write("")
        write(f"[{group or 'no group'}]")
        write(header)
        for b in sorted((b for b in runs if (b.group or "") == group), key=lambda b: b.extra_info["median_s"]):
            info = b.extra_info
            gbps, tflops = _fmt(info.get("GB/s"), ".2f"), _fmt(info.get("TFLOP/s"), ".3f")
            copy_pct = _fmt(info.get("% of copy"), ".1f", "%")
            size_pct = _fmt(info.get("% of same-size copy"), ".1f", "%")
            b2b_pct = _fmt(info.get("% of copy back-to-back"), ".1f", "%")
            write(
                f"{b.name:<{name_width}}  {_fmt_time(info['median_s']):>9}  {gbps:>8}  {copy_pct:>7}  {size_pct:>8}  "
                f"{tflops:>8}  {b2b_pct:>9}"
            )
    if session.json:
        write("")
        write(f"results JSON: {session.json if isinstance(session.json, Path) else session.json.name}")
