"""The U-Net alone: forward (inference) and a training step (forward + MSE + backward + AdamW) in
images/s and TFLOP/s, ddpm_fast.UNet against diffusers' UNet2DModel holding the same weights
(``UNet.to_diffusers``), each eager and under torch.compile.

diffusers is the plain-PyTorch reference of this model (its compiled form: torch.compile of the
reference); it gets channels_last weights and inputs too, its documented fast setting. FLOPs are
counted once per case with torch.utils.flop_counter on the diffusers model (forward, or forward +
backward for the step): the same arithmetic for every implementation.

CUDA: the cifar10 preset at batch 128 under bf16 autocast (fp32 weights), also ours with
mode="reduce-overhead" (CUDA graphs). CPU: cifar10 at batch 2 eager, and the tiny preset at
batch 8, fp32: forward eager and compiled, training step eager (compiling the 35.7M model, or a
training step, costs minutes on 2 cores: DDPM_FAST_BENCH_COMPILE=1 adds the compiled tiny steps).

CPU with bf16 units (AMX or AVX512-BF16: ddpm_fast._backends.cpu_has_bf16_units), group
unet-forward-<preset>-b<batch>-cpu-autocast: the eager forward of both models in fp32 and under bf16
autocast (fp32 weights, as sample()'s default there), cifar10 at batch 8 and tiny at batch 64: what
sample()'s default dtype on such CPUs is chosen from.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_CUDA, compile_fn
from torch.utils.flop_counter import FlopCounterMode

from ddpm_fast import UNet
from ddpm_fast._backends import cpu_has_bf16_units

diffusers = pytest.importorskip("diffusers")

DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
EAGER = ["ddpm_fast", "diffusers"]
COMPILED = ["ddpm_fast-compile", "diffusers-compile"] + (["ddpm_fast-compile-ro"] if ON_CUDA else [])
# (preset, batch, implementations)
CASES = [("cifar10", 128, EAGER + COMPILED)] if ON_CUDA else [("cifar10", 2, EAGER), ("tiny", 8, EAGER + COMPILED)]
PARAMS = [(preset, batch, impl) for preset, batch, impls in CASES for impl in impls]
COMPILE_STEPS = ON_CUDA or os.environ.get("DDPM_FAST_BENCH_COMPILE") == "1"
STEP_PARAMS = [p for p in PARAMS if COMPILE_STEPS or "compile" not in p[2]]


@functools.cache
def _models(preset: str) -> tuple[UNet, torch.nn.Module]:
    torch.manual_seed(0)
    ours = UNet.from_preset(preset).to(DEVICE)
    theirs = ours.to_diffusers().to(DEVICE, memory_format=torch.channels_last)
    return ours, theirs


def _inputs(model: UNet, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    c, s = model.config.in_channels, model.config.sample_size
    x = torch.randn(batch, c, s, s, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), generator=g).to(DEVICE)
    return x, t, torch.randn_like(x)


def _call(model: torch.nn.Module, impl: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE != torch.float32):
        out = model(x, t)
    return out if impl.startswith("ddpm_fast") else out.sample


def _compiled(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    if impl == "ddpm_fast-compile":
        return compile_fn(model)
    if impl == "ddpm_fast-compile-ro":
        return torch.compile(model, fullgraph=True, dynamic=False, mode="reduce-overhead")
    if impl == "diffusers-compile":
        return torch.compile(model, dynamic=False)  # no fullgraph promise from diffusers
    return model


@functools.cache
def _flops(preset: str, batch: int, train: bool) -> int:
    _, theirs = _models(preset)
    x, t, noise = _inputs(_models(preset)[0], batch)
    theirs.train(train)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
        out = _call(theirs, "diffusers", x, t)
        if train:
            F.mse_loss(out.float(), noise).backward()
    theirs.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _record(roofline, preset: str, batch: int) -> None:
    stats = roofline.benchmark.stats
    if stats is not None:
        info = roofline.benchmark.extra_info
        info.update({"images_per_s": batch / stats.stats.median, "batch": batch, "preset": preset})


def _case(roofline, preset: str, batch: int, impl: str, train: bool):
    """The benchmark group, and (module, callable model, x, t, noise, flops) for one case."""
    mode = "train-step" if train else "forward"
    roofline.benchmark.group = f"unet-{mode}-{preset}-b{batch}-{'bf16' if ON_CUDA else 'fp32'}"
    ours, theirs = _models(preset)
    base = ours if impl.startswith("ddpm_fast") else theirs
    base.train(train)
    return base, _compiled(base, impl), *_inputs(ours, batch), _flops(preset, batch, train=train)


@pytest.mark.parametrize("preset, batch, impl", PARAMS)
def test_unet_forward(roofline, preset, batch, impl):
    _, model, x, t, _, flops = _case(roofline, preset, batch, impl, train=False)

    def fn():
        with torch.no_grad():
            return _call(model, impl, x, t)

    roofline(fn, flops=flops, flop_dtype=DTYPE, warmup=3 if "compile" in impl else 1)
    _record(roofline, preset, batch)


@pytest.mark.parametrize("preset, batch, impl", STEP_PARAMS)
def test_unet_train_step(roofline, preset, batch, impl):
    base, model, x, t, noise, flops = _case(roofline, preset, batch, impl, train=True)
    # separate optimizer state per case; fused AdamW where the device has it
    opt = torch.optim.AdamW(base.parameters(), lr=1e-5, fused=ON_CUDA)

    def fn():
        loss = F.mse_loss(_call(model, impl, x, t).float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    roofline(fn, flops=flops, flop_dtype=DTYPE, warmup=3 if "compile" in impl else 1)
    _record(roofline, preset, batch)


AUTOCAST_CASES = [
    (preset, batch, impl, amp)
    for preset, batch in (("cifar10", 8), ("tiny", 64))
    for impl in EAGER
    for amp in ("fp32", "bf16")
]


@pytest.mark.skipif(ON_CUDA or not cpu_has_bf16_units(), reason="a CPU with bf16 units (AMX or AVX512-BF16)")
@pytest.mark.parametrize("preset, batch, impl, amp", AUTOCAST_CASES)
def test_unet_forward_cpu_autocast(roofline, preset, batch, impl, amp):
    roofline.benchmark.group = f"unet-forward-{preset}-b{batch}-cpu-autocast"
    ours, theirs = _models(preset)
    model = (ours if impl == "ddpm_fast" else theirs).eval()
    x, t, _ = _inputs(ours, batch)
    flops = _flops(preset, batch, train=False)

    def fn():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            out = model(x, t)
        return out if impl == "ddpm_fast" else out.sample

    roofline(fn, flops=flops, flop_dtype=torch.bfloat16 if amp == "bf16" else torch.float32, warmup=1)
    _record(roofline, preset, batch)
    roofline.benchmark.extra_info["autocast"] = amp
