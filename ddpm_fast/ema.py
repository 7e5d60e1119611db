"""Exponential moving average of a model's weights, updated with ``torch._foreach_*`` ops.

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (DESIGN.md, settled
points), so early averages are not dominated by the random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(decay: float, num_updates: int, warmup: bool = True) -> float:
    """The decay used for update number ``num_updates`` (0-based)."""
    if not warmup:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


class EMA:
    """Keeps a frozen copy of ``model`` whose parameters follow ema <- d ema + (1 - d) p.

    Floating-point buffers are copied as they are (the U-Net has none that are averaged).
    ``num_updates`` counts the updates done so far; ``state_dict`` / ``load_state_dict`` save
    it alongside the averaged weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.decay_used: float | None = None
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError(f"model has {len(params)} parameters, the EMA copy {len(ema_params)}")
        return ema_params, params

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step towards ``model``'s current parameters; returns the decay used."""
        d = ema_decay(self.decay, self.num_updates, self.warmup)
        ema_params, params = self._pairs(model)
        # lerp: ema + (1 - d) (p - ema), one fused pass over every tensor of a dtype/device group
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.num_updates += 1
        self.decay_used = d
        return d

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
