"""Self-check: every available backend against the reference on small random inputs."""

from __future__ import annotations

import contextlib

import torch

from . import reference
from ._backends import backends, cpu_bf16_autocast_default, cpu_bf16_units, cpu_isas, use_cpu_isa
from .ops import attention, group_norm_silu, posterior_step, q_sample
from .schedule import Schedule, StepConfig

_CONFIGS = [
    StepConfig(kind="ddpm"),
    StepConfig(kind="ddpm", prediction_type="v_prediction", variance_type="fixed_large", clip_sample=False),
    StepConfig(kind="ddpm", variance_type="learned_range", thresholding=True, sample_max_value=2.0),
    StepConfig(kind="ddim", eta=0.0),
    StepConfig(kind="ddim", prediction_type="sample", eta=1.0, use_clipped_model_output=True),
]


def _error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    return ((fast.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1.0)).item()


def _device_for(name: str) -> torch.device:
    return torch.device("cuda") if name in ("cuda", "triton") and torch.cuda.is_available() else torch.device("cpu")


def _worst_error(name: str, device: torch.device) -> float:
    """The largest relative error of backend ``name`` against the reference over the checks."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    schedule = Schedule.from_config(device=device)
    x0 = torch.randn(2, 3, 9, 11, generator=gen).to(device)
    noise = torch.randn(2, 3, 9, 11, generator=gen).to(device)
    t = torch.tensor([0, 731], device=device)
    fast = q_sample(x0, t, schedule, noise=noise, target="v_prediction", backend=name)
    ref = q_sample(x0, t, schedule, noise=noise, target="v_prediction", backend="reference")
    worst = max(_error(fast[0], ref[0]), _error(fast[2], ref[2]))
    for config in _CONFIGS:
        channels = 6 if config.learned_variance else 3
        model_output = torch.randn(2, channels, 9, 11, generator=gen).to(device).clamp(-1, 1)
        step_t = torch.tensor([20, 751], device=device)
        prev_t = torch.tensor([-1, 731], device=device)  # the last step and a respaced one
        fast = posterior_step(model_output, x0, step_t, prev_t, schedule, config, noise=noise, backend=name)[0]
        ref = reference.posterior_step(model_output, x0, step_t, prev_t, schedule, config, noise)[0]
        worst = max(worst, _error(fast, ref))
    if name != "cuda":  # group_norm_silu has C++ CPU and Triton kernels, no CUDA C++ one
        # 5 x 7 positions: rows longer than one vector of every ISA build, with a tail
        x = torch.randn(2, 8, 5, 7, generator=gen).to(device)
        weight, bias = torch.randn(8, generator=gen).to(device), torch.randn(8, generator=gen).to(device)
        per_nc = [torch.randn(2, 8, generator=gen).to(device) for _ in range(3)]
        kwargs = dict(bias_nc=per_nc[0], scale_nc=per_nc[1], shift_nc=per_nc[2], residual=x)
        for layout in (torch.contiguous_format, torch.channels_last):
            xl = x.contiguous(memory_format=layout)
            fast = group_norm_silu(xl, 4, weight, bias, 1e-6, backend=name, **{**kwargs, "residual": xl})
            ref = reference.group_norm_silu(x, 4, weight, bias, 1e-6, **kwargs)
            worst = max(worst, _error(fast, ref))
    if name == "triton":  # attention's own kernel is Triton (its other backend, SDPA, is torch's)
        q, k, v = (torch.randn(1, 2, 20, 40, generator=gen).to(device) for _ in range(3))
        worst = max(worst, _error(attention(q, k, v, backend=name), reference.attention(q, k, v)))
    return worst


def machine_summary() -> str:
    """One line on the CPU: its model and cores, the vector-ISA builds of our kernels it runs, and its
    bf16 units, which decide sample()'s default model dtype on the CPU."""
    from .headline.measure import cpu_cores, cpu_model

    units = cpu_bf16_units()
    dtype = "bf16" if cpu_bf16_autocast_default() else "fp32"
    return (
        f"cpu: {cpu_model()}, {cpu_cores()} cores; C++ kernel builds it runs: {', '.join(cpu_isas()) or 'none'}; "
        f"bf16 units: {', '.join(units) or 'none'} (sample() runs the model in {dtype} on the CPU by default)"
    )


def run_checks(tolerance: float = 1e-4, verbose: bool = True) -> bool:
    """Compare q_sample, posterior_step, group_norm_silu and attention of each available backend with the
    reference; the C++ CPU kernels in each vector-ISA build this CPU can run."""
    available = backends()
    ok = True
    for name, (usable, reason) in available.items():
        if verbose:
            print(f"  {name:10s} {'yes' if usable else 'no '}  {reason}")
    for name, (usable, _) in available.items():
        if not usable or name == "reference":
            continue
        device = _device_for(name)
        for isa in cpu_isas() if name == "cpp" else [None]:
            with use_cpu_isa(isa) if isa else contextlib.nullcontext():
                worst = _worst_error(name, device)
            passed = worst <= tolerance
            ok &= passed
            if verbose:
                label = f"{name}[{isa}]" if isa else name
                print(
                    f"  check {label:13s} on {device.type}: max relative error {worst:.2e} "
                    f"{'ok' if passed else 'MISMATCH'}"
                )
    return ok
