"""Ahead-of-time compile check of every Triton kernel for GPUs that are not here.

The launchers are run on CPU tensors with the kernel swapped for a recorder, so the check
sees exactly the arguments, constexprs and launch options they pick at the U-Net, sampler
and trainer shapes. Each recorded launch is then specialised as Triton's JIT would (same
binder, same divisibility attributes) and compiled for sm_90 (H100/H200) and sm_80 (A100);
cuobjdump reads registers, spills and shared memory from the cubin. From those and the launch's
warps follows the theoretical occupancy; from the tensors it touches (each read or written
once: the minimum any implementation moves) and the FLOPs its launcher declares follows the
roofline time at the target's peaks. The CUDA C++ kernels of csrc/ get the same report from
``nvcc -Xptxas -v``.

    python -m ddpm_fast._aot          # prints the resource report (--json for machines)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import torch

TARGETS = {"sm_90": 90, "sm_80": 80}
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
TARGETS_SMS = {"sm_90": 132, "sm_80": 108}  # H100 SXM, A100: what launch configurations that split work assume
# Per-SM limits of the occupancy calculation (the same on sm_80 and sm_90 but shared memory).
SM_SHARED = {"sm_90": 228 * 1024, "sm_80": 164 * 1024}
SM_REGISTERS, SM_MAX_WARPS, SM_MAX_BLOCKS, BLOCK_RESERVED_SHARED = 65536, 64, 32, 1024
# Roofline peaks: H100 copy bandwidth as measured on these machines (DESIGN.md), tensor-core and
# CUDA-core FLOP/s nominal; A100 (80 GB SXM) all nominal.
PEAK_BYTES_PER_S = {"sm_90": 3.0e12, "sm_80": 2.0e12}
PEAK_FLOPS = {"sm_90": {"tensor": 800e12, "fp32": 60e12}, "sm_80": {"tensor": 312e12, "fp32": 19.5e12}}
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, its grid and the arguments the launcher passed."""

    name: str
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict
    flops: int = 0  # what the launch computes, declared by the recording code (0: memory-bound)
    tensor_flops: bool = False  # whether those FLOPs run on tensor cores (bf16/fp16 tl.dot)
    archs: tuple[str, ...] = ()  # the targets whose configuration was recorded; () = every target


@dataclasses.dataclass
class Report:
    name: str
    arch: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int
    tensor_cores: bool
    occupancy: float = 0.0  # resident warps / the SM's 64, from registers, shared memory and warps
    bytes_moved: int = 0
    flops: int = 0
    roofline_us: float = 0.0  # max(bytes / peak bandwidth, flops / peak FLOP/s) at the target's peaks
    source: str = "triton"

    def line(self) -> str:
        work = f"{self.bytes_moved / 1e6:8.1f} MB" if self.bytes_moved else ""
        work += f" {self.flops / 1e9:7.1f} GFLOP" if self.flops else ""
        roof = f"  roof {self.roofline_us:8.1f} us" if self.bytes_moved or self.flops else ""
        return (
            f"{self.name:62s} {self.arch}  regs {self.registers:3d}  spill {self.spill_bytes:4d} B  "
            f"smem {self.shared_bytes:6d} B  warps {self.num_warps:2d}  occ {self.occupancy:4.0%}  "
            f"mma {'yes' if self.tensor_cores else 'no '}  {work}{roof}".rstrip()
        )


