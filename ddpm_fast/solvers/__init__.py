"""Samplers as solvers of one interface: each plans a run (timesteps and, for the linear solvers,
float64 per-step coefficients; DESIGN.md, "Decided later"), and ``sample()`` runs any plan in
one loop. The linear solvers' steps are all the same update (``base.apply_step``, fused in
``ops.solver_step``); DDPM and DDIM keep their fused posterior kernel (``posterior.py``)."""

from .base import PlanBuilder, SolverPlan, X0Limit, apply_step, new_history, run, schedule_from_dict
from .dpmsolver import DPMSolverMultistep
from .euler import EulerAncestralDiscrete, EulerDiscrete
from .heun import HeunDiscrete
from .pc import PredictorCorrector, pc_step
from .posterior import PosteriorPlan, PosteriorSolver
from .registry import DIFFUSERS_NAMES, SCHEDULER_NAMES, resolve, sampling_option_names
from .unipc import UniPCMultistep

# diffusers scheduler class name -> our solver (the linear ones)
DIFFUSERS_SOLVERS = {
    "DPMSolverMultistepScheduler": DPMSolverMultistep,
    "UniPCMultistepScheduler": UniPCMultistep,
    "EulerDiscreteScheduler": EulerDiscrete,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscrete,
    "HeunDiscreteScheduler": HeunDiscrete,
}

__all__ = [
    "DIFFUSERS_NAMES",
    "DIFFUSERS_SOLVERS",
    "DPMSolverMultistep",
    "EulerAncestralDiscrete",
    "EulerDiscrete",
    "HeunDiscrete",
    "PlanBuilder",
    "PosteriorPlan",
    "PosteriorSolver",
    "PredictorCorrector",
    "SCHEDULER_NAMES",
    "SolverPlan",
    "UniPCMultistep",
    "X0Limit",
    "apply_step",
    "new_history",
    "sampling_option_names",
    "pc_step",
    "resolve",
    "run",
    "schedule_from_dict",
]
