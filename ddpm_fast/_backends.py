"""What can run here, and the one place that chooses a backend for an op.

Backends: ``reference`` (plain PyTorch, always), ``cpp`` (the C++ CPU kernels of _C),
``cuda`` (the CUDA kernels of _C), ``triton`` (Triton kernels: on CUDA tensors, or on CPU
tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton")
_PACKAGE_DIR = Path(__file__).resolve().parent


def _built_torch_version() -> str | None:
    info = _PACKAGE_DIR / "_C_build_info.json"
    if not info.exists():
        return None
    return json.loads(info.read_text()).get("torch_version")


@cache
def load_extension():
    """Import ddpm_fast._C once: the module, or None (with one warning) when it is missing.

    An extension built against another torch raises ImportError naming both versions.
    """
    built = _built_torch_version()
    if built is not None and built != torch.__version__:
        raise ImportError(
            f"ddpm_fast._C was built against torch {built} but torch {torch.__version__} is installed: "
            "rebuild it with `pip install --no-build-isolation -e .` (or DDPM_FAST_BUILD_EXT=0 for no kernels)"
        )
    try:
        from . import _C
    except ImportError as err:
        warnings.warn(
            f"ddpm_fast._C is not available ({err}); falling back to the PyTorch reference. "
            "Build it with `pip install --no-build-isolation -e .`",
            stacklevel=3,
        )
        return None
    if _C.torch_version != torch.__version__:
        raise ImportError(
            f"ddpm_fast._C was built against torch {_C.torch_version} but torch {torch.__version__} is installed: "
            "rebuild it with `pip install --no-build-isolation -e .`"
        )
    return _C


def reset_caches() -> None:
    """Forget what was found (extension, availability, choices): for tests that fake a machine."""
    for cached in (load_extension, _backends, _select_backend):
        cached.cache_clear()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def backends() -> dict[str, tuple[bool, str]]:
    """{name: (available, reason)} for every backend on this machine."""
    return dict(_backends(triton_interpreting()))


@cache
def _backends(interpreting: bool) -> dict[str, tuple[bool, str]]:
    ext = load_extension()
    cuda_ok = torch.cuda.is_available()
    result = {"reference": (True, "plain PyTorch, always available")}
    result["cpp"] = (
        ext is not None,
        f"ddpm_fast._C is loaded ({cpu_isa()} kernels)" if ext is not None else "ddpm_fast._C is not built",
    )
    if ext is None:
        result["cuda"] = (False, "ddpm_fast._C is not built")
    elif not ext.with_cuda:
        result["cuda"] = (False, "ddpm_fast._C was built without CUDA kernels")
    elif not cuda_ok:
        result["cuda"] = (False, "no CUDA device is available")
    else:
        result["cuda"] = (True, f"CUDA kernels on {torch.cuda.get_device_name()}")
    if not _triton_importable():
        result["triton"] = (False, "triton is not installed")
    elif cuda_ok:
        result["triton"] = (True, "Triton kernels on CUDA tensors")
    elif interpreting:
        result["triton"] = (True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)")
    else:
        result["triton"] = (False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)")
    return result


CPU_ISAS = ("avx512", "avx2", "base")


def cpu_isa() -> str:
    """The vector ISA the C++ CPU kernels run: avx512, avx2 or base (x86-64 without AVX2, or
    another architecture). The best the CPU has, capped by the environment variable
    ``DDPM_FAST_CPU_ISA`` (read at start-up) or by ``use_cpu_isa``."""
    ext = load_extension()
    return ext.cpu_isa()[0] if ext is not None else "base"


def cpu_isas() -> list[str]:
    """Every ISA build of the C++ CPU kernels that this CPU can run, best first."""
    ext = load_extension()
    detected = ext.cpu_isa()[1] if ext is not None else "base"
    return list(CPU_ISAS[CPU_ISAS.index(detected) :])


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Run the C++ CPU kernels' ``name`` build inside the block (one of ``cpu_isas()``): the
    self-check and the tests run each build the machine has, not only the best."""
    if name not in cpu_isas():
        raise ValueError(f"this CPU cannot run the {name!r} kernels; it runs {', '.join(cpu_isas())}")
    ext = load_extension()
    previous = ext.set_cpu_isa(name)
    try:
        yield
    finally:
        ext.set_cpu_isa(previous)