def occupancy(arch: str, registers: int, shared_bytes: int, num_warps: int) -> float:
    """Theoretical occupancy (the CUDA occupancy calculator's): resident warps per SM / 64."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_registers = (SM_REGISTERS // regs_per_warp) // num_warps
    by_shared = SM_SHARED[arch] // (shared_bytes + BLOCK_RESERVED_SHARED) if shared_bytes else SM_MAX_BLOCKS
    blocks = min(SM_MAX_BLOCKS, SM_MAX_WARPS // num_warps, by_registers, by_shared)
    return blocks * num_warps / SM_MAX_WARPS


def launch_bytes(launch: Launch) -> int:
    """Bytes of the distinct tensors a launch touches, each read or written once."""
    seen: dict[int, int] = {}
    for arg in (*launch.args, *launch.kwargs.values()):
        if isinstance(arg, torch.Tensor):
            seen[arg.data_ptr() or id(arg)] = arg.untyped_storage().nbytes()
    return sum(seen.values())


def roofline_us(arch: str, nbytes: int, flops: int, tensor: bool) -> float:
    peak = PEAK_FLOPS[arch]["tensor" if tensor else "fp32"]
    return max(nbytes / PEAK_BYTES_PER_S[arch], flops / peak) * 1e6


class _Recorder:
    def __init__(self, kernel: object, name: str, sink: list[Launch]):
        self.kernel, self.name, self.sink = kernel, name, sink

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        return lambda *args, **kwargs: self.sink.append(Launch(self.name, self.kernel, grid, args, kwargs))


@contextlib.contextmanager
def _recording(module: object, attr: str, name: str, sink: list[Launch]) -> Iterator[None]:
    kernel = getattr(module, attr)
    setattr(module, attr, _Recorder(kernel, name, sink))
    try:
        yield
    finally:
        setattr(module, attr, kernel)


def _noising_launches() -> list[Launch]:
    from .kernels import triton_noising as mod

    launches: list[Launch] = []
    table = torch.ones(1000)
    # (N, C, S) views as the op passes them: NCHW, and channels_last ("-cl": every tensor NHWC)
    shapes = ((256, 3, 32 * 32), (16, 3, 256 * 256))
    cases = [(dtype, shape, False) for dtype in (torch.float32, torch.bfloat16, torch.float16) for shape in shapes]
    cases += [(torch.float32, shapes[0], True), (torch.bfloat16, shapes[0], True)]
    for dtype, shape, channels_last in cases:
        x = _view_3d(shape, dtype, channels_last)
        t = torch.zeros(shape[0], dtype=torch.int64)
        seed = torch.zeros(1, dtype=torch.int64)
        for given, target in ((True, 0), (False, 3)):
            tag = f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}{'-cl' if channels_last else ''}"
            name = f"q_sample[{tag}-{'given' if given else 'drawn'}-t{target}]"
            with _recording(mod, "q_sample_kernel", name, launches):
                mod.q_sample_triton(
                    x,
                    t,
                    table,
                    table,
                    x if given else None,
                    None if given else seed,
                    torch.empty_like(x),
                    None if given else torch.empty_like(x),
                    torch.empty_like(x) if target else None,
                    target,
                )
    return launches


def _view_3d(shape: tuple[int, int, int], dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """An (N, C, S) tensor stored NCHW, or NHWC (the view of a channels_last image batch)."""
    n, c, s = shape
    return torch.empty((n, s, c), dtype=dtype).transpose(1, 2) if channels_last else torch.empty(shape, dtype=dtype)


def _posterior_launches() -> list[Launch]:
    from .kernels import triton_posterior as mod

    launches: list[Launch] = []
    table = torch.ones(1000)
    cases = {  # (kind, pred, var, clip, guided, channels factor), the codes of csrc/kernel_args.h
        "ddpm-eps-clip": (0, 0, 0, 1, False, 1),
        "ddpm-v-learned_range": (0, 2, 4, 0, False, 2),
        "ddpm-x0-learned-threshold": (0, 1, 3, 2, False, 2),
        "ddpm-eps-fixed_small_log": (0, 0, 1, 1, False, 1),
        "ddim-eps-guided": (1, 0, 0, 1, True, 1),
        "ddim-v-clipped_eps": (1, 2, 0, 1, False, 1),
        # with a classifier-guidance gradient (one more input): DDPM's mean shift, DDIM's eps shift
        "ddpm-v-learned_range-guide": (0, 2, 4, 1, False, 2, True),
        "ddim-x0-guided-guide": (1, 1, 0, 2, True, 1, True),
    }
    # every case NCHW; at fp32 and bf16 also channels_last ("-cl"; |x0| of phase 1 stays NCHW)
    layouts = [(dtype, False) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    layouts += [(torch.float32, True), (torch.bfloat16, True)]
    for dtype, channels_last in layouts:
        n, c, s = 256, 3, 32 * 32
        x = _view_3d((n, c, s), dtype, channels_last)
        t = torch.zeros(n, dtype=torch.int64)
        seed = torch.zeros(1, dtype=torch.int64)
        for case, (kind, pred, var, clip, guided, factor, *has_guide) in cases.items():
            mo = _view_3d(((2 if guided else 1) * n, factor * c, s), dtype, channels_last)
            guide = _view_3d((n, c, s), dtype, channels_last) if has_guide else None
            phases = (True, False) if clip == 2 else (False,)
            for phase1 in phases:
                name = (
                    f"posterior[{str(dtype)[6:]}{'-cl' if channels_last else ''}-{case}{'-phase1' if phase1 else ''}]"
                )
                abs_x0 = torch.empty((n, c, s), dtype=torch.float32) if phase1 else None
                scale = None if phase1 or clip != 2 else torch.ones(n)
                with _recording(mod, "posterior_kernel", name, launches):
                    mod.posterior_step_triton(
                        mo,
                        x,
                        t,
                        t,
                        table,
                        None,
                        seed,
                        scale,
                        torch.empty_like(x),
                        None if phase1 else torch.empty_like(x),
                        abs_x0,
                        1.0,
                        3.0,
                        1.0,
                        0.5,
                        kind,
                        pred,
                        var,
                        clip,
                        guided,
                        case.endswith("clipped_eps"),
                        guide,
                    )
    return launches


def _solver_launches() -> list[Launch]:
    from .kernels import triton_solver as mod

    launches: list[Launch] = []
    steps = 10
    cases = {  # (R slots, W writes, limit, guided, noise, step on the device, channels factor)
        "R2W1-drawn-device": (2, 1, 0, False, "drawn", True, 1),  # DPM-Solver++ order 3, SDE
        "R2W1-dynamic": (2, 1, 2, False, None, True, 1),  # with dynamic thresholding (two phases)
        "R4W2-clip-guided-given": (4, 2, 1, True, "given", False, 1),  # the largest plan taken
        "R0W0-learned": (0, 0, 0, False, None, False, 2),  # Euler, a 2C model output
        "R2W1-drawn-device-guide": (2, 1, 0, False, "drawn", True, 1, True),  # + a classifier-guidance gradient
        "R1W1-dynamic-guided-guide": (1, 1, 2, True, None, True, 1, True),
    }
    # every case NCHW; at fp32 and bf16 also a channels_last x against the NCHW history new_history gives
    layouts = [(dtype, False) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    layouts += [(torch.float32, True), (torch.bfloat16, True)]
    for dtype, channels_last in layouts:
        n, c, s = 256, 3, 32 * 32
        x = _view_3d((n, c, s), dtype, channels_last)
        for case, (slots, writes, limit, guided, noise, on_device, factor, *has_guide) in cases.items():
            mo = _view_3d(((2 if guided else 1) * n, factor * c, s), dtype, channels_last)
            history = torch.empty((slots + 1, n, c, s), dtype=dtype)
            mix = torch.ones((steps, 1 + writes, 4 + slots), dtype=torch.float64)
            write_slot = torch.zeros((steps, writes), dtype=torch.int64)
            coef = torch.ones(steps, dtype=torch.float64)
            step_t = torch.zeros((), dtype=torch.int64) if on_device else None
            seed = torch.zeros((), dtype=torch.int64) if noise == "drawn" else None
            z = torch.empty_like(x) if noise == "given" else None
            guide = torch.empty_like(x) if has_guide else None
            for phase1 in (True, False) if limit == 2 else (False,):
                name = (
                    f"solver_step[{str(dtype)[6:]}{'-cl' if channels_last else ''}-{case}{'-phase1' if phase1 else ''}]"
                )
                abs_d0 = torch.empty((n, c, s)) if phase1 else None
                scale = torch.ones(n) if limit == 2 and not phase1 else None
                with _recording(mod, "solver_step_kernel", name, launches):
                    mod.solver_step_triton(
                        mo,
                        x,
                        history,
                        step_t,
                        3,
                        coef,
                        coef,
                        mix,
                        write_slot,
                        z,
                        None if phase1 else seed,
                        scale,
                        torch.empty_like(x),
                        abs_d0,
                        3.0,
                        1.0,
                        limit,
                        guided,
                        guide,
                        coef if has_guide else None,
                    )
    return launches


def _groupnorm_launches() -> list[Launch]:
    from .kernels import triton_groupnorm as mod

    launches: list[Launch] = []
    sms = TARGETS_SMS["sm_90"]
    # (N, C, H, W, channels_last, what is folded in), U-Net shapes with 32 groups. At sm_90's SM count:
    # one program per (n, g) and one tile at 16x16 and 4x4; the split path at batch 1, 32x32; one
    # program looping over tiles at 64x64.
    cases = [
        (32, 256, 16, 16, False, "bias_nc-scale-shift-residual"),
        (64, 512, 4, 4, False, "affine-nosilu"),
        (1, 128, 32, 32, False, "bias_nc"),
        (16, 128, 64, 64, True, "bias_nc"),
    ]
    for dtype in (torch.float32, torch.bfloat16):
        for n, c, h, w, channels_last, extras in cases:
            x = torch.empty((n, c, h, w), dtype=dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            x3 = x.view(n, c, h * w)
            y3 = torch.empty_like(x).view(n, c, h * w)
            nc = torch.empty((n, c))
            bias_nc = nc if "bias_nc" in extras else None
            scale = shift = nc if "scale" in extras else None
            residual = torch.empty_like(x3) if "residual" in extras else None
            silu = "nosilu" not in extras
            cfg = mod.groupnorm_config(n, c, 32, h * w, sms)
            path = "split" if cfg.splits > 1 else ("tile" if cfg.one_tile else "loop")
            tag = f"{str(dtype)[6:]}-{n}x{c}x{h}x{w}{'-cl' if channels_last else ''}-{extras}-{path}"
            stats = torch.empty((n, 32))
            with (
                _recording(mod, "gn_fwd_stats_kernel", f"group_norm_silu_fwd_stats[{tag}]", launches),
                _recording(mod, "gn_fwd_kernel", f"group_norm_silu_fwd[{tag}]", launches),
            ):
                mod.group_norm_silu_fwd_triton(
                    x3, nc[0], nc[0], bias_nc, scale, shift, residual, 32, 1e-5, silu, y3, stats, stats, sms=sms
                )
            with (
                _recording(mod, "gn_bwd_partials_kernel", f"group_norm_silu_bwd_partials[{tag}]", launches),
                _recording(mod, "gn_bwd_kernel", f"group_norm_silu_bwd[{tag}]", launches),
            ):
                mod.group_norm_silu_bwd_triton(
                    y3, x3, nc[0], nc[0], bias_nc, scale, shift, stats, stats, 32, silu, y3, nc, nc,
                    nc if bias_nc is not None else None, sms=sms,
                )  # fmt: skip
    return launches


def _attention_launches() -> list[Launch]:
    from .kernels import triton_attention as mod

    launches: list[Launch] = []
    # (B, H, S, D, dtype): the CIFAR U-Net's 16x16 attention (head_dim 256, held whole), the 256x256
    # models' head_dim 512 (the split path), long sequences at head_dim 64; fp32 (IEEE products, one
    # configuration for every head_dim) at 512. q, k, v, o as (B, S, H, D) memory, the layout of the
    # block's projections (same divisibility as its (B, S, 3C) views).
    bf16, fp32 = torch.bfloat16, torch.float32
    cases = [(128, 1, 256, 256, bf16), (16, 1, 256, 512, bf16), (4, 8, 4096, 64, bf16), (16, 1, 256, 512, fp32)]
    kernels = {
        "fwd": ("_attn_fwd_kernel",),
        "bwd": ("_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"),
    }
    for arch_name, arch in TARGETS.items():
        for b, h, s, d, dtype in cases:
            q, k, v, o = (torch.empty((b, s, h, d), dtype=dtype).transpose(1, 2) for _ in range(4))
            lse = torch.empty((b, h, s))
            tag = f"{str(dtype)[6:]}-{b}x{h}x{s}x{d}-{arch_name}"
            fwd_flops = 4 * b * h * s * s * d
            for phase, names in kernels.items():
                start = len(launches)
                with contextlib.ExitStack() as stack:
                    for name in names:
                        label = f"attention_{name[len('_attn_') : -len('_kernel')]}[{tag}]"
                        stack.enter_context(_recording(mod, name, label, launches))
                    if phase == "fwd":
                        mod.attention_fwd_triton(q, k, v, o, lse, d**-0.5, arch=arch)
                    else:
                        mod.attention_bwd_triton(o, q, k, v, o, lse, q, k, v, d**-0.5, arch=arch)
                for launch in launches[start:]:
                    launch.archs = (arch_name,)
                    launch.tensor_flops = dtype != fp32
                    # the backward's 2.5x the forward: dk/dv 4 of the 5 GEMMs (2 recomputed), dq 3
                    share = {"fwd": 1.0, "bwd_dkdv": 1.5, "bwd_dq": 1.0}.get(launch.name.split("[")[0][10:], 0.0)
                    launch.flops = int(share * fwd_flops)
    return launches


def _vlb_terms_launches() -> list[Launch]:
    from .kernels import triton_vlb_terms as mod

    launches: list[Launch] = []
    table = torch.ones(1000, mod.TABLE_COLS)
    shape = (256, 3, 32 * 32)  # the CIFAR training batch
    for dtype, channels_last in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        x = _view_3d(shape, dtype, channels_last)
        out = _view_3d((shape[0], 2 * shape[1], shape[2]), dtype, channels_last)
        t = torch.zeros(shape[0], dtype=torch.int64)
        tag = f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}{'-cl' if channels_last else ''}"
        with _recording(mod, "vlb_terms_fwd_kernel", f"vlb_terms_fwd[{tag}]", launches):
            mod.vlb_terms_fwd_triton(out, x, x, t, table, mod.LEARNED_RANGE, False)
        with _recording(mod, "vlb_terms_bwd_kernel", f"vlb_terms_bwd[{tag}]", launches):
            mod.vlb_terms_bwd_triton(
                torch.ones(shape[0]), out, x, x, t, table, mod.LEARNED_RANGE, False, False, torch.empty_like(out)
            )
    return launches


def recorded_launches() -> list[Launch]:
    """Every Triton launch the package makes at its representative shapes and dtypes."""
    return (
        _noising_launches()
        + _posterior_launches()
        + _solver_launches()
        + _groupnorm_launches()
        + _attention_launches()
        + _vlb_terms_launches()
    )


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_launch(launch: Launch, arch: str) -> Report:
    """Compile one recorded launch for ``arch`` as the JIT would, and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", TARGETS[arch], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout

    def field(key: str) -> int:
        match = re.search(rf"\b{key}:(\d+)", usage)
        return int(match.group(1)) if match else 0

    ptx = compiled.asm["ptx"]
    registers, shared = field("REG"), max(field("SHARED"), compiled.metadata.shared)
    nbytes = launch_bytes(launch)
    return Report(
        name=launch.name,
        arch=arch,
        registers=registers,
        spill_bytes=field("STACK") + field("LOCAL"),
        shared_bytes=shared,
        num_warps=compiled.metadata.num_warps,
        tensor_cores=bool(re.search(r"\b(wgmma|mma)\.", ptx)),
        occupancy=occupancy(arch, registers, shared, compiled.metadata.num_warps),
        bytes_moved=nbytes,
        flops=launch.flops,
        roofline_us=roofline_us(arch, nbytes, launch.flops, launch.tensor_flops),
    )


