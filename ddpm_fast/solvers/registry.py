"""Scheduler names and diffusers scheduler classes -> our solvers, and the options each one takes
from a scheduler config (ours or a diffusers config dict)."""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Mapping
from typing import Any

from ..schedule import Schedule, SchedulerConfig, normalize_choice
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
) -> tuple[str, Any, SchedulerConfig | Schedule]:
    """(name, solver, schedule source) from a scheduler name plus config, or from a diffusers
    scheduler object (its config read, its state untouched). The schedule source is a
    ``SchedulerConfig`` or the given ``Schedule``."""
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
        step_source = source.config if isinstance(source, Schedule) else source
        return name, PosteriorSolver.from_scheduler_config(name, step_source, eta, use_clipped_model_output), source

    if eta != 0 or use_clipped_model_output:
        raise ValueError(f"eta and use_clipped_model_output are DDIM options; scheduler={name!r} does not take them")
    cls = solver_class(name)
    if source is None:
        source = schedule_from_dict(config).config
    if config is None:
        config = source.config.to_dict() if isinstance(source, Schedule) else source.to_dict()
    return name, cls.from_config(solver_options(cls, config, quiet=ours)), source


# What our own SchedulerConfig (a model's training config) says about the model; its sampling
# options (spacing, clipping, thresholding) are DDPM's and stay out of the other solvers.
MODEL_KEYS = ("prediction_type", "variance_type")
# Default number of timesteps per sampler (DDPM / DDIM: PosteriorSolver.default_steps).
DEFAULT_STEPS = {"dpmsolver++": 20, "unipc": 20, "euler": 50, "euler_ancestral": 50, "heun": 25, "pc": 1000}


def default_steps(name: str, solver: Any, schedule: Schedule) -> int:
    if isinstance(solver, PosteriorSolver):
        return solver.default_steps(schedule)
    return min(DEFAULT_STEPS[name], schedule.config.num_train_timesteps)


def min_steps(name: str) -> int:
    """The fewest steps the named sampler takes with a training config's options: a multistep
    solver's default ``solver_order`` (its plan refuses fewer steps), else 1."""
    if name in ("ddpm", "ddim"):
        return 1
    return getattr(solver_class(name)(), "solver_order", 1)


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
