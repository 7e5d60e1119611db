"""DDPM (ancestral) and DDIM as solvers: their plan is the run's timesteps and where each step goes
(t -> prev_t) with the step's options; the step itself is the fused ``posterior_step`` kernel
(``ops/posterior.py``), whose float64 reference is ``reference.posterior_step``. Their update is
not a fixed linear mix: a learned variance makes sigma depend on the model output, so they keep
their own kernel behind the same loop interface as the linear solvers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..schedule import Schedule, SchedulerConfig, StepConfig, select_timesteps


@dataclass(frozen=True, eq=False)
class PosteriorPlan:
    """S steps of DDPM or DDIM: the model's t and the step's target prev_t (-1: to x0), on the
    host and on the device, and the step's options."""

    host_timesteps: np.ndarray
    host_prev_timesteps: np.ndarray
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    config: StepConfig
    init_noise_sigma: float = 1.0

    @property
    def num_steps(self) -> int:
        return len(self.host_timesteps)

    @property
    def draws(self) -> tuple[bool, ...]:
        """Where diffusers' ``step`` draws noise: DDPM where t > 0, DDIM wherever eta > 0."""
        if self.config.kind == "ddim":
            return (self.config.eta > 0,) * self.num_steps
        return tuple(bool(t > 0) for t in self.host_timesteps)

    @property
    def stochastic(self) -> bool:
        return self.config.kind == "ddpm" or self.config.eta > 0

    @property
    def learned_variance(self) -> bool:
        return self.config.learned_variance

    def tail(self, keep: int) -> PosteriorPlan:
        """The last ``keep`` steps (SDEdit / img2img starts part-way down)."""
        lo = self.num_steps - keep
        return dataclasses.replace(
            self,
            host_timesteps=self.host_timesteps[lo:],
            host_prev_timesteps=self.host_prev_timesteps[lo:],
            timesteps=self.timesteps[lo:],
            prev_timesteps=self.prev_timesteps[lo:],
        )


@dataclass(frozen=True)
class PosteriorSolver:
    """DDPM ("ddpm") or DDIM ("ddim") with diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` options."""

    config: StepConfig

    @classmethod
    def from_scheduler_config(
        cls, kind: str, config: SchedulerConfig, eta: float = 0.0, use_clipped_model_output: bool = False
    ) -> PosteriorSolver:
        if kind == "ddpm":
            if eta != 0:
                raise ValueError(
                    f"eta={eta} is a DDIM option: use scheduler='ddim' (DDPM's noise is set by variance_type)"
                )
            if use_clipped_model_output:
                raise ValueError("use_clipped_model_output is a DDIM option: use scheduler='ddim'")
            return cls(StepConfig.from_scheduler(config, "ddpm"))
        return cls(
            StepConfig.from_scheduler(config, "ddim", eta=float(eta), use_clipped_model_output=use_clipped_model_output)
        )

    @classmethod
    def from_config(cls, kind: str, config: Mapping[str, Any], **options: Any) -> PosteriorSolver:
        return cls.from_scheduler_config(kind, SchedulerConfig.from_dict(config), **options)

    @property
    def kind(self) -> str:
        return self.config.kind

    def default_steps(self, schedule: Schedule) -> int:
        """diffusers' pipelines: all T steps for DDPM, 50 for DDIM."""
        T = schedule.config.num_train_timesteps
        return T if self.kind == "ddpm" else min(50, T)

    def plan(
        self,
        schedule: Schedule,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> PosteriorPlan:
        if self.config.prediction_type == "epsilon" and schedule.zero_terminal_snr:
            raise ValueError(
                "epsilon prediction divides by zero on a zero-terminal-SNR schedule: use v_prediction or sample"
            )
        config = schedule.config
        T = config.num_train_timesteps
        if timesteps is None and num_inference_steps is None:
            num_inference_steps = self.default_steps(schedule)
        ts = select_timesteps(config, num_inference_steps, timesteps)
        if self.kind == "ddim" and timesteps is None:
            prev_ts = np.maximum(ts - T // len(ts), -1)  # diffusers' DDIM: t - T // n whatever the spacing
        else:
            prev_ts = np.append(ts[1:], -1)
        device = schedule.device if device is None else torch.device(device)
        return PosteriorPlan(
            host_timesteps=ts,
            host_prev_timesteps=prev_ts,
            timesteps=torch.as_tensor(ts, device=device),
            prev_timesteps=torch.as_tensor(prev_ts, device=device),
            config=self.config,
        )
