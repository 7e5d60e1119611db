"""The trainer: DDPM training with the fused q_sample, EMA, mixed precision, checkpoints and DDP.

One optimizer step (Ho et al. 2020, Algorithm 1): per-sample uniform timesteps t ~ U{0..T-1};
``q_sample`` writes x_t and the training target (eps, x_0 or v) in one pass; the model predicts
the target under autocast; the loss is the per-sample MSE, optionally min-SNR-gamma weighted
(Hang et al. 2023); AdamW with a linear warm-up, grad-norm clipping, then an EMA update.

Randomness is a pure function of (seed, step, rank, micro-batch): each micro-batch re-seeds the
trainer's own generator, so a resumed run draws exactly what the uninterrupted run would have,
whatever happened in between (sample grids, evaluation). The data order comes from the loader's
(seed, epoch, index) state, saved in each checkpoint.

Multi-process: under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel (NCCL on CUDA, gloo on CPU), each rank reads its shard of every global
batch, and rank 0 alone writes checkpoints, sample grids and metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt
from . import reference, vlb
from .ema import EMA
from .ops import no_value_checks, q_sample, vlb_terms
from .schedule import BETA_SCHEDULES, PREDICTION_TYPES, Schedule, SchedulerConfig, normalize_choice
from .solvers.registry import SCHEDULER_NAMES, resolve

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
NOISE_SOURCES = ("kernel", "torch")
TRAIN_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
LOSSES = ("simple", "hybrid", "kl")
TASKS = ("diffusion", "classifier", "superres")
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every option of ``ddpm-fast train`` (the flags are these names with dashes)."""

    task: str = _opt(
        "diffusion",
        "what to train: diffusion (the U-Net), classifier (a noise-aware classifier p(y | x_t, t) on noised images, "
        "for classifier guidance: ddpm_fast.train_classifier; --preset then names a classifier preset) or superres "
        "(a super-resolution U-Net conditioned on each image downsampled to --low-res, a cascade's stage)",
    )
    # data
    dataset: str = _opt("digits", "built-in dataset: digits (8x8 digits upscaled), shapes (procedural), or folder")
    data_dir: str | None = _opt(None, "image folder for --dataset folder (subfolders = class labels)")
    image_size: int = _opt(16, "image side in pixels")
    class_conditional: bool = _opt(False, "condition the U-Net on the dataset's class labels")
    hflip: bool = _opt(False, "random horizontal flips (a pure function of seed, epoch and image)")
    num_workers: int = _opt(0, "data loader worker processes")
    # latent diffusion (ddpm_fast.latent)
    latent_autoencoder: str | None = _opt(
        None,
        "train in the latent space of this local diffusers AutoencoderKL / VQModel folder: the dataset is encoded "
        "once into a latent cache (--image-size is then the pixel size fed to the autoencoder)",
    )
    latent_cache: str | None = _opt(None, "latent cache root (default: OUT/latent_cache); one subfolder per encoding")
    latent_posterior: str = _opt("mode", "latents: mode (the posterior mean) or sample (a draw seeded per image)")
    latent_shard_size: int = _opt(1024, "images per latent-cache shard (the unit of a resumed encode)")
    # model
    preset: str = _opt("tiny", "U-Net preset (ddpm_fast.unet presets, e.g. tiny, cifar10)")
    # super-resolution (--task superres): the U-Net conditioned on a low-resolution copy of each image
    low_res: int | None = _opt(
        None,
        "--task superres: side of the low-resolution conditioning image, made from each training image by area "
        "downsampling (a divisor of --image-size, e.g. 8 for 8 -> 16); the U-Net gets cond_channels",
    )
    cond_noise_min: int = _opt(0, "--task superres with --cond-noise-max: the lowest conditioning-augmentation level")
    cond_noise_max: int | None = _opt(
        None,
        "--task superres: conditioning augmentation (cascaded diffusion, Ho et al. 2021): noise the low-res image "
        "with q_sample at s ~ U{cond_noise_min..cond_noise_max} (timesteps; equal = a fixed level) and give s to "
        "the model (cond_noise_embedding); off by default",
    )
    # diffusion
    num_train_timesteps: int = _opt(1000, "diffusion steps T")
    beta_schedule: str = _opt("linear", f"beta schedule: {', '.join(BETA_SCHEDULES)} (cosine = squaredcos_cap_v2)")
    beta_start: float = _opt(0.0001, "first beta (linear, scaled_linear, sigmoid)")
    beta_end: float = _opt(0.02, "last beta (linear, scaled_linear, sigmoid)")
    prediction_type: str = _opt("epsilon", "what the model predicts: epsilon, sample (x0) or v_prediction")
    variance_type: str = _opt(
        "fixed_small",
        "variance of p(x_{t-1} | x_t): fixed_small, fixed_large, or learned by the model (2x output channels; "
        "--loss hybrid or kl): learned_range (improved-diffusion's interpolation, recommended) or learned "
        "(diffusers' meaning: the variance itself, trainable only where the output is > 0)",
    )
    loss: str = _opt(
        "simple",
        "simple (MSE on the prediction, Ho et al.), hybrid (simple + vlb_weight x L_vlb with the gradient into "
        "the variance only, Nichol & Dhariwal) or kl (the variational bound alone, x T)",
    )
    vlb_weight: float = _opt(0.001, "lambda of the hybrid loss: L_simple + lambda T E_t[L_t] (bits/dim)")
    timestep_sampler: str = _opt(
        "uniform",
        "timesteps: uniform, or loss-second-moment (importance sampling by the RMS of each t's last 10 losses, "
        "uniform until every t has 10; weights 1 / (T p_t); Nichol & Dhariwal)",
    )
    min_snr_gamma: float | None = _opt(None, "min-SNR-gamma loss weighting (e.g. 5); off by default")
    # optimisation
    steps: int = _opt(10000, "total optimizer steps (a resumed run continues up to this)")
    time_limit: float = _opt(0.0, "stop (with a checkpoint) after this many seconds of training (0: no limit)")
    batch_size: int = _opt(64, "global batch size per optimizer step (split over ranks and accumulation)")
    grad_accum: int = _opt(1, "gradient accumulation: micro-batches per optimizer step")
    lr: float = _opt(2e-4, "AdamW learning rate")
    warmup_steps: int = _opt(5000, "linear learning-rate warm-up steps (DDPM: 5000)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0: no clipping)")
    ema_decay: float = _opt(0.9999, "EMA decay, warmed up as min(decay, (1 + n) / (10 + n))")
    cfg_dropout: float = _opt(0.1, "probability of replacing a label by the null label (classifier-free guidance)")
    mixed_precision: str = _opt(
        "auto", "auto (bf16 on CUDA, fp16 + GradScaler without bf16, fp32 on CPU), no, bf16, fp16"
    )
    compile: bool = _opt(False, "torch.compile the model")
    noise: str = _opt("kernel", "training noise: kernel (drawn inside q_sample) or torch (torch.randn)")
    q_sample_backend: str | None = _opt(None, "q_sample backend (cpp, cuda, triton, reference); default: fastest")
    seed: int = _opt(0, "seed of the initialisation, noise, timesteps and data order")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    # outputs
    out: str = _opt("runs/ddpm", "run directory: checkpoints/, samples/, metrics.jsonl")
    resume: str | None = _opt(None, "resume from a checkpoint: a run or step directory, or 'auto' (this --out)")
    checkpoint_every: int = _opt(1000, "write a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _opt(3, "keep the last K checkpoints")
    sample_every: int = _opt(0, "write a sample grid from the EMA weights every N steps (0: only at the end)")
    sample_images: int = _opt(64, "images per sample grid (0: no grids)")
    sample_steps: int = _opt(50, "sampler steps for the grids")
    sample_scheduler: str = _opt("ddim", "sampler for the grids: " + ", ".join(SCHEDULER_NAMES))
    sample_scheduler_options: dict | None = _opt(
        None,
        "the grids' sampler options under diffusers' names, as sample()'s scheduler_options (flag: "
        "--sample-scheduler-option KEY=VALUE, repeatable; in a --config file, a table)",
    )
    eval_every: int = _opt(
        0, "FID of the EMA weights every N steps with the fast sampler, logged to metrics.jsonl (0: off)"
    )
    eval_samples: int = _opt(1000, "images per in-training FID (the same seeds each time)")
    eval_metric: str = _opt(
        "auto", "in-training metric: auto (fid with --eval-inception-weights, else classifier_fid), fid, classifier_fid"
    )
    eval_scheduler: str = _opt("dpmsolver++", "sampler of the in-training FID: " + ", ".join(SCHEDULER_NAMES))
    eval_steps: int = _opt(20, "sampler steps of the in-training FID")
    eval_scheduler_options: dict | None = _opt(
        None,
        "the in-training FID's sampler options under diffusers' names, e.g. solver_order=3 (flag: "
        "--eval-scheduler-option KEY=VALUE, repeatable; in a --config file, a table)",
    )
    eval_inception_weights: str | None = _opt(None, "pytorch-fid's Inception weights file for the in-training FID")
    eval_ref_stats: str | None = _opt(
        None, "reference statistics npz of the in-training FID (default for classifier_fid: the held-out split)"
    )
    log_every: int = _opt(50, "append metrics to metrics.jsonl every N steps")
    progress: bool = _opt(True, "show a tqdm progress bar")

    def __post_init__(self) -> None:
        self.prediction_type = normalize_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        self.beta_schedule = normalize_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.variance_type not in TRAIN_VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {self.variance_type!r}; valid: {', '.join(TRAIN_VARIANCE_TYPES)}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.timestep_sampler not in TIMESTEP_SAMPLERS:
            raise ValueError(
                f"unknown timestep_sampler {self.timestep_sampler!r}; valid: {', '.join(TIMESTEP_SAMPLERS)}"
            )
        learned = self.variance_type in ("learned", "learned_range")
        if learned and self.loss == "simple":
            raise ValueError(
                f"variance_type={self.variance_type!r}: L_simple does not train a variance; use the hybrid loss "
                "(--loss hybrid: L_simple + 0.001 L_vlb, Nichol & Dhariwal 2021) or --loss kl"
            )
        if self.loss == "hybrid" and not learned:
            raise ValueError(
                f"--loss hybrid trains a learned variance with L_vlb, but variance_type={self.variance_type!r} is "
                "fixed: use --variance-type learned_range (or learned), or --loss simple"
            )
        if not (self.vlb_weight >= 0 and math.isfinite(self.vlb_weight)):
            raise ValueError(f"vlb_weight must be a number >= 0, got {self.vlb_weight}")
        for name in ("steps", "batch_size", "grad_accum", "image_size", "num_train_timesteps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "sample_every", "sample_images", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.time_limit < 0:
            raise ValueError(f"time_limit must be >= 0 seconds, got {self.time_limit}")
        if self.log_every < 1 or self.sample_steps < 1:
            raise ValueError("log_every and sample_steps must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"unknown mixed_precision {self.mixed_precision!r}; valid: {', '.join(MIXED_PRECISION)}")
        if self.noise not in NOISE_SOURCES:
            raise ValueError(f"unknown noise {self.noise!r}; valid: {', '.join(NOISE_SOURCES)}")
        self.sample_scheduler = normalize_choice("sample_scheduler", self.sample_scheduler, SCHEDULER_NAMES)
        self.eval_scheduler = normalize_choice("eval_scheduler", self.eval_scheduler, SCHEDULER_NAMES)
        if self.eval_every < 0 or self.eval_samples < 2 or self.eval_steps < 1:
            raise ValueError("eval_every must be >= 0, eval_samples >= 2 and eval_steps >= 1")
        for use, prefix in ((self.sample_images, "sample"), (self.eval_every, "eval")):
            name, steps = getattr(self, f"{prefix}_scheduler"), getattr(self, f"{prefix}_steps")
            options = getattr(self, f"{prefix}_scheduler_options")
            if options is not None and not isinstance(options, Mapping):
                raise ValueError(f"{prefix}_scheduler_options must be a table of option = value, got {options!r}")
            if not use and options is None:
                continue
            # the sampler built now, as the grids / evaluation will: a bad option fails before training
            try:
                _, solver, _ = resolve(name, self.scheduler_config(), options=options)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{prefix}_scheduler_options: {str(e).removeprefix('scheduler_options: ')}") from e
            least = getattr(solver, "solver_order", 1)
            if use and steps < least:  # fail now, not after training up to the first grid
                raise ValueError(
                    f"{prefix}_steps={steps} is fewer than {prefix}_scheduler {name}'s solver_order={least}: "
                    f"ask for {prefix}_steps >= {least}"
                )
        if self.eval_metric not in ("auto", "fid", "classifier_fid"):
            raise ValueError(f"unknown eval_metric {self.eval_metric!r}; valid: auto, fid, classifier_fid")
        if self.eval_every:
            from .evaluation import training_eval_metric

            training_eval_metric(self)  # a missing file or dataset fails now, not at the first evaluation
        if self.latent_autoencoder is not None:
            if self.latent_posterior not in ("mode", "sample"):
                raise ValueError(f"unknown latent_posterior {self.latent_posterior!r}; valid: mode, sample")
            if self.latent_shard_size < 1:
                raise ValueError(f"latent_shard_size must be >= 1, got {self.latent_shard_size}")
            if self.loss != "simple":
                raise ValueError(
                    f"--latent-autoencoder trains with --loss simple, not {self.loss!r}: the bound's decoder term "
                    "models 8-bit pixels, not latents"
                )
            if self.eval_every:
                raise ValueError(
                    "--eval-every is not done for latent runs yet (it would score latents, not decoded images)"
                )
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("--dataset folder needs --data-dir")
        self._check_superres()

    def _check_superres(self) -> None:
        if self.task != "superres":
            if self.low_res is not None or self.cond_noise_max is not None or self.cond_noise_min:
                raise ValueError("--low-res, --cond-noise-min and --cond-noise-max apply to --task superres")
            return
        if self.low_res is None:
            raise ValueError("--task superres needs --low-res (the conditioning image's side, e.g. 8 for 8 -> 16)")
        if self.latent_autoencoder is not None:
            raise ValueError("--task superres trains in pixel space: --latent-autoencoder is not done for it")
        if self.eval_every:
            raise ValueError(
                "--eval-every is not done for --task superres yet (its evaluation samples without a conditioning "
                "image): score a cascade with ddpm_fast.sample_cascade and ddpm_fast.metrics"
            )
        if self.low_res < 1 or self.low_res >= self.image_size or self.image_size % self.low_res:
            raise ValueError(
                f"--low-res {self.low_res} must divide --image-size {self.image_size} and be smaller (the "
                "conditioning image is upsampled by an integer factor)"
            )
        if self.cond_noise_max is None:
            if self.cond_noise_min:
                raise ValueError("--cond-noise-min needs --cond-noise-max (conditioning augmentation is off)")
        elif not 0 <= self.cond_noise_min <= self.cond_noise_max < self.num_train_timesteps:
            raise ValueError(
                f"conditioning augmentation levels must satisfy 0 <= cond_noise_min <= cond_noise_max < "
                f"{self.num_train_timesteps} (timesteps), got {self.cond_noise_min} and {self.cond_noise_max}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict (a TOML file's table): keys are field names, dashes or underscores."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(k for k in kwargs if k not in known)
        if unknown:
            raise ValueError(f"unknown train option(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type=self.prediction_type,
            variance_type=self.variance_type,
        )


# Options that may change when a run is resumed; any other difference is an error.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "time_limit",
        "out",
        "resume",
        "checkpoint_every",
        "keep_checkpoints",
        "sample_every",
        "sample_images",
        "sample_steps",
        "sample_scheduler",
        "sample_scheduler_options",
        "eval_every",
        "eval_samples",
        "eval_metric",
        "eval_scheduler",
        "eval_steps",
        "eval_scheduler_options",
        "eval_inception_weights",
        "eval_ref_stats",
        "log_every",
        "progress",
        "num_workers",
        "compile",
        "device",
        "data_dir",
        "q_sample_backend",
        # where the autoencoder and cache live; the autoencoder's identity is checked from latent.json
        "latent_autoencoder",
        "latent_cache",
        "latent_shard_size",
    }
)


# Options added after checkpoints were first written, with the behaviour those runs had (resume fills them in).
ADDED_OPTION_DEFAULTS = {"loss": "simple", "vlb_weight": 0.001, "timestep_sampler": "uniform", "task": "diffusion"}
ADDED_OPTION_DEFAULTS["latent_posterior"] = "mode"
ADDED_OPTION_DEFAULTS.update(low_res=None, cond_noise_min=0, cond_noise_max=None)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    model: nn.Module
    ema_model: nn.Module
    step: int
    run_dir: Path
    last_checkpoint: Path | None
    last_loss: float | None
    images_per_second: float | None


# ---------------------------------------------------------------- helpers
def _step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A 63-bit seed for one micro-batch, independent of everything that happened before."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if mode == "no":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision='fp16' needs a CUDA device (GradScaler); use bf16 or no on the CPU")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _config_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key in RESUMABLE_CHANGES:
            continue
        if saved.get(key) != now.get(key):
            diffs.append(f"{key}: {saved.get(key)!r} in the checkpoint, {now.get(key)!r} now")
    return diffs


def _lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up to lr over warmup_steps, then constant (DDPM). ``step`` is 0-based."""
    if config.warmup_steps == 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def build_model(
    config: TrainConfig, in_channels: int, num_classes: int | None, sample_size: int | None = None
) -> nn.Module:
    """The U-Net preset for this data (1 or 3 channels, image_size, classes when conditional; twice the
    output channels for a learned variance); with ``task="classifier"`` the classifier preset."""
    from .unet import UNet

    if config.task == "classifier":
        from .classifier import build_classifier

        return build_classifier(config.preset, in_channels, num_classes, config.image_size)

    return UNet.from_preset(
        config.preset,
        in_channels=in_channels,
        out_channels=in_channels,
        sample_size=sample_size or config.image_size,
        num_classes=num_classes if config.class_conditional else None,
        learned_variance=config.variance_type in ("learned", "learned_range"),
        cond_channels=in_channels if config.task == "superres" else 0,
        cond_noise_embedding=config.task == "superres" and config.cond_noise_max is not None,
    )


class LossSecondMomentResampler:
    """Loss-aware importance sampling of timesteps (improved-diffusion's ``LossSecondMomentResampler``,
    Nichol & Dhariwal 2021 sec. 3.3): keep each t's last ``history`` losses; once every t has that
    many, draw t with p_t proportional to sqrt(E[L_t^2]) (mixed with ``uniform_prob`` of the uniform
    law) and weight its loss by 1 / (T p_t), so the expected loss is unchanged. Until then t is uniform
    (drawn exactly as the uniform sampler draws it) with weights 1.

    The history lives on the host in float64 (``update`` reads the losses: one device sync per
    micro-batch); under DDP every rank all-gathers (t, loss) of every rank and applies them in rank
    order, so all ranks hold the same history. ``state_dict`` goes into the checkpoint."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        if history < 2:
            raise ValueError(
                f"loss-second-moment sampling needs a history of at least 2 losses per timestep, got {history}"
            )
        self.num_timesteps, self.history, self.uniform_prob = num_timesteps, history, uniform_prob
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.int64)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        """(T,) float64 p_t of the importance law. Raises before every t has a full history."""
        if not self.warmed_up():
            missing = int((self.counts < self.history).sum())
            raise ValueError(
                f"loss-second-moment sampling has too little history: {missing} of {self.num_timesteps} timesteps "
                f"have fewer than {self.history} losses (it samples uniformly until then)"
            )
        w = self.losses.pow(2).mean(1).sqrt()
        w = w / w.sum() * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return w / w.sum()

    def sample(
        self, n: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(t, weights): t (n,) int64 on ``device``; weights (n,) float32, or None while uniform."""
        if not self.warmed_up():
            return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device), None
        p = self.probabilities()
        t = torch.multinomial(p.to(device), n, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p.to(device)[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each (t, loss) in order, the oldest dropped once a t has ``history`` of them."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            t, losses = _all_gather_cat(t), _all_gather_cat(losses.detach().float())
        for ti, loss in zip(t.tolist(), losses.detach().double().cpu().tolist(), strict=True):
            k = int(self.counts[ti])
            if k == self.history:
                self.losses[ti, :-1] = self.losses[ti, 1:].clone()
                self.losses[ti, -1] = loss
            else:
                self.losses[ti, k] = loss
                self.counts[ti] = k + 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        losses, counts = state["losses"], state["counts"]
        if tuple(losses.shape) != (self.num_timesteps, self.history) or tuple(counts.shape) != (self.num_timesteps,):
            raise ValueError(
                f"the timestep sampler's saved history has shape {tuple(losses.shape)}, expected "
                f"({self.num_timesteps}, {self.history})"
            )
        self.losses = losses.to(torch.float64).clone()
        self.counts = counts.to(torch.int64).clone()


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x (same shape on each), concatenated in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _Distributed:
    """The process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self, device_name: str) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = _resolve_device(device_name, self.local_rank)
        self.owns_group = False
        if self.world_size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True
        if dist.is_initialized():
            self.world_size, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