def package_kernels() -> set[str]:
    """Every Triton kernel (a jit function no other jit function calls) in ddpm_fast.kernels."""
    import importlib
    import pkgutil

    import triton

    from . import kernels

    functions: dict[str, object] = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, triton.runtime.JITFunction) and value.__module__ == module.__name__:
                functions[f"{info.name}.{attr}"] = value
    called = set()
    for fn in functions.values():
        body = fn.src.split(":", 1)[-1] if fn.src.lstrip().startswith("def ") else fn.src
        called |= set(re.findall(r"\b(\w+)\s*\(", body.split("\n", 1)[-1]))
    return {name for name in functions if name.rsplit(".", 1)[-1] not in called}


def recorded_kernels(launches: list[Launch]) -> set[str]:
    return {f"{launch.kernel.__module__.rsplit('.', 1)[-1]}.{launch.kernel.__name__}" for launch in launches}


# ---------------------------------------------------------------- the JIT's launch path, without a GPU
class StandInDriver:
    """A Triton driver for a host without a GPU, to run the JIT's launch path as on ``arch``:
    ``kernel[grid](...)`` binds, specialises and compiles (ahead of time, cached on disk) as it
    would there, and the compiled kernel's launcher appends its arguments to ``launches`` instead
    of launching. What a call costs on the host up to the CUDA launch can then be timed here, and
    kernels.launch's cached path checked against what the JIT passes.

        with StandInDriver() as driver:
            q_sample_triton(...)  # CPU tensors
            driver.launches[-1]   # (grid x, y, z, stream, function, metadata, hooks..., *args)
    """

    def __init__(self, arch: int = 90, keep: int = 16):
        self.arch, self.keep = arch, keep
        self.launches: list[tuple] = []
        driver = self

        class Utils:
            def get_device_properties(self, device):
                return {"max_shared_mem": SHARED_LIMIT[f"sm_{arch}"], "multiprocessor_count": 132}

            def load_binary(self, name, kernel, shared, device):  # (module, function, regs, spills, max threads)
                return object(), object(), 0, 0, 1024

            def unload_module(self, module):
                pass

        class Launcher:
            def __init__(self, src, metadata):
                pass

            def __call__(self, *args):
                if len(driver.launches) >= driver.keep:
                    del driver.launches[0]
                driver.launches.append(args)

        self.utils, self.launcher_cls = Utils(), Launcher

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def __enter__(self) -> StandInDriver:
        import triton

        from .kernels import launch

        if os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels are not compiled")
        if torch.cuda.is_available():  # its kernels would stay in the JIT's caches for device 0
            raise RuntimeError("the stand-in driver is for hosts without a GPU")
        self._previous = getattr(triton.runtime.driver, "_active", None)
        triton.runtime.driver.set_active(self)
        launch.clear_cache()
        return self

    def __exit__(self, *exc) -> None:
        import triton

        from .kernels import launch

        launch.clear_cache()
        triton.runtime.driver.set_active(self._previous)


