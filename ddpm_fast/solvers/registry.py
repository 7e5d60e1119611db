"""Scheduler names and diffusers scheduler classes -> our solvers, and the options each one takes
from a scheduler config (ours or a diffusers config dict)."""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Mapping
from typing import Any

from ..schedule import Schedule, SchedulerConfig, final_alpha_cumprod, normalize_choice
from .base import SCHEDULE_KEYS, schedule_from_dict
from .posterior import PosteriorSolver

# scheduler= name -> "module:Class" of the solver (imported on use)
SOLVER_CLASSES = {
    "dpmsolver++": "dpmsolver:DPMSolverMultistep",
    "unipc": "unipc:UniPCMultistep",
    "euler": "euler:EulerDiscrete",
    "euler_ancestral": "euler:EulerAncestralDiscrete",
    "heun": "heun:HeunDiscrete",
    "pc": "pc:PredictorCorrector",
}
SCHEDULER_NAMES = ("ddpm", "ddim", *SOLVER_CLASSES)
# diffusers scheduler class -> scheduler= name
DIFFUSERS_NAMES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmsolver++",
    "UniPCMultistepScheduler": "unipc",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
}
# Our DDPM/DDIM config's variance types that mean "no learned variance" to the other solvers.
_FIXED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


def solver_class(name: str) -> type:
    module, cls = SOLVER_CLASSES[name].split(":")
    try:
        return getattr(importlib.import_module(f"{__package__}.{module}"), cls)
    except (ImportError, AttributeError) as err:  # a solver still being written
        raise ValueError(f"scheduler {name!r} is not available in this build ({err})") from err


def resolve(
    scheduler: str | Any,
    scheduler_config: SchedulerConfig | Mapping[str, Any] | Schedule | None,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    options: Mapping[str, Any] | None = None,
) -> tuple[str, Any, SchedulerConfig | Schedule]:
    """(name, solver, schedule source) from a scheduler name plus config, or from a diffusers
    scheduler object (its config read, its state untouched). The schedule source is a
    ``SchedulerConfig`` or the given ``Schedule``. ``options`` (diffusers' names) override the
    sampler's options from either, but never the noise schedule (``sampling_option_names``)."""
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"scheduler_options must be a mapping of option names to values, got {type(options).__name__}")
    options = dict(options or {})
    if isinstance(scheduler, str):
        name = normalize_choice("scheduler", scheduler.lower(), SCHEDULER_NAMES)
        config: Mapping[str, Any] | None
        if scheduler_config is None:
            config, source = None, SchedulerConfig()
        elif isinstance(scheduler_config, Schedule):
            config, source = None, scheduler_config
        elif isinstance(scheduler_config, SchedulerConfig):
            config, source = scheduler_config.to_dict(), scheduler_config
        elif isinstance(scheduler_config, Mapping):
            config, source = scheduler_config, None
        else:
            raise TypeError(
                "scheduler_config must be a SchedulerConfig, a diffusers scheduler config dict or a Schedule, "
                f"got {type(scheduler_config).__name__}"
            )
        ours = not isinstance(scheduler_config, Mapping)  # our own config: no diffusers keys to warn about
    else:
        cls_name = type(scheduler).__name__
        if cls_name not in DIFFUSERS_NAMES or not hasattr(scheduler, "config"):
            raise TypeError(
                f"scheduler must be a name ({', '.join(SCHEDULER_NAMES)}) or a diffusers scheduler "
                f"({', '.join(DIFFUSERS_NAMES)}), got {cls_name}"
            )
        if scheduler_config is not None:
            raise ValueError("a diffusers scheduler carries its config: do not pass scheduler_config as well")
        name, config, source, ours = DIFFUSERS_NAMES[cls_name], dict(scheduler.config), None, False

    if name in ("ddpm", "ddim"):
        if source is None:
            source = SchedulerConfig.from_dict(config)
        if options:
            source = _posterior_source_with(source, name, options)
        step_source = source.config if isinstance(source, Schedule) else source
        return name, PosteriorSolver.from_scheduler_config(name, step_source, eta, use_clipped_model_output), source

    if eta != 0 or use_clipped_model_output:
        raise ValueError(f"eta and use_clipped_model_output are DDIM options; scheduler={name!r} does not take them")
    cls = solver_class(name)
    if source is None:
        source = schedule_from_dict(config).config
    if config is None:
        config = source.config.to_dict() if isinstance(source, Schedule) else source.to_dict()
    merged = solver_options(cls, config, quiet=ours)
    if options:
        check_sampling_options(name, options)
        merged = {**merged, **options}
    return name, cls.from_config(merged), source


