"""Rows 1-3 of the headline run: sample(), the training step and the U-Net alone.

Every implementation runs the same weights: one ``ddpm_fast.UNet`` (random initialisation,
seed 0) and its diffusers ``UNet2DModel`` copy made with ``UNet.to_diffusers()``. FLOPs per image
are counted once with ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy whose
ops run the plain-PyTorch reference (so attention's two matmuls are counted; a custom op would
count as nothing), and used for every implementation: the same arithmetic.

Ours runs as users would run it fast: ``sample(..., compile=True)`` (its default CUDA graph
on CUDA, bf16 autocast) and ``Trainer`` with ``compile=True`` and bf16. diffusers runs as its
users do: ``DDPMPipeline`` / ``DDIMPipeline`` with the U-Net in fp32 or cast to fp16, and a
``train_unconditional``-style loop: ``DDPMScheduler.add_noise``, MSE, AdamW with that script's
defaults, grad clipping at 1, ``diffusers.training_utils.EMAModel`` (the script's EMA), bf16
autocast (what accelerate's mixed_precision="bf16" does); its noise is drawn on the device
(the script draws it on the CPU and copies it over, which would only slow diffusers down).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import shutil
import tempfile
import time
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..sampler import sample
from ..train import TrainConfig, Trainer
from ..unet import UNet, UNetConfig
from .measure import measure, optional_import, sync
from .report import Row

if TYPE_CHECKING:
    from .run import Context

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAPH_FAILED = "CUDA-graph capture failed"


def unet_flops(config: UNetConfig) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one image through a U-Net of ``config``."""
    with torch.device("meta"):
        model = UNet(config, backend="reference")
    c, s = config.in_channels, config.sample_size
    x = torch.empty(1, c, s, s, device="meta")
    t = torch.zeros(1, dtype=torch.int64, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        model(x, t).float().square().mean().backward()
    return forward, counter.get_total_flops()


def _autocast(ctx: Context, dtype: torch.dtype | None):
    """Autocast as the Trainer enters it (a disabled one for fp32)."""
    return torch.autocast(ctx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _sampling_autocast(ctx: Context, dtype: torch.dtype | None):
    """Autocast as sample() enters it (none for fp32, no weight cache): the same compiled graph."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=dtype, cache_enabled=False)


def _peak_pct(ctx: Context, flops_per_s: float) -> float | None:
    return 100 * flops_per_s / ctx.peak_flops if ctx.peak_flops else None


def _generator(ctx: Context) -> torch.Generator:
    return torch.Generator(ctx.device).manual_seed(0)


# ---------------------------------------------------------------- 1. sample()
def _sample_row(ctx: Context, kind: str, steps: int, impl: str, dtype: str, seconds: float, **data) -> Row:
    n = ctx.sizes.num_images
    flops_per_s = ctx.flops_forward * n * steps / seconds
    return Row(
        section="sample",
        case=f"{kind.upper()} {steps} steps x {n} images",
        impl=impl,
        dtype=dtype,
        seconds=seconds,
        rate=n / seconds,
        unit="img/s",
        peak_pct=_peak_pct(ctx, flops_per_s),
        peak_of=ctx.peak_label,
        data={"steps": steps, "images": n, "TFLOP/s": flops_per_s / 1e12, **data},
    )


def _sample_cases(ctx: Context) -> list[tuple[str, int]]:
    return [("ddpm", ctx.sizes.ddpm_steps), ("ddim", ctx.sizes.ddim_steps)]


def sample_ours(ctx: Context) -> None:
    """sample() with our U-Net: a 3-step run first (compilation, cuDNN, the graph path), then
    the timed runs (one at >= 500 steps)."""
    s = ctx.sizes
    model = ctx.unet().eval()
    dtype = DTYPES[s.model_dtype]
    for kind, steps in _sample_cases(ctx):

        def run(n: int = steps, kind: str = kind) -> object:
            return sample(
                model,
                batch_size=s.num_images,
                scheduler=kind,
                num_inference_steps=n,
                generator=_generator(ctx),
                dtype=dtype,
                compile=s.compile,
                output_type="pt",
                progress=False,
            )

        graphs_before = ctx.compiled_graphs()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            run(min(3, steps))
            sync(ctx.device)
            warm = time.perf_counter() - start
            timing = measure(run, ctx.device, repeats=1 if steps >= 500 else s.repeats, warmup=0)
        messages = sorted({str(w.message) for w in caught})
        graph = ctx.device.type == "cuda" and not any(GRAPH_FAILED in m for m in messages)
        impl = "ddpm_fast sample()" + (" compiled" if s.compile else " eager") + (" + CUDA graph" if graph else "")
        ctx.report.add(
            _sample_row(
                ctx,
                kind,
                steps,
                impl,
                s.model_dtype,
                timing.median,
                timing=timing.to_dict(),
                first_run_s=warm,
                compile=s.compile,
                cuda_graph=graph,
                new_compiled_graphs=ctx.compiled_graphs() - graphs_before,
                warnings=messages,
            )
        )


def sample_diffusers(ctx: Context) -> None:
    """DDPMPipeline / DDIMPipeline with the same weights, fp32 and cast to fp16. The fp32 DDPM
    run may be timed over fewer steps (sizes.diffusers_ddpm_fp32_steps): its time is then scaled
    to the full step count, and the row says so."""
    s = ctx.sizes
    planned = [(d, kind, steps) for d in s.diffusers_dtypes for kind, steps in _sample_cases(ctx)]
    if "fp16" not in s.diffusers_dtypes:
        ctx.report.skip(
            "sample", "diffusers pipelines in fp16", f"not in the '{s.name}' sizes (half precision is a GPU setting)"
        )
    if ctx.diffusers is None:
        for d, kind, steps in planned:
            ctx.report.skip("sample", f"diffusers {kind.upper()} {steps} steps ({d})", ctx.diffusers_missing)
        return
    diffusers = ctx.diffusers
    theirs = ctx.unet().to_diffusers().eval()
    measured: dict[str, dict[str, Row]] = {}
    for d in s.diffusers_dtypes:
        unet = theirs if d == "fp32" else copy.deepcopy(theirs).to(DTYPES[d])
        for kind, steps in _sample_cases(ctx):
            what = f"diffusers {kind.upper()} {steps} steps ({d})"
            pipe_cls = diffusers.DDPMPipeline if kind == "ddpm" else diffusers.DDIMPipeline
            scheduler = diffusers.DDPMScheduler() if kind == "ddpm" else diffusers.DDIMScheduler()
            pipe = pipe_cls(unet=unet, scheduler=scheduler)
            pipe.set_progress_bar_config(disable=True)
            timed_steps = min(steps, s.diffusers_ddpm_fp32_steps) if (kind, d) == ("ddpm", "fp32") else steps

            def run(n: int = timed_steps, pipe=pipe) -> object:
                with torch.no_grad():
                    return pipe(
                        batch_size=s.num_images, generator=_generator(ctx), num_inference_steps=n, output_type="pt"
                    ).images

            start = time.perf_counter()
            run(min(3, timed_steps))
            sync(ctx.device)
            per_step = (time.perf_counter() - start) / min(3, timed_steps)
            repeats = 1 if timed_steps >= 500 else s.repeats
            if not ctx.budget.fits(per_step * timed_steps * repeats):
                ctx.report.skip("sample", what, ctx.budget.why(per_step * timed_steps * repeats))
                continue
            timing = measure(run, ctx.device, repeats=repeats, warmup=0)
            seconds = timing.median * steps / timed_steps
            note = ""
            if timed_steps != steps:
                note = f"timed over {timed_steps} of the {steps} steps; time x {steps / timed_steps:g}"
            row = _sample_row(
                ctx,
                kind,
                steps,
                f"diffusers {pipe_cls.__name__}",
                d,
                seconds,
                timing=timing.to_dict(),
                timed_steps=timed_steps,
            )
            row.note = note
            measured.setdefault(kind, {})[d] = ctx.report.add(row)
        del unet
    for rows in measured.values():  # the base: half precision (how GPU users run diffusers), else fp32
        rows[next(d for d in ("fp16", "fp32", *rows) if d in rows)].baseline = True
    ctx.free_memory()


# ---------------------------------------------------------------- 2. training
def _train_row(ctx: Context, impl: str, per_step: float, **data) -> Row:
    s = ctx.sizes
    images_per_s = s.train_batch / per_step
    flops_per_s = ctx.flops_forward_backward * images_per_s
    return Row(
        section="train",
        case=f"{s.preset} step, batch {s.train_batch}",
        impl=impl,
        dtype=s.model_dtype,
        seconds=per_step,
        rate=images_per_s,
        unit="img/s",
        peak_pct=_peak_pct(ctx, flops_per_s),
        peak_of=ctx.peak_label,
        data={"batch": s.train_batch, "TFLOP/s": flops_per_s / 1e12, "MFU_%": _peak_pct(ctx, flops_per_s), **data},
    )


def _train_batch(ctx: Context) -> torch.Tensor:
    s = ctx.sizes
    g = torch.Generator().manual_seed(1)
    return (torch.rand(s.train_batch, 3, s.image_size, s.image_size, generator=g) * 2 - 1).to(ctx.device)


def train_ours(ctx: Context) -> None:
    """Trainer.train_step (fused q_sample with in-kernel noise, forward, loss, backward, clip,
    AdamW, EMA): the first block of steps compiles, then blocks of sizes.train_steps are timed."""
    s = ctx.sizes
    model = ctx.unet().train()
    ctx.train_dir = ctx.train_dir or tempfile.mkdtemp(prefix="ddpm_fast_headline_")
    config = TrainConfig(
        dataset="shapes",
        image_size=s.image_size,
        preset=s.preset,
        batch_size=s.train_batch,
        warmup_steps=0,
        mixed_precision="bf16" if s.model_dtype == "bf16" else "no",
        compile=s.compile,
        device=str(ctx.device),
        out=ctx.train_dir,
        sample_images=0,
        progress=False,
    )
    trainer = Trainer(config, model=model)
    ctx.trainer = trainer
    x0 = _train_batch(ctx)
    batches = itertools.repeat((x0, torch.zeros(s.train_batch, dtype=torch.int64)))

    def steps() -> None:
        for _ in range(s.train_steps):
            trainer.train_step(batches)

    graphs_before = ctx.compiled_graphs()
    timing = measure(steps, ctx.device, repeats=s.repeats, warmup=1)
    ctx.train_compile_s = timing.warmup_s
    impl = "ddpm_fast Trainer" + (" compiled" if s.compile else " eager")
    ctx.report.add(
        _train_row(
            ctx,
            impl,
            timing.median / s.train_steps,
            steps_per_run=s.train_steps,
            timing=timing.to_dict(),
            new_compiled_graphs=ctx.compiled_graphs() - graphs_before,
        )
    )


def train_diffusers(ctx: Context) -> None:
    s = ctx.sizes
    variants = ["eager", "compiled"]
    if ctx.diffusers is None:
        for v in variants:
            ctx.report.skip("train", f"diffusers training loop ({v})", ctx.diffusers_missing)
        return
    training_utils, why = optional_import("diffusers.training_utils")
    if training_utils is None:
        for v in variants:
            ctx.report.skip("train", f"diffusers training loop ({v})", f"its EMAModel: {why}")
        return
    if not s.compile:
        ctx.report.skip("train", "diffusers training loop (compiled)", ctx.compile_off)
        variants.remove("compiled")
    EMAModel = training_utils.EMAModel  # noqa: N806 (diffusers' class)
    unet = ctx.unet().to_diffusers().train()
    scheduler = ctx.diffusers.DDPMScheduler(num_train_timesteps=1000)
    amp = DTYPES[s.model_dtype] if s.model_dtype != "fp32" else None
    x0 = _train_batch(ctx)
    params = list(unet.parameters())
    measured = []
    for variant in variants:
        what = f"diffusers training loop ({variant})"
        if variant == "compiled" and ctx.train_compile_s and not ctx.budget.fits(ctx.train_compile_s):
            ctx.report.skip("train", what, ctx.budget.why(ctx.train_compile_s))
            continue
        model = torch.compile(unet) if variant == "compiled" else unet
        # train_unconditional.py's defaults: AdamW(lr 1e-4, betas (0.95, 0.999), wd 1e-6, eps 1e-8),
        # EMAModel(max decay 0.9999, warm-up with inv_gamma 1, power 3/4), clip 1.0
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        ema = EMAModel(params, decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)

        def step(model=model, opt=opt, ema=ema) -> None:
            noise = torch.randn(x0.shape, device=ctx.device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=ctx.device)
            noisy = scheduler.add_noise(x0, noise, t)
            with _autocast(ctx, amp):
                pred = model(noisy, t).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.step(params)

        def steps(step=step) -> None:
            for _ in range(s.train_steps):
                step()

        timing = measure(steps, ctx.device, repeats=s.repeats, warmup=1)
        row = _train_row(
            ctx, f"diffusers loop {variant}", timing.median / s.train_steps, steps_per_run=s.train_steps,
            timing=timing.to_dict(),
        )  # fmt: skip
        measured.append(ctx.report.add(row))
        del opt, ema
    if measured:
        measured[-1].baseline = True  # the base: the strongest diffusers setting measured (compiled, else eager)
    del unet
    ctx.free_memory()


# ---------------------------------------------------------------- 3. the U-Net alone
def unet_forward(ctx: Context) -> None:
    """Our U-Net's forward at the sampling batch, called as sample() calls it (same compiled
    graph: no_grad, autocast without its weight cache, fp32 NCHW input)."""
    s = ctx.sizes
    model = ctx.unet().eval()
    fn = torch.compile(model, dynamic=False) if s.compile else model
    amp = DTYPES[s.model_dtype] if s.model_dtype != "fp32" else None
    g = torch.Generator().manual_seed(2)
    x = torch.randn(s.num_images, 3, s.image_size, s.image_size, generator=g).to(ctx.device)
    t = torch.randint(0, 1000, (s.num_images,), generator=g).to(ctx.device)

    def forward() -> object:
        with torch.no_grad(), _sampling_autocast(ctx, amp):
            return fn(x, t)

    graphs_before = ctx.compiled_graphs()
    timing = measure(forward, ctx.device, repeats=s.repeats, warmup=2, inner=s.unet_inner)
    _unet_row(ctx, f"forward, batch {s.num_images}", s.num_images, ctx.flops_forward, timing, graphs_before)


def unet_forward_backward(ctx: Context) -> None:
    """Forward + MSE + backward at the training batch (no optimizer), through the Trainer's own
    compiled model when the training row made one (same graph), else a fresh torch.compile."""
    s = ctx.sizes
    model = ctx.unet().train()
    if ctx.trainer is not None:
        fn = ctx.trainer.forward_model
    else:
        fn = torch.compile(model) if s.compile else model
    amp = DTYPES[s.model_dtype] if s.model_dtype != "fp32" else None
    g = torch.Generator().manual_seed(3)
    x = torch.randn(s.train_batch, 3, s.image_size, s.image_size, generator=g).to(ctx.device)
    t = torch.randint(0, 1000, (s.train_batch,), generator=g).to(ctx.device)
    target = torch.randn(x.shape, generator=g).to(ctx.device)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(ctx, amp):
            pred = fn(x, t)
        F.mse_loss(pred.float(), target).backward()

    graphs_before = ctx.compiled_graphs()
    timing = measure(forward_backward, ctx.device, repeats=s.repeats, warmup=2, inner=s.unet_inner)
    model.zero_grad(set_to_none=True)
    flops = ctx.flops_forward_backward
    _unet_row(ctx, f"forward+backward, batch {s.train_batch}", s.train_batch, flops, timing, graphs_before)


def _unet_row(ctx: Context, case: str, batch: int, flops_per_image: int, timing, graphs_before: int) -> None:
    s = ctx.sizes
    flops_per_s = flops_per_image * batch / timing.median
    ctx.report.add(
        Row(
            section="unet",
            case=case,
            impl=f"ddpm_fast UNet ({s.preset})" + (" compiled" if s.compile else " eager"),
            dtype=s.model_dtype,
            seconds=timing.median,
            rate=flops_per_s / 1e12,
            unit="TFLOP/s",
            peak_pct=_peak_pct(ctx, flops_per_s),
            peak_of=ctx.peak_label,
            data={
                "batch": batch,
                "images_per_s": batch / timing.median,
                "flops_per_image": flops_per_image,
                "timing": timing.to_dict(),
                "new_compiled_graphs": ctx.compiled_graphs() - graphs_before,
            },
        )
    )


def cleanup(ctx: Context) -> None:
    if ctx.trainer is not None:
        ctx.trainer.close()
        ctx.trainer = None
    if ctx.train_dir:
        shutil.rmtree(ctx.train_dir, ignore_errors=True)
        ctx.train_dir = None
