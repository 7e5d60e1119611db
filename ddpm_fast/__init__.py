"""ddpm_fast: fused kernels, a U-Net, a trainer and a drop-in sampler for DDPM/DDIM."""

from ._backends import backends
from .cascade import sample_cascade
from .checkpoint import CheckpointError, export_pipeline, load_for_sampling
from .classifier import Classifier, ClassifierConfig
from .evaluation import evaluate
from .ops import attention, attention_block, group_norm_silu, posterior_step, q_sample
from .sampler import sample
from .schedule import Schedule, SchedulerConfig, StepConfig
from .train import TrainConfig, Trainer
from .unet import UNet, UNetConfig

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "Classifier",
    "ClassifierConfig",
    "Schedule",
    "SchedulerConfig",
    "StepConfig",
    "TrainConfig",
    "Trainer",
    "UNet",
    "UNetConfig",
    "attention",
    "attention_block",
    "backends",
    "evaluate",
    "export_pipeline",
    "group_norm_silu",
    "load_for_sampling",
    "posterior_step",
    "q_sample",
    "sample",
    "sample_cascade",
]
