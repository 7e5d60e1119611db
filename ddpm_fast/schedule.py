"""Noise schedules, the coefficient table and timestep selection.

Names, defaults and semantics follow diffusers' ``DDPMScheduler`` / ``DDIMScheduler``
configs so that a diffusers ``scheduler_config.json`` can be passed as it is. Every
coefficient is computed in float64 from the betas, then cast where a kernel needs it
(diffusers builds its table in float32; its cumprod differs from ours by up to ~5e-5
relative near t = T).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")

_ALIASES = {
    "cosine": "squaredcos_cap_v2",
    "eps": "epsilon",
    "x0": "sample",
    "x_0": "sample",
    "v": "v_prediction",
}


def normalize_choice(kind: str, value: str, valid: Sequence[str]) -> str:
    """Map a short alias to diffusers' name and reject unknown values with the valid list."""
    value = _ALIASES.get(value, value)
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


@dataclass(frozen=True)
class SchedulerConfig:
    """diffusers-compatible scheduler configuration (the union of DDPM's and DDIM's)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    set_alpha_to_one: bool = True

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("beta_schedule", normalize_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES))
        set_("prediction_type", normalize_choice("prediction_type", self.prediction_type, PREDICTION_TYPES))
        set_("variance_type", normalize_choice("variance_type", self.variance_type, VARIANCE_TYPES))
        set_("timestep_spacing", normalize_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS))
        if self.trained_betas is not None:
            set_("trained_betas", tuple(float(b) for b in self.trained_betas))
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise ValueError("dynamic_thresholding_ratio must be in (0, 1]")
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise ValueError(
                "rescale_betas_zero_snr gives alpha_bar_T = 0, where epsilon prediction divides by zero: "
                "use prediction_type='v_prediction' or 'sample'"
            )

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> SchedulerConfig:
        """Build from a diffusers scheduler config dict (keys starting with '_' are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in known}
        unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
        if unknown:
            warnings.warn(f"ignoring scheduler config keys ddpm_fast does not use: {unknown}", stacklevel=2)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["trained_betas"] = list(self.trained_betas) if self.trained_betas is not None else None
        return d


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas capped at max_beta."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=np.float64,
    )


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0 (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def make_betas(config: SchedulerConfig) -> np.ndarray:
    """The beta_t for t = 0..T-1, in float64."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float64)
        if betas.shape != (T,):
            raise ValueError(f"trained_betas has {betas.size} values, num_train_timesteps is {T}")
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, T, dtype=np.float64)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=np.float64) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(T)
    else:  # sigmoid
        sig = 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, T, dtype=np.float64)))
        betas = sig * (config.beta_end - config.beta_start) + config.beta_start
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    if np.any(betas <= 0) or np.any(betas > 1):
        raise ValueError("betas must lie in (0, 1]")
    return betas


def final_alpha_cumprod(config: SchedulerConfig, first_alpha_cumprod: float) -> float:
    """DDIM's a_bar before t = 0 (diffusers' final_alpha_cumprod): 1 with set_alpha_to_one, else a_bar_0."""
    return 1.0 if config.set_alpha_to_one else first_alpha_cumprod


@dataclass(frozen=True, eq=False)
class Schedule:
    """The frozen coefficient table of one noise schedule, on one device.

    ``alphas_cumprod`` etc. are float64 tensors of shape (T,); ``kernel_table(dtype)`` gives
    the casts that kernels read. Build with ``Schedule.from_config``.
    """

    config: SchedulerConfig
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # fresh on replace()

    @classmethod
    def from_config(
        cls,
        config: SchedulerConfig | Mapping[str, Any] | None = None,
        device: torch.device | str = "cpu",
        **overrides: Any,
    ) -> Schedule:
        if config is None:
            config = SchedulerConfig(**overrides)
        elif isinstance(config, Mapping):
            config = SchedulerConfig.from_dict({**config, **overrides})
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        betas = make_betas(config)
        alphas_cumprod = np.cumprod(1.0 - betas)
        final = final_alpha_cumprod(config, float(alphas_cumprod[0]))
        to = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
        return cls(config=config, betas=to(betas), alphas_cumprod=to(alphas_cumprod), final_alpha_cumprod=final)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def zero_terminal_snr(self) -> bool:
        """alpha_bar_T = 0, read from the config (no tensor read, so it compiles and captures)."""
        betas = self.config.trained_betas
        return self.config.rescale_betas_zero_snr or (betas is not None and betas[-1] >= 1.0)

    def __post_init__(self) -> None:
        # Fill every cached table now: torch.compile cannot trace cached_property's first call.
        for name in _DERIVED:
            getattr(self, name)

    def to(self, device: torch.device | str) -> Schedule:
        if torch.device(device) == self.device:
            return self
        return Schedule(self.config, self.betas.to(device), self.alphas_cumprod.to(device), self.final_alpha_cumprod)

    # Derived coefficients (DDPM paper, eqs. 4, 6, 7), float64.
    @cached_property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @cached_property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])

    @cached_property
    def sqrt_alphas_cumprod(self) -> torch.Tensor:
        return self.alphas_cumprod.sqrt()

    @cached_property
    def sqrt_one_minus_alphas_cumprod(self) -> torch.Tensor:
        return (1.0 - self.alphas_cumprod).sqrt()

    @cached_property
    def sqrt_recip_alphas_cumprod(self) -> torch.Tensor:
        return self.alphas_cumprod.rsqrt()

    @cached_property
    def sqrt_recipm1_alphas_cumprod(self) -> torch.Tensor:
        return (1.0 / self.alphas_cumprod - 1.0).sqrt()

    @cached_property
    def posterior_variance(self) -> torch.Tensor:
        """beta~_t = (1 - a_bar_{t-1}) / (1 - a_bar_t) * beta_t (eq. 7)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @cached_property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        """log beta~_t with the t = 0 entry (which is 0) replaced by the t = 1 one."""
        v = self.posterior_variance
        return torch.log(torch.cat([v[1:2], v[1:]]))

    @cached_property
    def posterior_mean_coef1(self) -> torch.Tensor:
        """Coefficient of x_0 in mu~_t (eq. 7)."""
        return self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)

    @cached_property
    def posterior_mean_coef2(self) -> torch.Tensor:
        """Coefficient of x_t in mu~_t (eq. 7)."""
        return (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    @cached_property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio a_bar_t / (1 - a_bar_t)."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def kernel_table(
        self, name: str, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """A contiguous cast of one coefficient (e.g. 'alphas_cumprod') on ``device``, cached."""
        device = self.device if device is None else torch.device(device)
        key = (name, dtype, device)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=device, dtype=dtype).contiguous()
        return self._cache[key]

    # Timestep selection for sampling with fewer steps.
    def timesteps(self, num_inference_steps: int | None = None, custom: Sequence[int] | None = None) -> torch.Tensor:
        """Descending int64 timesteps, as diffusers' ``set_timesteps`` picks them."""
        return torch.from_numpy(select_timesteps(self.config, num_inference_steps, custom)).to(self.device)

    def previous_timesteps(self, timesteps: torch.Tensor, kind: str = "ddpm") -> torch.Tensor:
        """prev_t for each t of ``timesteps`` (-1 marks the last step), as diffusers steps them.

        DDPM steps to the next entry of the list; diffusers' DDIM steps to t - T // n whatever
        the spacing (any negative value means "past the end", so it is clamped to -1).
        """
        if kind == "ddpm":
            return torch.cat([timesteps[1:], timesteps.new_full((1,), -1)])
        if kind == "ddim":
            return (timesteps - self.num_train_timesteps // timesteps.numel()).clamp(min=-1)
        raise ValueError(f"unknown sampler kind {kind!r}; valid: ddpm, ddim")


_DERIVED = [name for name, value in vars(Schedule).items() if isinstance(value, cached_property)]


def select_timesteps(
    config: SchedulerConfig, num_inference_steps: int | None, custom: Sequence[int] | None = None
) -> np.ndarray:
    T = config.num_train_timesteps
    if custom is not None:
        if num_inference_steps is not None:
            raise ValueError("pass either num_inference_steps or custom timesteps, not both")
        ts = np.asarray(list(custom), dtype=np.int64)
        if ts.ndim != 1 or ts.size == 0:
            raise ValueError("custom timesteps must be a non-empty 1-D list")
        if np.any(ts[1:] >= ts[:-1]):
            raise ValueError("custom timesteps must be in descending order")
        if ts[0] >= T or ts[-1] < 0:
            raise ValueError(f"custom timesteps must lie in [0, {T - 1}]")
        return ts
    n = T if num_inference_steps is None else int(num_inference_steps)
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif config.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + config.steps_offset
    else:  # trailing: diffusers' np.arange(T, 0, -T/n) can round to n+1 values (the last -1); keep n
        ts = np.round(np.arange(T, 0, -T / n)[:n]).astype(np.int64) - 1
    if ts.max() >= T or ts.min() < 0:
        raise ValueError(f"steps_offset={config.steps_offset} pushes timesteps past {T - 1}")
    return ts


SAMPLER_KINDS = ("ddpm", "ddim")


@dataclass(frozen=True)
class StepConfig:
    """What one reverse step does: the sampler kind and the scheduler options that shape it.

    ``eta`` and ``use_clipped_model_output`` are DDIM's (diffusers passes them to ``step``).
    """

    kind: str = "ddpm"
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    eta: float = 0.0
    use_clipped_model_output: bool = False

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("kind", normalize_choice("sampler kind", self.kind, SAMPLER_KINDS))
        set_("prediction_type", normalize_choice("prediction_type", self.prediction_type, PREDICTION_TYPES))
        set_("variance_type", normalize_choice("variance_type", self.variance_type, VARIANCE_TYPES))
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.kind == "ddpm" and self.eta != 0:
            raise ValueError("eta is a DDIM option; DDPM's noise level is set by variance_type")
        if self.clip_sample_range <= 0 or self.sample_max_value <= 0:
            raise ValueError("clip_sample_range and sample_max_value must be > 0")
        if not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise ValueError("dynamic_thresholding_ratio must be in (0, 1]")

    @classmethod
    def from_scheduler(cls, config: SchedulerConfig, kind: str = "ddpm", **overrides: Any) -> StepConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"kind", "eta", "use_clipped_model_output"}
        return cls(kind=kind, **{**{n: getattr(config, n) for n in names}, **overrides})

    @property
    def learned_variance(self) -> bool:
        return self.variance_type in ("learned", "learned_range")
