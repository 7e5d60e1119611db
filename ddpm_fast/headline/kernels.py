"""Row 4 of the headline run: the fused ops against what users would write instead.

- group_norm_silu (GroupNorm(32) + SiLU) at the U-Net presets' shapes, forward and
  forward+backward, against eager ``F.silu(F.group_norm(...))``, ``torch.compile`` of that
  function, and Liger-Kernel's GroupNorm (+ F.silu) when ``import liger_kernel`` works. Bytes:
  forward reads x and writes y (2 tensors); forward+backward adds reading x and dy and writing dx
  (5 tensors), the benchmarks' convention.
- attention (one head, head_dim 64..512, 256 and 1024 tokens), forward, against SDPA with
  torch's own kernel choice. FLOPs: 4 B S^2 D.
- q_sample (given noise: read x0 and noise, write x_t) and the DDPM posterior_step (given noise:
  read model output, sample and noise, write the new sample) with each fast backend, against the
  eager reference and ``torch.compile`` of it. Launch-bound sizes are timed one call at a time
  (a call between two events: launch overhead included), >= 2^24 elements as back-to-back calls.
GB/s are % of the copy bandwidth measured in the same run; TFLOP/s % of the FLOP peak.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import Schedule, StepConfig, attention, backends, group_norm_silu, posterior_step, q_sample, reference
from ..ops import no_value_checks
from .measure import measure, optional_import
from .models import DTYPES
from .report import Row

if TYPE_CHECKING:
    from .run import Context

GROUPS, EPS = 32, 1e-5
LAUNCH_BOUND_BELOW = 1 << 24  # elements: time one call at a time below this, back-to-back above


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _eager_group_norm_silu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(F.group_norm(x, GROUPS, w, b, EPS))


def _ours_group_norm_silu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return group_norm_silu(x, GROUPS, w, b, EPS)


def _liger_group_norm_silu() -> tuple[Callable | None, str]:
    module, why = optional_import("liger_kernel.ops.group_norm")
    if module is None:
        return None, why
    fn = module.LigerGroupNormFunction

    def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.silu(fn.apply(x, w, b, x.shape[1], GROUPS, EPS))

    return run, ""


class _Pacer:
    """Skips the rest of a kernel family once the time budget cannot fit another case as long
    as the longest case so far."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.longest = ctx, 0.0

    def allows(self, what: str) -> bool:
        if self.ctx.budget.fits(self.longest):
            return True
        self.ctx.report.skip("kernels", what, self.ctx.budget.why(self.longest))
        return False

    def done(self, start: float) -> None:
        self.longest = max(self.longest, time.perf_counter() - start)


def _bandwidth_row(ctx: Context, case: str, impl: str, dtype: str, timing, nbytes: int, baseline: bool) -> Row:
    gbps = nbytes / timing.median / 1e9
    return Row(
        section="kernels",
        case=case,
        impl=impl,
        dtype=dtype,
        seconds=timing.median,
        rate=gbps,
        unit="GB/s",
        peak_pct=100 * gbps / ctx.copy_gbps,
        peak_of="copy",
        baseline=baseline,
        data={"bytes": nbytes, "timing": timing.to_dict()},
    )


def _timed(ctx: Context, what: str, fn: Callable[[], object], inner: int):
    """measure() with the kernels' repeats; a failure becomes an error entry (None)."""
    try:
        return measure(fn, ctx.device, repeats=ctx.sizes.kernel_repeats, warmup=2, inner=inner)
    except Exception as err:  # noqa: BLE001 (one failing implementation must not end the run)
        ctx.report.error("kernels", what, err)
        return None


