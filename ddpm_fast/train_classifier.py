"""Training the noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, sec. 4):
``ddpm-fast train --task classifier`` (or ``train(TrainConfig(task="classifier", ...))``).

The diffusion trainer (``ddpm_fast.train.Trainer``) with another loss: each step draws t ~ U{0..T-1}
per image, noises the batch with the fused ``q_sample`` on the run's schedule (the diffusion model's
--num-train-timesteps / --beta-schedule: the classifier must see the x_t the sampler will show it),
and minimises the cross-entropy of ``classifier(x_t, t)`` against the labels. Everything else is the
trainer's own: the data pipeline, seeding per (seed, step, rank, micro-batch), AdamW with warm-up and
gradient clipping, EMA, autocast (bf16 / fp16 with GradScaler), gradient accumulation, DDP, atomic
checkpoints (the classifier's config in ``config.json``), resume. No sample grids are written.
``--preset`` names a classifier preset (``ddpm_fast.classifier.PRESETS``: tiny, classifier).
Load the EMA weights for sampling with ``Classifier.load(run_dir)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from .ops import q_sample
from .schedule import Schedule
from .train import TrainConfig, Trainer, _step_seed


class ClassifierTrainer(Trainer):
    """``Trainer`` for ``task="classifier"``: labels always read (the dataset must have them), the
    cross-entropy on noised images as the loss, no sample grids. The diffusion-loss options
    (loss, learned variances, timestep importance sampling, min-SNR) do not apply and are refused."""

    def __init__(self, config: TrainConfig, **kwargs) -> None:
        if config.task != "classifier":
            raise ValueError(f"ClassifierTrainer trains task='classifier', got task={config.task!r}")
        wrong = [
            f"{name}={getattr(config, name)!r}"
            for name, default in (("loss", "simple"), ("timestep_sampler", "uniform"), ("min_snr_gamma", None))
            if getattr(config, name) != default
        ]
        if config.variance_type in ("learned", "learned_range"):
            wrong.append(f"variance_type={config.variance_type!r}")
        if wrong:
            raise ValueError(f"--task classifier trains a classifier: {', '.join(wrong)} apply to diffusion training")
        # the labels are the target: read them every step; no label dropout (that is classifier-free guidance's)
        super().__init__(dataclasses.replace(config, class_conditional=True, cfg_dropout=0.0), **kwargs)

    def loss_on(self, x0: torch.Tensor, labels: torch.Tensor | None, micro: int) -> torch.Tensor:
        """Cross-entropy of the classifier on x_t ~ q(x_t | x0) at uniform timesteps."""
        config = self.config
        g = self.generator
        g.manual_seed(_step_seed(config.seed, self.step, self.dist.rank, micro))
        t = torch.randint(0, config.num_train_timesteps, (x0.shape[0],), generator=g, device=self.device)
        if config.noise == "torch":
            noise = torch.randn(x0.shape, generator=g, device=self.device, dtype=x0.dtype)
            x_t = q_sample(x0, t, self.schedule, noise=noise, backend=config.q_sample_backend)[0]
        else:
            x_t = q_sample(x0, t, self.schedule, generator=g, backend=config.q_sample_backend)[0]
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            logits = self.forward_model(x_t, t)
        return F.cross_entropy(logits.float(), labels)

    def write_samples(self) -> Path | None:
        return None  # a classifier draws no images


@torch.no_grad()
def noised_accuracy(
    classifier: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    schedule: Schedule,
    timesteps: list[int],
    seed: int = 0,
    batch_size: int = 256,
) -> dict[int, float]:
    """The classifier's accuracy on ``images`` (N, C, H, W) in [-1, 1] noised to each of ``timesteps``
    (noise from ``seed`` alone, the same for every t): {t: accuracy}."""
    device = next(classifier.parameters()).device
    result = {}
    for t_value in timesteps:
        correct = 0
        g = torch.Generator(device="cpu").manual_seed(seed)
        for lo in range(0, len(images), batch_size):
            x0 = images[lo : lo + batch_size].to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            t = torch.full((x0.shape[0],), t_value, dtype=torch.int64, device=device)
            x_t = q_sample(x0, t, schedule.to(device), noise=noise)[0]
            correct += int((classifier(x_t, t).argmax(1).cpu() == labels[lo : lo + batch_size]).sum())
        result[int(t_value)] = correct / len(images)
    return result