# ---------------------------------------------------------------- the CUDA C++ kernels (csrc/*.cu)
CUDA_THREADS_PER_BLOCK = 256  # kThreads of csrc/cuda_types.cuh
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")


def _demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def nvcc_reports(arch: str, source: str) -> list[Report]:
    """Compile one csrc/*.cu for ``arch`` with ``nvcc -Xptxas -v``; one report per kernel instance."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            ["nvcc", "-std=c++17", f"-arch={arch}", "-O3", "-Xptxas", "-v", "-I", CSRC, "-c", source, "-o",
             os.path.join(tmp, "k.o")],
            capture_output=True, text=True,
        )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} for {arch}:\n{proc.stderr[-3000:]}")
    # ptxas prints, per entry: its name, then stack/spill bytes, then registers and shared memory.
    chunks = _PTXAS_ENTRY.split(proc.stderr)[1:]
    entries = [(chunks[i], chunks[i + 2]) for i in range(0, len(chunks), 3)]
    names = _demangle([mangled for mangled, _ in entries])
    reports = []
    for name, (_, text) in zip(names, entries, strict=True):
        spill = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
        registers = int(m.group(1)) if (m := re.search(r"Used (\d+) registers", text)) else 0
        shared = int(m.group(1)) if (m := re.search(r"(\d+) bytes smem", text)) else 0
        warps = CUDA_THREADS_PER_BLOCK // 32
        short = re.sub(r"^void |ddpm_fast::|\(anonymous namespace\)::|\(.*\)$", "", name)
        reports.append(
            Report(
                name=f"{os.path.basename(source)}:{short}",
                arch=arch,
                registers=registers,
                spill_bytes=spill,
                shared_bytes=shared,
                num_warps=warps,
                tensor_cores=False,
                occupancy=occupancy(arch, registers, shared, warps),
                source="cuda",
            )
        )
    return reports


def cuda_sources() -> list[str]:
    if not os.path.isdir(CSRC):  # an installed wheel has no csrc/
        return []
    return sorted(os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith(".cu"))


def write_reports(reports: list[Report], out_dir: str) -> None:
    """One JSON per target: the toolchain that compiled it and every kernel's report."""
    import triton

    nvcc = shutil.which("nvcc")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""
    os.makedirs(out_dir, exist_ok=True)
    for arch in TARGETS:
        path = os.path.join(out_dir, f"aot-{arch.replace('_', '')}.json")
        document = {
            "target": arch,
            "triton": triton.__version__,
            "torch": torch.__version__,
            "nvcc": (re.findall(r"release [\d.]+", version) or [""])[0],
            "commit": _git_commit(),
            "peaks": {"bytes_per_s": PEAK_BYTES_PER_S[arch], "flops": PEAK_FLOPS[arch]},
            "kernels": [dataclasses.asdict(r) for r in reports if r.arch == arch],
        }
        with open(path + ".tmp", "w") as f:
            json.dump(document, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")


def _git_commit() -> str:
    if os.environ.get("DDPM_FAST_COMMIT"):
        return os.environ["DDPM_FAST_COMMIT"]
    root = os.path.dirname(CSRC)
    proc = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compile every Triton kernel for sm_90 and sm_80; report resources.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--no-nvcc", action="store_true", help="skip the CUDA C++ kernels of csrc/")
    parser.add_argument("--out", metavar="DIR", help="also write DIR/aot-sm90.json and DIR/aot-sm80.json")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    launches = recorded_launches()
    reports = [
        compile_launch(launch, arch) for launch in launches for arch in TARGETS if arch in (launch.archs or TARGETS)
    ]
    nvcc = None if args.no_nvcc else shutil.which("nvcc")
    sources = cuda_sources() if nvcc else []
    reports += [r for source in sources for arch in TARGETS for r in nvcc_reports(arch, source)]
    unrecorded = sorted(package_kernels() - recorded_kernels(launches))
    if args.out:
        write_reports(reports, args.out)
    if args.json:
        result = {"reports": [dataclasses.asdict(r) for r in reports], "unrecorded": unrecorded, "nvcc": bool(sources)}
        print(json.dumps(result))
        return
    for report in reports:
        print(report.line())
    if not sources:
        print("CUDA C++ kernels skipped: " + ("--no-nvcc" if args.no_nvcc else "nvcc or csrc/ not found"))
    if unrecorded:
        raise SystemExit(f"Triton kernels with no recorded launch (add them to _aot.py): {', '.join(unrecorded)}")


if __name__ == "__main__":
    main()