def group_norm_rows(ctx: Context) -> None:
    s = ctx.sizes
    impls: list[tuple[str, Callable, bool]] = [
        ("ddpm_fast group_norm_silu", _ours_group_norm_silu, False),
        ("eager F.silu(F.group_norm)", _eager_group_norm_silu, True),
    ]
    if s.compile:
        compiled = torch.compile(_eager_group_norm_silu, dynamic=False, fullgraph=True)
        impls.append(("torch.compile of it", compiled, False))
    else:
        ctx.report.skip("kernels", "group_norm_silu: torch.compile of F.silu(F.group_norm)", ctx.compile_off)
    liger, why = _liger_group_norm_silu()
    if liger is not None:
        impls.append(("Liger GroupNorm + F.silu", liger, False))
    else:
        ctx.report.skip("kernels", "group_norm_silu: Liger-Kernel GroupNorm", why)
    pacer = _Pacer(ctx)
    gen = torch.Generator().manual_seed(4)
    for label, shape in s.group_norm_shapes:
        if not pacer.allows(f"group_norm_silu {shape_id(shape)} ({label})"):
            break
        start = time.perf_counter()
        _group_norm_case(ctx, impls, label, shape, gen)
        pacer.done(start)


def _group_norm_case(ctx: Context, impls: list, label: str, shape: tuple[int, ...], gen: torch.Generator) -> None:
    s = ctx.sizes
    dtype = DTYPES[s.kernel_dtype]
    c = shape[1]
    x = torch.randn(shape, generator=gen).to(ctx.device, dtype)
    w = (1 + 0.1 * torch.randn(c, generator=gen)).to(ctx.device, dtype)
    b = (0.1 * torch.randn(c, generator=gen)).to(ctx.device, dtype)
    dy = torch.randn(shape, generator=gen).to(ctx.device, dtype)
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
    inner = 1 if x.numel() < LAUNCH_BOUND_BELOW else s.kernel_inner

    def forward(fn: Callable) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return fn(x, w, b)

        return call

    def forward_backward(fn: Callable) -> Callable[[], object]:
        return lambda: torch.autograd.grad(fn(xg, wg, bg), (xg, wg, bg), dy)

    for mode, tensors, wrap in (("fwd", 2, forward), ("fwd+bwd", 5, forward_backward)):
        case = f"GN+SiLU {mode} {shape_id(shape)} ({label})"
        for name, fn, baseline in impls:
            timing = _timed(ctx, f"{case}: {name}", wrap(fn), inner)
            if timing is not None:
                nbytes = tensors * x.numel() * x.element_size()
                ctx.report.add(_bandwidth_row(ctx, case, name, s.kernel_dtype, timing, nbytes, baseline))


