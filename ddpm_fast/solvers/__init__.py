"""Samplers as solvers of one interface (DESIGN.md, "Decided later"): each plans a run as float64
per-step coefficients, and every step is the same linear update (``base.apply_step``)."""

from .base import SolverPlan, X0Limit, apply_step, new_history, run, schedule_from_dict
from .dpmsolver import DPMSolverMultistep

# diffusers scheduler class name -> our solver
DIFFUSERS_SOLVERS = {"DPMSolverMultistepScheduler": DPMSolverMultistep}

__all__ = [
    "DIFFUSERS_SOLVERS",
    "DPMSolverMultistep",
    "SolverPlan",
    "X0Limit",
    "apply_step",
    "new_history",
    "run",
    "schedule_from_dict",
]
