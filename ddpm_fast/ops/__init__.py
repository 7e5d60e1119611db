"""The fused ops, each a torch.library custom op with a fake implementation and a backend= override."""

from ._common import no_value_checks
from .attention import attention, attention_block
from .groupnorm_silu import group_norm_silu
from .noising import q_sample
from .posterior import posterior_step
from .solver_step import solver_step
from .vlb_terms import vlb_terms

__all__ = [
    "attention",
    "attention_block",
    "group_norm_silu",
    "no_value_checks",
    "posterior_step",
    "q_sample",
    "solver_step",
    "vlb_terms",
]