def attention_rows(ctx: Context) -> None:
    s = ctx.sizes
    triton = ctx.device.type == "cuda" and backends()["triton"][0]
    ours_name = "ddpm_fast attention (triton)" if triton else "ddpm_fast attention (default)"
    if ctx.device.type == "cuda" and not triton:
        ctx.report.skip("kernels", "attention: the triton backend", backends()["triton"][1])
    pacer = _Pacer(ctx)
    gen = torch.Generator().manual_seed(5)
    for d in s.attention_head_dims:
        for tokens in s.attention_tokens:
            shape = (max(1, s.attention_rows // tokens), 1, tokens, d)
            case = f"attention fwd {shape_id(shape)} (d={d}, {tokens} tok)"
            if not pacer.allows(case):
                return
            start = time.perf_counter()
            _attention_case(ctx, case, shape, triton, ours_name, gen)
            pacer.done(start)


def _attention_case(
    ctx: Context, case: str, shape: tuple[int, ...], triton: bool, ours_name: str, gen: torch.Generator
) -> None:
    s = ctx.sizes
    q, k, v = (torch.randn(shape, generator=gen).to(ctx.device, DTYPES[s.kernel_dtype]) for _ in range(3))
    backend = "triton" if triton else None

    def ours() -> object:
        with torch.no_grad():
            return attention(q, k, v, backend=backend)

    def sdpa() -> object:
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v)

    batch, _, tokens, d = shape
    flops = 4 * batch * tokens * tokens * d
    for name, call, baseline in ((ours_name, ours, False), ("SDPA (torch's choice)", sdpa, True)):
        timing = _timed(ctx, f"{case}: {name}", call, s.kernel_inner)
        if timing is None:
            continue
        flops_per_s = flops / timing.median
        ctx.report.add(
            Row(
                section="kernels",
                case=case,
                impl=name,
                dtype=s.kernel_dtype,
                seconds=timing.median,
                rate=flops_per_s / 1e12,
                unit="TFLOP/s",
                peak_pct=100 * flops_per_s / ctx.peak_flops if ctx.peak_flops else None,
                peak_of=ctx.peak_label,
                baseline=baseline,
                data={"flops": flops, "timing": timing.to_dict()},
            )
        )


def elementwise_rows(ctx: Context) -> None:
    s = ctx.sizes
    dtype = DTYPES[s.elementwise_dtype]
    schedule = Schedule.from_config(device=ctx.device)
    ddpm = StepConfig(kind="ddpm", prediction_type="epsilon", variance_type="fixed_small", clip_sample=True)
    wanted = ("triton", "cuda") if ctx.device.type == "cuda" else ("cpp",)
    available = backends()
    fast = [name for name in wanted if available[name][0]]
    for name in wanted:
        if not available[name][0]:
            ctx.report.skip("kernels", f"q_sample / posterior_step: the {name} backend", available[name][1])

    def q_ref(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return reference.q_sample(x0, t, schedule, noise)

    def step_ref(mo: torch.Tensor, x: torch.Tensor, t: torch.Tensor, prev: torch.Tensor, noise: torch.Tensor):
        return reference.posterior_step(mo, x, t, prev, schedule, ddpm, noise)[0]

    refs = {"q_sample": q_ref, "posterior_step DDPM": step_ref}
    compiled = {}
    if s.compile:
        compiled = {op: torch.compile(fn, dynamic=False, fullgraph=True) for op, fn in refs.items()}
    else:
        ctx.report.skip("kernels", "q_sample / posterior_step: torch.compile of the reference", ctx.compile_off)
    pacer = _Pacer(ctx)
    gen = torch.Generator().manual_seed(6)
    for shape in s.elementwise_shapes:
        if not pacer.allows(f"q_sample / posterior_step {shape_id(shape)}"):
            return
        start = time.perf_counter()
        n = shape[0]
        x0, noise, mo, x = (torch.randn(shape, generator=gen).to(ctx.device, dtype) for _ in range(4))
        t = torch.randint(20, schedule.num_train_timesteps, (n,), generator=gen).to(ctx.device)
        prev = t - 1
        ops = {
            "q_sample": (3, (x0, t, noise), partial(q_sample, x0, t, schedule, noise=noise)),
            "posterior_step DDPM": (
                4,
                (mo, x, t, prev, noise),
                partial(posterior_step, mo, x, t, prev, schedule, ddpm, noise=noise),
            ),
        }
        for op, (tensors, args, ours) in ops.items():
            impls = [(f"ddpm_fast ({b})", partial(ours, backend=b), False) for b in fast]
            impls.append(("eager reference", partial(refs[op], *args), True))
            if compiled:
                impls.append(("torch.compile of the reference", partial(compiled[op], *args), False))
            _elementwise_case(ctx, f"{op} {shape_id(shape)}", shape, tensors, impls)
        pacer.done(start)


def _elementwise_case(ctx: Context, case: str, shape: tuple[int, ...], tensors: int, impls: list) -> None:
    s = ctx.sizes
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    inner = 1 if numel < LAUNCH_BOUND_BELOW else s.kernel_inner
    case += " per call" if inner == 1 else f" back-to-back x{inner}"
    nbytes = tensors * numel * torch.empty((), dtype=DTYPES[s.elementwise_dtype]).element_size()
    for name, fn, baseline in impls:

        def call(fn: Callable = fn) -> object:
            with torch.no_grad(), no_value_checks():
                return fn()

        timing = _timed(ctx, f"{case}: {name}", call, inner)
        if timing is not None:
            ctx.report.add(_bandwidth_row(ctx, case, name, s.elementwise_dtype, timing, nbytes, baseline))


def kernel_rows(ctx: Context) -> None:
    group_norm_rows(ctx)
    attention_rows(ctx)
    elementwise_rows(ctx)