# ---------------------------------------------------------------- the trainer
class Trainer:
    """Holds the model, EMA, optimizer, data and run directory of one training run.

    ``Trainer(config).train()`` runs to ``config.steps`` (resuming first when ``config.resume``
    is set) and returns a ``TrainResult``. ``model`` may be given instead of being built from
    ``config.preset`` (it must take ``model(x, t, class_labels=None)``).
    """

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None) -> None:
        self.config = config
        self.dist = _Distributed(config.device)
        self.device = self.dist.device
        self.run_dir = Path(config.out)
        self.amp_dtype = _amp_dtype(config.mixed_precision, self.device)
        if config.batch_size % (self.dist.world_size * config.grad_accum):
            raise ValueError(
                f"batch_size {config.batch_size} must be divisible by world size {self.dist.world_size} x "
                f"grad_accum {config.grad_accum}"
            )
        self.micro_batch = config.batch_size // (self.dist.world_size * config.grad_accum)
        self.scheduler_config = config.scheduler_config()
        self.schedule = Schedule.from_config(self.scheduler_config, device=self.device)

        from .data import make_dataset

        self.dataset = make_dataset(
            config.dataset,
            image_size=config.image_size,
            split="train",
            hflip=config.hflip,
            seed=config.seed,
            root=config.data_dir if config.dataset == "folder" else None,
        )
        self.autoencoder, self.latent = None, None  # latent diffusion: the autoencoder and its latent.json record
        if config.latent_autoencoder is not None:
            from .latent import prepare_latent_dataset

            self.dataset, self.autoencoder, self.latent = prepare_latent_dataset(config, self.dataset, self.dist)
        sample_image, _ = self.dataset[0]
        self.in_channels = int(sample_image.shape[0])
        self.sample_size = int(sample_image.shape[-1])
        self.num_classes = getattr(self.dataset, "num_classes", None)
        if config.class_conditional and not self.num_classes:
            raise ValueError(f"--class-conditional needs a dataset with labels; {config.dataset!r} has none")

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        if model is None:
            model = build_model(config, self.in_channels, self.num_classes, self.sample_size)
        self.model = model.to(self.device)
        out_channels = getattr(getattr(self.model, "config", None), "model_out_channels", None)
        self.learned_variance = config.variance_type in ("learned", "learned_range")
        want = 2 * self.in_channels if self.learned_variance else self.in_channels
        if out_channels is not None and out_channels != want:
            raise ValueError(
                f"the model predicts {out_channels} channels for {self.in_channels}-channel images; "
                f"variance_type={config.variance_type!r} needs {want}"
            )
        cond_channels = getattr(getattr(self.model, "config", None), "cond_channels", None)
        if config.task == "superres" and cond_channels is not None and cond_channels != self.in_channels:
            raise ValueError(
                f"--task superres needs a U-Net conditioned on {self.in_channels}-channel images, the model has "
                f"cond_channels={cond_channels}"
            )
        self.resampler = (
            LossSecondMomentResampler(config.num_train_timesteps)
            if config.timestep_sampler == "loss-second-moment"
            else None
        )
        self.ema = EMA(self.model, config.ema_decay)
        # The fused AdamW kernel (one pass per tensor) on CUDA and on the CPU: on the CPU the foreach
        # path costs 12 ms a step for the tiny preset's 166 tensors, the fused one 3.2 ms.
        fused = self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=_lr_at(config, 0),
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
            fused=fused or None,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.loader = self._make_loader()
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.generator = torch.Generator(device=self.device)
        self.null_label = getattr(self.model, "null_class_label", None)
        if config.class_conditional and self.null_label is None and config.cfg_dropout > 0:
            raise ValueError("cfg_dropout needs a model with a null class label (model.null_class_label)")

        forward_model: nn.Module = self.model
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            forward_model = DistributedDataParallel(self.model, device_ids=ids)
        self.ddp_model = forward_model
        self.forward_model = torch.compile(forward_model) if config.compile else forward_model

    # -------------------------------------------------------- data
    def _make_loader(self):
        from .data import make_loader

        return make_loader(
            self.dataset,
            self.micro_batch,
            seed=self.config.seed,
            num_workers=self.config.num_workers,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            pin_memory=self.device.type == "cuda",
        )

    # -------------------------------------------------------- state
    def model_config_dict(self) -> dict:
        config = getattr(self.model, "config", None)
        return config.to_dict() if config is not None and hasattr(config, "to_dict") else {}

    def training_state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict(),
            "rng": rng,
            "data": self.loader.state_dict(),
            "world_size": self.dist.world_size,
            **({"timestep_sampler": self.resampler.state_dict()} if self.resampler is not None else {}),
        }

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0; the other ranks wait)."""
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir,
                self.step,
                keep_last=self.config.keep_checkpoints,
                model_state=self.model.state_dict(),
                ema_state=self.ema.model.state_dict(),
                model_config=self.model_config_dict(),
                scheduler_config=self.scheduler_config.to_dict(),
                train_config=self.config.to_dict(),
                training_state=self.training_state(),
                latent=self.latent,
            )
            self.last_checkpoint = path
        self.dist.barrier()
        return path

    def resume(self, path: str | os.PathLike) -> None:
        """Load weights, EMA, optimizer, scaler, RNG and data position from a checkpoint: a step
        directory, or a run (checkpoints) directory's newest intact one (``ckpt.load_for_resume``)."""
        loaded = ckpt.load_for_resume(path)
        # checkpoints from before these options existed trained with their defaults
        saved_config = {**ADDED_OPTION_DEFAULTS, **loaded.train_config}
        diffs = _config_differences(saved_config, self.config.to_dict())
        if loaded.model_config != self.model_config_dict():
            diffs.append("the U-Net config differs")
        if loaded.scheduler_config != self.scheduler_config.to_dict():
            diffs.append("the scheduler config differs")
        if (loaded.latent or {}).get("identity") != (self.latent or {}).get("identity"):
            diffs.append("the latent autoencoder differs (identity in latent.json)")
        state = loaded.training_state
        if state["world_size"] != self.dist.world_size:
            diffs.append(f"world size: {state['world_size']} in the checkpoint, {self.dist.world_size} now")
        if diffs:
            raise ValueError(
                f"checkpoint {loaded.path} comes from another configuration:\n  "
                + "\n  ".join(diffs)
                + "\nresume with the same settings, or train into a new --out directory"
            )
        self.model.load_state_dict(loaded.model_state)
        self.ema.model.load_state_dict(loaded.ema_state)
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["data"])
        if self.resampler is not None:
            if "timestep_sampler" not in state:
                raise ValueError(
                    f"checkpoint {loaded.path} holds no timestep-sampler history: it cannot resume "
                    "--timestep-sampler loss-second-moment exactly"
                )
            self.resampler.load_state_dict(state["timestep_sampler"])
        # torch's global RNG (used only by dropout inside the model) is rank 0's; the other ranks
        # keep their own stream, so a DDP resume is exact except for dropout masks on ranks > 0.
        if self.dist.is_main:
            torch.set_rng_state(state["rng"]["torch"])
            if torch.cuda.is_available() and "cuda" in state["rng"]:
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])
        self.last_checkpoint = loaded.path

    # -------------------------------------------------------- one step
    def loss_on(self, x0: torch.Tensor, labels: torch.Tensor | None, micro: int) -> torch.Tensor:
        """The (unscaled) loss of one micro-batch at the current step."""
        config = self.config
        g = self.generator
        g.manual_seed(_step_seed(config.seed, self.step, self.dist.rank, micro))
        n = x0.shape[0]
        if self.resampler is None:
            t, weights = torch.randint(0, config.num_train_timesteps, (n,), generator=g, device=self.device), None
        else:
            t, weights = self.resampler.sample(n, g, self.device)
        if labels is not None and config.cfg_dropout > 0:
            drop = torch.rand(n, generator=g, device=self.device) < config.cfg_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        if config.noise == "torch":
            noise = torch.randn(x0.shape, generator=g, device=self.device, dtype=x0.dtype)
            x_t, _, target = q_sample(
                x0, t, self.schedule, noise=noise, target=config.prediction_type, backend=config.q_sample_backend
            )
        else:
            x_t, _, target = q_sample(
                x0, t, self.schedule, generator=g, target=config.prediction_type, backend=config.q_sample_backend
            )
        conditioning = self._superres_inputs(x0, g) if config.task == "superres" else {}
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            kwargs = {"class_labels": labels} if labels is not None else {}
            pred = self.forward_model(x_t, t, **kwargs, **conditioning)
        pred = getattr(pred, "sample", pred)
        if config.loss == "simple" and self.resampler is None:
            return reference.diffusion_loss(
                pred, target, t, self.schedule, config.prediction_type, config.min_snr_gamma
            )
        per_sample = self._per_sample_loss(pred, x0, x_t, target, t)
        if self.resampler is not None:
            self.resampler.update(t, per_sample.detach())
        return (per_sample if weights is None else per_sample * weights).mean()

    def _superres_inputs(self, x0: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        """--task superres: the model's low_res (the batch area-downsampled, as improved-diffusion makes its
        super-resolution data), noised at s ~ U{cond_noise_min..cond_noise_max} (drawn after x_t's noise)
        and passed with aug_level=s when augmenting."""
        config = self.config
        low = torch.nn.functional.interpolate(x0, size=(config.low_res, config.low_res), mode="area")
        if config.cond_noise_max is None:
            return {"low_res": low}
        levels = (config.cond_noise_min, config.cond_noise_max + 1)
        s = torch.randint(*levels, (low.shape[0],), generator=g, device=self.device)
        if config.noise == "torch":
            noise = torch.randn(low.shape, generator=g, device=self.device, dtype=low.dtype)
            low = q_sample(low, s, self.schedule, noise=noise, backend=config.q_sample_backend)[0]
        else:
            low = q_sample(low, s, self.schedule, generator=g, backend=config.q_sample_backend)[0]
        return {"low_res": low, "aug_level": s}

    def _per_sample_loss(
        self, pred: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, target: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """(N,) float32: L_simple (min-SNR weighted when asked), + lambda T L_t (hybrid: the bound's term in
        bits/dim with the gradient into the variance channels only), or T L_t alone (kl)."""
        config = self.config
        c = x0.shape[1]
        mse = None
        if config.loss != "kl":
            mean_pred = pred[:, :c] if self.learned_variance else pred
            mse = (mean_pred.float() - target.float()).pow(2).flatten(1).mean(1)
            if config.min_snr_gamma is not None:
                snr = self.schedule.snr.to(mse.device)[t].float()
                mse = mse * reference.min_snr_weight(snr, config.min_snr_gamma, config.prediction_type)
            if config.loss == "simple":
                return mse
        terms = vlb_terms(
            pred,
            x0,
            x_t,
            t,
            self.schedule,
            prediction_type=config.prediction_type,
            variance_type=config.variance_type,
            mean_grad=config.loss == "kl",
        )
        scale = float(config.num_train_timesteps) * (config.vlb_weight if config.loss == "hybrid" else 1.0)
        bound = terms.float() * scale
        return bound if mse is None else mse + bound

    def _check_data_range(self, x0: torch.Tensor) -> None:
        """The bound's decoder models 8-bit data in [-1, 1]: the batch is checked on the host before it
        moves (the op's own check would sync the device every step)."""
        if x0.device.type == "cpu":
            vlb.check_8bit_range(x0, "the training data")

    def _check_labels(self, labels: torch.Tensor) -> None:
        """The batch's labels, checked on the host before they move (a check on the device would
        cost a sync every step): the data's classes are [0, num_classes)."""
        if labels.numel() and labels.device.type == "cpu":
            low, high = (int(v) for v in torch.aminmax(labels))
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"the dataset gave class labels {low}..{high}; the model was built for {self.num_classes} "
                    f"classes (labels 0..{self.num_classes - 1})"
                )

    def train_step(self, batches: Iterator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, grad norm), on device."""
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(config.grad_accum):
            x0, labels = next(batches)
            x0 = x0.to(self.device, non_blocking=True)
            if config.loss != "simple":
                self._check_data_range(x0)
            if config.class_conditional:
                self._check_labels(labels)
                labels = labels.to(self.device, non_blocking=True)
            else:
                labels = None
            last = micro == config.grad_accum - 1
            sync_ctx = self.ddp_model.no_sync() if (self.dist.world_size > 1 and not last) else contextlib.nullcontext()
            # The ops' and the U-Net's checks that read tensor values (timestep and label ranges)
            # would sync the host with the device on every step: the timesteps are drawn in range
            # here and the labels were checked on the host above.
            with sync_ctx, no_value_checks():
                loss = self.loss_on(x0, labels, micro) / config.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        lr = _lr_at(config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = None
        if config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model)
        self.step += 1
        return total, grad_norm

    # -------------------------------------------------------- outputs
    def write_samples(self) -> Path | None:
        """A grid of EMA samples at ``<run>/samples/step_XXXXXXXX.png`` (rank 0)."""
        config = self.config
        if not self.dist.is_main or config.sample_images == 0:
            return None
        from .images import save_grid
        from .sampler import sample

        n = config.sample_images
        generator = torch.Generator(device=self.device).manual_seed(config.seed)
        labels = None
        if config.class_conditional:
            labels = torch.arange(n, device=self.device) % self.num_classes
        if config.task == "superres":
            images = self._superres_samples(n, labels, generator)
            return save_grid(images, self.run_dir / "samples" / f"{ckpt.step_dir_name(self.step)}.png", scale=2)
        images = sample(
            self.ema.model,
            (self.in_channels, self.sample_size, self.sample_size),
            batch_size=n,
            num_inference_steps=config.sample_steps,
            scheduler=config.sample_scheduler,
            scheduler_config=self.scheduler_config,
            scheduler_options=config.sample_scheduler_options,
            class_labels=labels,
            generator=generator,
            output_type="tensor",
            progress=False,
            decode=self.autoencoder,
        )
        return save_grid(images, self.run_dir / "samples" / f"{ckpt.step_dir_name(self.step)}.png", scale=2)

    def evaluate_samples(self) -> dict:
        """FID of the EMA weights (``ddpm_fast.evaluation.TrainingEval``), appended to metrics.jsonl by rank 0."""
        from .evaluation import TrainingEval

        if getattr(self, "_evaluator", None) is None:
            shape = (self.in_channels, self.config.image_size, self.config.image_size)
            self._evaluator = TrainingEval(self.config, self.run_dir, self.device, shape, self.dist)
        record = self._evaluator(self.ema.model, self.scheduler_config, self.step)
        self._log(record)
        return record

    def _superres_samples(self, n: int, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """EMA super-resolution samples conditioned on the first n training images, downsampled (at the
        lowest augmentation level)."""
        from .cascade import super_resolve

        config = self.config
        k = min(n, len(self.dataset))
        x0 = torch.stack([self.dataset[i][0] for i in range(k)]).to(self.device)
        low = torch.nn.functional.interpolate(x0, size=(config.low_res, config.low_res), mode="area")
        return super_resolve(
            self.ema.model,
            low,
            aug_level=None if config.cond_noise_max is None else config.cond_noise_min,
            shape=tuple(x0.shape[1:]),
            scheduler=config.sample_scheduler,
            num_inference_steps=config.sample_steps,
            scheduler_config=self.scheduler_config,
            scheduler_options=config.sample_scheduler_options,
            class_labels=None if labels is None else labels[:k],
            generator=generator,
            progress=False,
        )

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        bad = int(first_bad.item())
        if self.dist.all_any(bad >= 0):
            where = f"at step {bad}" if bad >= 0 else "on another rank"
            good = self.last_checkpoint or "none (no checkpoint was written before it)"
            raise NonFiniteLossError(
                f"non-finite loss (NaN or Inf) {where}: training stopped. The last good checkpoint is {good}. "
                "Lower --lr, keep --grad-clip on, or use --mixed-precision no."
            )

    # -------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        config = self.config
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if config.resume is not None:
            path = self.run_dir if config.resume == "auto" else Path(config.resume)
            if config.resume != "auto" or ckpt.list_checkpoints(path / ckpt.CHECKPOINTS):
                self.resume(path)
        if self.dist.is_main:
            (self.run_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        from tqdm.auto import tqdm

        bar = tqdm(
            total=config.steps,
            initial=self.step,
            disable=not (config.progress and self.dist.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        # Loss checks read the device: every step on the CPU, every log_every steps on a GPU.
        check_every = 1 if self.device.type == "cpu" else config.log_every
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        batches = self.loader.forever()
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_start = 0, time.perf_counter()
        last_loss, images_per_s = None, None
        self.model.train()
        deadline = time.perf_counter() + config.time_limit if config.time_limit else None
        try:
            while self.step < config.steps:
                if deadline is not None and self.dist.all_any(time.perf_counter() > deadline):
                    break
                loss, grad_norm = self.train_step(batches)
                finite = torch.isfinite(loss)
                first_bad = torch.where(~finite & (first_bad < 0), torch.full_like(first_bad, self.step), first_bad)
                window_loss += torch.where(finite, loss, torch.zeros_like(loss))
                window_steps += 1
                checkpoint_now = config.checkpoint_every and self.step % config.checkpoint_every == 0
                log_now = self.step % config.log_every == 0 or self.step == config.steps
                if checkpoint_now or log_now or self.step % check_every == 0:
                    self._check_finite(first_bad)
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    last_loss = window_loss.item() / window_steps
                    images_per_s = window_steps * config.batch_size / max(elapsed, 1e-9)
                    record = {
                        "step": self.step,
                        "loss": last_loss,
                        "lr": _lr_at(config, self.step - 1),
                        "images_per_s": images_per_s,
                        "ema_decay": self.ema.decay_used,
                    }
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    self._log(record)
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{images_per_s:.1f}")
                    window_loss.zero_()
                    window_steps, window_start = 0, time.perf_counter()
                bar.update(1)
                if checkpoint_now:
                    self.save()
                if config.sample_every and self.step % config.sample_every == 0:
                    self.write_samples()
                if config.eval_every and self.step % config.eval_every == 0:
                    t_eval = time.perf_counter()
                    self.evaluate_samples()
                    window_start += time.perf_counter() - t_eval  # images/s leaves the evaluation out
            self._check_finite(first_bad)
            if self.last_checkpoint is None or self.last_checkpoint.name != ckpt.step_dir_name(self.step):
                self.save()
            if config.sample_images and not (config.sample_every and self.step % config.sample_every == 0):
                self.write_samples()
            if config.eval_every and self.step % config.eval_every:
                self.evaluate_samples()
        finally:
            bar.close()
        return TrainResult(
            model=self.model,
            ema_model=self.ema.model,
            step=self.step,
            run_dir=self.run_dir,
            last_checkpoint=self.last_checkpoint,
            last_loss=last_loss,
            images_per_second=images_per_s,
        )

    def close(self) -> None:
        self.dist.close()


def train(config: TrainConfig | None = None, **options: Any) -> TrainResult:
    """Train a DDPM with ``config`` (or ``TrainConfig(**options)``); see ``TrainConfig`` for the options."""
    if config is None:
        config = TrainConfig(**options)
    elif options:
        config = dataclasses.replace(config, **options)
    if config.task == "classifier":
        from .train_classifier import ClassifierTrainer

        trainer: Trainer = ClassifierTrainer(config)
    else:
        trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()