# Default order per device type, fastest first (from benchmarks/results on each device).
_DEFAULT_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}


@torch.compiler.assume_constant_result  # a fact of this process: compiled graphs embed the choice
def select_backend(requested: str | None, device: torch.device) -> str:
    """The backend that runs an op on ``device``: ``requested`` if it can, else an error."""
    # Only a requested 'triton' on CPU depends on the interpreter flag; reading the environment
    # costs more than the rest of the choice, so other calls skip it.
    interpreting = requested == "triton" and triton_interpreting()
    return _select_backend(requested, device.type, interpreting)


@cache
def _select_backend(requested: str | None, device_type: str, interpreting: bool) -> str:
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; valid: {', '.join(BACKENDS)}")
    available = _backends(interpreting)
    if requested is None:
        for name in _DEFAULT_ORDER.get(device_type, ("reference",)):
            if available[name][0]:
                return name
        return "reference"
    ok, reason = available[requested]
    if not ok:
        raise RuntimeError(f"backend {requested!r} is not available here: {reason}")
    if requested == "cpp" and device_type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, got a {device_type} tensor")
    if requested == "cuda" and device_type != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors, got a {device_type} tensor")
    if requested == "triton" and device_type not in ("cuda", "cpu"):
        raise ValueError(f"backend 'triton' runs on CUDA tensors, got a {device_type} tensor")
    if requested == "triton" and device_type == "cpu" and not interpreting:
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    return requested


# The CPU features oneDNN runs bf16 convolutions and matmuls on: AMX tiles (Intel Sapphire Rapids
# and later) or AVX512-BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of /proc/cpuinfo's text (Linux; x86 "flags", Arm "Features")."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def bf16_units(cpuinfo: str) -> tuple[str, ...]:
    """The BF16_CPU_FLAGS that /proc/cpuinfo's text lists (whole words of its flags line)."""
    flags = cpu_flags(cpuinfo)
    return tuple(flag for flag in BF16_CPU_FLAGS if flag in flags)


@cache
def cpu_bf16_units() -> tuple[str, ...]:
    """This CPU's bf16 matrix or dot-product units (BF16_CPU_FLAGS). There bf16 autocast pays: the
    cifar10 U-Net forward at batch 8 ran 136 vs 331 ms (fp32) on a 2-core Xeon with AMX (issue 21),
    299 vs 522 ms on a 2-core AMD EPYC Zen 4 with AVX512-BF16
    (benchmarks/results/cpu-2026-12-05b-unet-autocast.json), so sample() autocasts by default."""
    try:
        return bf16_units(Path("/proc/cpuinfo").read_text())
    except OSError:
        return ()


def cpu_has_bf16_units() -> bool:
    """The CPU has at least one of BF16_CPU_FLAGS' units."""
    return bool(cpu_bf16_units())