def sampling_option_names(name: str) -> tuple[str, ...]:
    """The options ``scheduler_options`` may set for the named sampler: its config's fields less the
    noise schedule and the prediction type, which belong to the trained model (for DDPM and DDIM
    the spacing, clipping, thresholding, variance type and ``set_alpha_to_one``)."""
    cls = SchedulerConfig if name in ("ddpm", "ddim") else solver_class(name)
    return tuple(sorted(f.name for f in dataclasses.fields(cls) if f.name not in SCHEDULE_KEYS))


def check_sampling_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuses option names the named sampler lacks and the noise schedule's keys (values are the
    solver's to check)."""
    valid = sampling_option_names(name)
    for key in options:
        if key in SCHEDULE_KEYS:
            raise ValueError(
                f"scheduler_options: {key!r} belongs to the noise schedule the model was trained with (it comes "
                "from scheduler_config or the checkpoint), not to the sampler"
            )
        if key not in valid:
            raise ValueError(f"scheduler_options: {name} has no option {key!r}; its options: {', '.join(valid)}")


def _posterior_source_with(
    source: SchedulerConfig | Schedule, name: str, options: Mapping[str, Any]
) -> SchedulerConfig | Schedule:
    """DDPM / DDIM's schedule source with sampling options replaced (validated by SchedulerConfig)."""
    check_sampling_options(name, options)
    if isinstance(source, SchedulerConfig):
        return dataclasses.replace(source, **options)
    config = dataclasses.replace(source.config, **options)
    # the coefficient table stays (the schedule keys are unchanged); DDIM's final a_bar follows set_alpha_to_one
    final = final_alpha_cumprod(config, float(source.alphas_cumprod[0]))
    return dataclasses.replace(source, config=config, final_alpha_cumprod=final)


# What our own SchedulerConfig (a model's training config) says about the model; its sampling
# options (spacing, clipping, thresholding) are DDPM's and stay out of the other solvers.
MODEL_KEYS = ("prediction_type", "variance_type")
# Default number of timesteps per sampler (DDPM / DDIM: PosteriorSolver.default_steps).
DEFAULT_STEPS = {"dpmsolver++": 20, "unipc": 20, "euler": 50, "euler_ancestral": 50, "heun": 25, "pc": 1000}


def default_steps(name: str, solver: Any, schedule: Schedule) -> int:
    if isinstance(solver, PosteriorSolver):
        return solver.default_steps(schedule)
    return min(DEFAULT_STEPS[name], schedule.config.num_train_timesteps)


def step_fn_for(solver: Any, plan: Any):
    """The step function of a plan with non-linear (Langevin) steps, else None."""
    if getattr(plan, "langevin_snr", None) is not None and any(plan.langevin_snr):
        from .pc import pc_step

        return pc_step
    return None


def solver_options(cls: type, config: Mapping[str, Any], quiet: bool) -> dict[str, Any]:
    """The config keys a solver takes. From our own config (``quiet``): the schedule and what it
    says about the model (prediction and variance type), the solver's defaults for the rest. From
    a diffusers config: every key, as diffusers' ``from_config`` takes them, except DDPM/DDIM keys
    this solver lacks (dropped, with a warning unless the config is a DDPM/DDIM scheduler's);
    keys no scheduler of ours knows are left for the solver to warn about."""
    fields = {f.name for f in dataclasses.fields(cls)}
    options = dict(config)
    if options.get("variance_type") in _FIXED_VARIANCES:
        options["variance_type"] = None
    if quiet:
        return {k: v for k, v in options.items() if (k in MODEL_KEYS and k in fields) or k in SCHEDULE_KEYS}
    ddpm_keys = {f.name for f in dataclasses.fields(SchedulerConfig)}
    dropped = sorted(k for k in options if k in ddpm_keys and k not in fields and k not in SCHEDULE_KEYS)
    if dropped and not str(options.get("_class_name", "")).startswith(("DDPM", "DDIM")):
        warnings.warn(f"ignoring scheduler config keys {cls.__name__} does not use: {dropped}", stacklevel=3)
    return {k: v for k, v in options.items() if k not in dropped}
