"""Ahead-of-time compile check of every Triton kernel for GPUs that are not here.

The launchers are run on CPU tensors with the kernel swapped for a recorder, so the check
sees exactly the arguments, constexprs and launch options they pick at the U-Net, sampler
and trainer shapes. Each recorded launch is then specialised as Triton's JIT would (same
binder, same divisibility attributes) and compiled for sm_90 (H100/H200) and sm_80 (A100);
cuobjdump reads registers, spills and shared memory from the cubin.

    python -m ddpm_fast._aot          # prints the resource report (--json for machines)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import torch

TARGETS = {"sm_90": 90, "sm_80": 80}
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
TARGETS_SMS = {"sm_90": 132, "sm_80": 108}  # H100 SXM, A100: what launch configurations that split work assume


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, its grid and the arguments the launcher passed."""

    name: str
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Report:
    name: str
    arch: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int
    tensor_cores: bool

    def line(self) -> str:
        return (
            f"{self.name:55s} {self.arch}  regs {self.registers:3d}  spill {self.spill_bytes:4d} B  "
            f"smem {self.shared_bytes:6d} B  warps {self.num_warps}  mma {'yes' if self.tensor_cores else 'no'}"
        )


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
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((256, 3, 32 * 32), (16, 3, 256 * 256)):
            x = torch.empty(shape, dtype=dtype)
            t = torch.zeros(shape[0], dtype=torch.int64)
            seed = torch.zeros(1, dtype=torch.int64)
            for given, target in ((True, 0), (False, 3)):
                name = (
                    f"q_sample[{str(dtype)[6:]}-{'x'.join(map(str, shape))}-{'given' if given else 'drawn'}-t{target}]"
                )
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
    }
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        n, c, s = 256, 3, 32 * 32
        x = torch.empty((n, c, s), dtype=dtype)
        t = torch.zeros(n, dtype=torch.int64)
        seed = torch.zeros(1, dtype=torch.int64)
        for case, (kind, pred, var, clip, guided, factor) in cases.items():
            mo = torch.empty(((2 if guided else 1) * n, factor * c, s), dtype=dtype)
            phases = (True, False) if clip == 2 else (False,)
            for phase1 in phases:
                name = f"posterior[{str(dtype)[6:]}-{case}{'-phase1' if phase1 else ''}]"
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
                        torch.empty_like(x),
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


def recorded_launches() -> list[Launch]:
    """Every Triton launch the package makes at its representative shapes and dtypes."""
    return _noising_launches() + _posterior_launches() + _groupnorm_launches()


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
    return Report(
        name=launch.name,
        arch=arch,
        registers=field("REG"),
        spill_bytes=field("STACK") + field("LOCAL"),
        shared_bytes=max(field("SHARED"), compiled.metadata.shared),
        num_warps=compiled.metadata.num_warps,
        tensor_cores=bool(re.search(r"\b(wgmma|mma)\.", ptx)),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compile every Triton kernel for sm_90 and sm_80; report resources.")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    reports = [compile_launch(launch, arch) for launch in recorded_launches() for arch in TARGETS]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in reports]))
    else:
        for report in reports:
            print(report.line())


if __name__ == "__main__":
    main()
