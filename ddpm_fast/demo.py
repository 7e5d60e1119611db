"""``ddpm-fast demo``: train the tiny U-Net on the built-in digits on the CPU and score its samples.

Steps: train the digits classifier of ``ddpm_fast.metrics`` (a few seconds); sample from the
untrained U-Net; train (class-conditional by default) for ``steps`` steps or ``time_limit``
seconds, whichever comes first; sample from the EMA weights with DDIM; write both grids; print
the classifier FID against the held-out digits (and the class accuracy when conditional) of the
untrained samples, the trained samples and real training digits. The demo passes when the trained
samples' FID is at most ``threshold`` times the untrained model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .train import TrainConfig

DEMO_DEFAULTS = {
    "out": "ddpm_demo",
    "steps": 2000,
    "time_limit": 420.0,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_steps": 100,
    "conditional": True,
    "num_images": 200,
    "sample_steps": 25,
    "guidance_scale": None,
    "threshold": 0.1,
    "seed": 0,
    "progress": True,
}
IMAGE_SIZE = 16


@dataclass
class DemoResult:
    """What the demo measured (FIDs are classifier FIDs against the held-out digits)."""

    passed: bool
    fid_trained: float
    fid_untrained: float
    fid_real: float
    accuracy_trained: float | None
    accuracy_untrained: float | None
    accuracy_real: float
    steps: int
    train_seconds: float
    wall_seconds: float
    grid: Path
    untrained_grid: Path


def sample_digits(model: nn.Module, n: int, steps: int, scheduler_config, labels, seed: int, **kwargs) -> torch.Tensor:
    """``n`` images drawn with ``sample`` (DDIM unless ``scheduler=`` says otherwise), noise from
    ``seed``, no progress bar, clamped to [-1, 1]; ``kwargs`` go to ``sample``. The demo's grids, and
    the digits quality benchmarks' samples (benchmarks/quality_common.py)."""
    from .sampler import sample

    kwargs.setdefault("scheduler", "ddim")
    return sample(
        model,
        batch_size=n,
        num_inference_steps=steps,
        scheduler_config=scheduler_config,
        class_labels=labels,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
        **kwargs,
    ).clamp(-1, 1)


def demo_train_config(out: str | Path, options: dict = DEMO_DEFAULTS, **fields) -> TrainConfig:
    """The demo's training run: the tiny U-Net on the 16x16 digits on the CPU, with the steps, time
    limit, batch size, learning rate, warm-up, seed and progress of ``options`` (the demo's options),
    EMA 0.999 and no checkpoints or sample grids along the way; ``fields`` (TrainConfig fields, e.g.
    ``class_conditional``) are added or replace these."""
    from .train import TrainConfig

    o = options
    config = {
        "dataset": "digits",
        "image_size": IMAGE_SIZE,
        "preset": "tiny",
        "steps": o["steps"],
        "time_limit": o["time_limit"],
        "batch_size": o["batch_size"],
        "lr": o["lr"],
        "warmup_steps": o["warmup_steps"],
        "ema_decay": 0.999,
        "seed": o["seed"],
        "out": str(out),
        "checkpoint_every": 0,
        "keep_checkpoints": 1,
        "sample_images": 0,
        "log_every": 25,
        "progress": o["progress"],
        "device": "cpu",
    }
    return TrainConfig(**{**config, **fields})


def run_demo(**options) -> DemoResult:
    """Run the demo with ``DEMO_DEFAULTS`` overridden by ``options``; prints a report."""
    import copy

    from .data import make_dataset
    from .images import save_grid
    from .metrics import class_accuracy, classifier_fid, train_classifier
    from .train import Trainer

    unknown = sorted(set(options) - set(DEMO_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown demo option(s): {', '.join(unknown)}")
    o = {**DEMO_DEFAULTS, **options}
    if o["num_images"] < 10:
        raise ValueError(f"num_images must be >= 10 (the FID needs a few images per class), got {o['num_images']}")
    start = time.perf_counter()
    out = Path(o["out"])
    say = print

    classifier = train_classifier("digits", IMAGE_SIZE, o["seed"])
    test_x, test_y = make_dataset("digits", image_size=IMAGE_SIZE, split="test").tensors()
    train_x, train_y = make_dataset("digits", image_size=IMAGE_SIZE, split="train").tensors()
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(o["seed"]))[: o["num_images"]]
    real_x, real_y = train_x[pick], train_y[pick]
    say(f"digits classifier: {classifier.heldout_accuracy:.1%} held-out accuracy ({time.perf_counter() - start:.0f} s)")

    trainer = Trainer(demo_train_config(out, o, class_conditional=o["conditional"]))
    labels = torch.arange(o["num_images"]) % 10 if o["conditional"] else None
    guidance = o["guidance_scale"] if o["conditional"] else None
    sample_args = (o["num_images"], o["sample_steps"], trainer.scheduler_config, labels, o["seed"])

    untrained = sample_digits(copy.deepcopy(trainer.ema.model), *sample_args, guidance_scale=guidance)
    t_train = time.perf_counter()
    try:
        result = trainer.train()
    finally:
        trainer.close()
    train_seconds = time.perf_counter() - t_train
    trained = sample_digits(result.ema_model, *sample_args, guidance_scale=guidance)

    # 10 per row: with conditional samples, column k holds the digit k
    grid = save_grid(trained[:100], out / "samples.png", nrow=10, scale=4)
    untrained_grid = save_grid(untrained[:100], out / "untrained.png", nrow=10, scale=4)
    fid_trained = classifier_fid(classifier, trained, test_x)
    fid_untrained = classifier_fid(classifier, untrained, test_x)
    fid_real = classifier_fid(classifier, real_x, test_x)
    acc_real = class_accuracy(classifier, real_x, real_y)
    acc_trained = class_accuracy(classifier, trained, labels) if labels is not None else None
    acc_untrained = class_accuracy(classifier, untrained, labels) if labels is not None else None
    wall = time.perf_counter() - start
    passed = fid_trained <= o["threshold"] * fid_untrained

    n = o["num_images"]
    say("")
    say(
        f"{result.step} training steps in {train_seconds:.0f} s; {n} DDIM-{o['sample_steps']} samples each; "
        f"total {wall:.0f} s"
    )
    say(
        f"classifier FID vs {len(test_x)} held-out digits (lower is better)"
        + ("; class accuracy" if labels is not None else "")
    )
    rows = [
        ("untrained U-Net", fid_untrained, acc_untrained),
        ("trained U-Net (EMA)", fid_trained, acc_trained),
        (f"real digits ({n} training images)", fid_real, acc_real),
    ]
    for name, fid_value, acc in rows:
        say(f"  {name:<34} FID {fid_value:9.3f}" + (f"   accuracy {acc:6.1%}" if acc is not None else ""))
    say(f"samples: {grid}   (untrained: {untrained_grid})")
    verdict = "PASS" if passed else "FAIL"
    say(
        f"{verdict}: trained FID {fid_trained:.3f} {'<=' if passed else '>'} {o['threshold']} x untrained FID "
        f"{fid_untrained:.3f}"
    )
    return DemoResult(
        passed=passed,
        fid_trained=fid_trained,
        fid_untrained=fid_untrained,
        fid_real=fid_real,
        accuracy_trained=acc_trained,
        accuracy_untrained=acc_untrained,
        accuracy_real=acc_real,
        steps=result.step,
        train_seconds=train_seconds,
        wall_seconds=wall,
        grid=grid,
        untrained_grid=untrained_grid,
    )
