"""vlb_terms: the variational bound's per-sample terms (KL for t > 0, decoder NLL for t == 0), the
L_vlb of the hybrid loss, against the reference.

Case: learned_range variance, eps prediction, model_output (N, 2C, H, W), timesteps per sample in
[0, 1000) (sample 0 at t = 0, a decoder term). Modes (bytes = full-tensor reads + writes the op
cannot avoid, in units of an (N, C, H, W) tensor):
  fwd       terms = vlb_terms(out, x0, x_t, t)                 read out (2), x0, x_t          4
  fwd+bwd   the forward, then d terms / d out (hybrid: mean      + read out (2), x0, x_t;
            channels get 0, the op's stop-gradient)              write d out (2)              10
Implementations: each fast backend on the device (cpp on CPU; triton on CUDA: no CUDA C++ kernel),
the reference ``ddpm_fast.vlb.vlb_terms`` computing in fp32 (the precision a compiled alternative
would use; the float64 default is the test oracle) in eager mode ("eager") and under torch.compile
("compile", which compiles the backward too).
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import CASES, DEVICE, DTYPES, compile_fn, kernel_backends, op_cases, tensor_bytes

from ddpm_fast import Schedule, vlb
from ddpm_fast.ops import no_value_checks, vlb_terms

SCHEDULE = Schedule.from_config(device=DEVICE)
MODES = {"fwd": 4, "fwd+bwd": 10}
IMPLS = [*(name for name in kernel_backends() if name != "cuda"), "eager", "compile"]


def _reference(out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    c = x0.shape[1]
    frozen = torch.cat([out[:, :c].detach(), out[:, c:]], 1)  # the hybrid loss's stop-gradient
    return vlb.vlb_terms(SCHEDULE, frozen, x0, x_t, t, dtype=torch.float32, check_range=False)


@functools.cache
def compiled():
    return compile_fn(_reference)


@pytest.mark.parametrize(("impl", "shape", "dtype", "mode"), op_cases("vlb_terms", CASES, MODES, IMPLS))
def test_vlb_terms(roofline, impl, shape, dtype, mode):
    torch_dtype = DTYPES[dtype]
    n, c = shape[:2]
    gen = torch.Generator(DEVICE).manual_seed(0)
    x0 = (torch.randint(0, 256, shape, device=DEVICE, generator=gen) / 127.5 - 1).to(torch_dtype)
    noise = torch.randn(shape, device=DEVICE, generator=gen)
    t = torch.randint(1, 1000, (n,), device=DEVICE, generator=gen)
    t[0] = 0
    ab = SCHEDULE.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_t = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).to(torch_dtype)
    out = torch.cat([noise + 0.1 * torch.randn(shape, device=DEVICE, generator=gen),
                     torch.rand(shape, device=DEVICE, generator=gen) * 2 - 1], 1).to(torch_dtype)  # fmt: skip
    backward = mode == "fwd+bwd"
    out.requires_grad_(backward)

    if impl in ("eager", "compile"):
        op = _reference if impl == "eager" else compiled()

        def run():
            return op(out, x0, x_t, t)
    else:

        def run():
            with no_value_checks():
                return vlb_terms(out, x0, x_t, t, SCHEDULE, mean_grad=False, backend=impl)

    def fn():
        terms = run()
        if backward:
            (grad,) = torch.autograd.grad(terms.sum(), out)
            return grad
        return terms

    roofline(fn, bytes_moved=tensor_bytes(shape, torch_dtype, MODES[mode]))