def cpu_bf16_autocast_default() -> bool:
    """Whether sample() autocasts to bf16 on the CPU by default: where the CPU has bf16 units, unless
    DDPM_FAST_CPU_BF16=0 (or =1 to force it; the test suite sets 0 for itself and its subprocesses)."""
    setting = os.environ.get("DDPM_FAST_CPU_BF16", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return cpu_has_bf16_units()


# ---------------------------------------------------------------- per-op choice
# Every default below comes from benchmarks/results on each device; this is the one place that
# decides which backend runs an op (the ops, the sampler and the U-Net all ask `choose`).

# The backends each op has (attention has no C++ kernel: "sdpa" is torch's own).
OP_BACKENDS = {
    "q_sample": ("reference", "cpp", "cuda", "triton"),
    "posterior_step": ("reference", "cpp", "cuda", "triton"),
    "solver_step": ("reference", "cpp", "cuda", "triton"),
    "group_norm_silu": ("reference", "cpp", "triton"),
    "vlb_terms": ("reference", "cpp", "cuda", "triton"),
    "attention": ("triton", "sdpa", "reference"),
}

# On CUDA, the elementwise ops (q_sample, posterior_step) below this many elements are bound by
# their launch: a call of the CUDA C++ kernels costs ~40-60 us, of Triton's Python launcher
# ~140-180 us (H100, torch 2.11, triton 3.6: benchmarks/results/h100-2026-11-26-*.json), while
# at 50M elements Triton's kernels run at ~100% of copy bandwidth and the CUDA C++ ones at 55-70%.
# vlb_terms takes the same switch (its CUDA C++ kernels: two launches forward, one backward), by
# analogy: not yet measured on a GPU.
ELEMENTWISE_CUDA_CPP_BELOW = 1 << 24
# Attention: up to this head_dim SDPA's fused CUDA kernels (flash, memory-efficient) run; beyond, Triton.
SDPA_MAX_HEAD_DIM = 256
# On CPU, heads this wide take the plain reference when gradients are needed, and wider ones
# always (benchmarks/results/cpu-2026-12-04-attention.json: SDPA's CPU kernel loses there).
CPU_PLAIN_HEAD_DIM = 256


@torch.compiler.assume_constant_result
def _cuda_cpp_available() -> bool:
    return _backends(False)["cuda"][0]


@torch.compiler.assume_constant_result
def _triton_runs_on(device: torch.device) -> bool:
    """The Triton kernels run on this device (CUDA; CPU tensors only under TRITON_INTERPRET=1)."""
    try:
        select_backend("triton", device)
    except (RuntimeError, ValueError):
        return False
    return True


def choose(
    op: str,
    requested: str | None,
    device: torch.device,
    *,
    numel: int = 0,
    dtype: torch.dtype | None = None,
    head_dim: int = 0,
    needs_grad: bool = False,
    launch_bound: bool = True,
) -> str:
    """The backend that runs ``op`` on ``device``: ``requested`` when it can (else a clear error),
    or by default the fastest measured for this call's size (``numel``), ``dtype``, attention's
    ``head_dim`` and whether gradients are needed. ``launch_bound=False`` where launches cost
    nothing (a replayed CUDA graph): then the size does not matter, the kernel's speed does."""
    valid = OP_BACKENDS[op]
    if requested is not None and requested not in valid:
        if op == "attention" and requested in ("cpp", "cuda"):
            hint = " (attention has no C++ kernel; SDPA is torch's own)"
        elif op == "group_norm_silu" and requested == "cuda":
            hint = " (no CUDA C++ kernel: use backend='triton', or 'reference', on CUDA)"
        else:
            hint = ""
        raise ValueError(f"unknown backend {requested!r} for {op}{hint}; valid: {', '.join(valid)}")
    if op == "attention":
        return _choose_attention(requested, device, dtype, head_dim, needs_grad)
    if requested == "triton" and dtype == torch.float64:
        raise TypeError(f"the triton backend does not take float64 ({op}): use backend='cpp' or 'reference'")
    name = select_backend(requested, device)
    if requested is not None:
        return name
    if name == "triton" and dtype == torch.float64:
        return "cuda" if device.type == "cuda" and "cuda" in valid and _cuda_cpp_available() else "reference"
    if op == "group_norm_silu" and name == "cuda":
        return "reference"  # Triton missing on CUDA: no CUDA C++ kernel to fall back to
    small = launch_bound and numel < ELEMENTWISE_CUDA_CPP_BELOW
    if name == "triton" and device.type == "cuda" and small and "cuda" in valid:
        return "cuda" if _cuda_cpp_available() else name
    return name


def _choose_attention(
    requested: str | None, device: torch.device, dtype: torch.dtype | None, head_dim: int, needs_grad: bool
) -> str:
    if requested == "triton":
        select_backend("triton", device)  # raises with the reason when it cannot run here
        if dtype == torch.float64:
            raise TypeError("the triton backend does not take float64: use backend='sdpa' or 'reference'")
        return "triton"
    if requested is not None:
        return requested
    if device.type == "cuda":
        if head_dim > SDPA_MAX_HEAD_DIM and dtype != torch.float64 and _triton_runs_on(device):
            return "triton"
        return "sdpa"
    if device.type == "cpu" and (head_dim > CPU_PLAIN_HEAD_DIM or (head_dim == CPU_PLAIN_HEAD_DIM and needs_grad)):
        return "reference"
    return "sdpa"


def op_backend(op: str, model_backend: str | None) -> str | None:
    """The backend a model-wide setting (the U-Net's or the sampler's ``backend=``) gives ``op``:
    the same name where the op has it, else the op's default (attention has no cpp/cuda kernel,
    group_norm_silu no cuda one)."""
    return model_backend if model_backend in OP_BACKENDS[op] else None
