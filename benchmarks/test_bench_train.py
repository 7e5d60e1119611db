"""Training throughput (images/s): one optimizer step of ddpm_fast's trainer against the plain PyTorch
loop users write today with diffusers (``UNet2DModel`` + ``DDPMScheduler.add_noise`` + MSE + AdamW +
grad clip + a Python-loop EMA), same architecture (``UNet.to_diffusers``), batch and device.

One step = noise + timesteps + q_sample (ours: fused, noise drawn in-kernel) + forward + loss +
backward + clip + AdamW + EMA. FLOPs are 3x the forward pass's (counted with FlopCounterMode).
CUDA: the cifar10 preset (35.7M parameters) at 32x32, batch 128, bf16 autocast, eager and
torch.compile'd model. CPU: the tiny preset at 16x16, batch 64, fp32, one torch thread, eager
(issue 21's CPU case; torch.compile of a training step costs minutes on 2 cores: set
DDPM_FAST_BENCH_COMPILE=1 to include it); extra_info.time_split: one profiled step's time in
convolutions and elsewhere.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_CUDA, time_split
from torch.utils.flop_counter import FlopCounterMode

from ddpm_fast.train import TrainConfig, Trainer

PRESET, BATCH, SIZE = ("cifar10", 128, 32) if ON_CUDA else ("tiny", 64, 16)
MIXED = "bf16" if ON_CUDA else "no"
COMPILE = ON_CUDA or os.environ.get("DDPM_FAST_BENCH_COMPILE") == "1"
IMPLS = ["ddpm_fast", "diffusers"] + (["ddpm_fast-compile", "diffusers-compile"] if COMPILE else [])
GROUP = f"train-step-{PRESET}-{SIZE}px-b{BATCH}-{MIXED if ON_CUDA else 'fp32'}"


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _trainer(tmp_path, compile_model: bool) -> Trainer:
    config = TrainConfig(
        dataset="shapes",
        image_size=SIZE,
        preset=PRESET,
        batch_size=BATCH,
        warmup_steps=0,
        mixed_precision=MIXED,
        compile=compile_model,
        device=str(DEVICE),
        out=str(tmp_path / "run"),
        sample_images=0,
        progress=False,
    )
    return Trainer(config)


def _forward_flops(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops()


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(roofline, tmp_path, impl):
    trainer = _trainer(tmp_path, compile_model=impl == "ddpm_fast-compile")
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(BATCH, 3, SIZE, SIZE, generator=gen) * 2 - 1).to(DEVICE)
    labels = torch.zeros(BATCH, dtype=torch.int64, device=DEVICE)
    t_probe = torch.randint(0, 1000, (BATCH,), device=DEVICE)
    flops = 3 * _forward_flops(trainer.model, x0, t_probe)
    amp = torch.bfloat16 if MIXED == "bf16" else None

    if impl.startswith("ddpm_fast"):
        batches = itertools.repeat((x0, labels))
        fn = lambda: trainer.train_step(batches)  # noqa: E731
    else:
        diffusers = pytest.importorskip("diffusers")
        unet = trainer.model.to_diffusers().to(DEVICE).train()
        model = torch.compile(unet) if impl == "diffusers-compile" else unet
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
        params = list(unet.parameters())
        ema = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=2e-4)

        def fn():
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (BATCH,), device=DEVICE)
            x_t = scheduler.add_noise(x0, noise, t)
            with torch.autocast(DEVICE.type, dtype=amp or torch.float32, enabled=amp is not None):
                pred = model(x_t, t).sample
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for e, p in zip(ema, params, strict=True):
                    e.mul_(0.9999).add_(p, alpha=1 - 0.9999)
            return loss

    roofline(fn, flops=flops, flop_dtype=amp or torch.float32, warmup=3 if "compile" in impl else 2)
    stats = roofline.benchmark.stats
    if stats is not None:
        roofline.benchmark.extra_info["images_per_s"] = BATCH / stats.stats.median
        roofline.benchmark.extra_info["batch"] = BATCH
        roofline.benchmark.extra_info["preset"] = PRESET
        roofline.benchmark.extra_info["image_size"] = SIZE
        roofline.benchmark.extra_info["torch_threads"] = torch.get_num_threads()
        roofline.benchmark.extra_info["time_split"] = time_split(fn)
