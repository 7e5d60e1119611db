"""Log-likelihood of data under a diffusion model, in bits per dimension, from the variational bound
(improved-diffusion's ``calc_bpd_loop``; the terms: ``ddpm_fast.vlb``).

For each image x_0 the bound is L = L_T + sum_{t=1}^{T-1} L_t + L_0 (0-based timesteps: L_t is the
KL at index t, L_0 the discretized Gaussian decoder, L_T the prior term), each in bits per dimension;
its mean over a dataset is an upper bound on the data's negative log-likelihood in bits/dim. Each
L_t is evaluated at one draw x_t ~ q(x_t | x_0) (fresh noise per t, from ``generator``).

Strided estimator (``t_stride = s > 1``): the KL terms are evaluated at t = 1, 1 + s, 1 + 2s, ...
(< T), and each stands for the block of s timesteps it starts (the last block may be shorter):
sum_t L_t ~= sum_k w_k L_{t_k}, w_k = min(s, T - t_k). This is a left Riemann sum of a smooth
curve of t, not an unbiased estimate; s = 1 gives the full bound. The prior and decoder terms are
always evaluated.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import vlb
from .ops import no_value_checks, vlb_terms
from .schedule import PREDICTION_TYPES, VARIANCE_TYPES, Schedule, normalize_choice


def bpd_timesteps(num_train_timesteps: int, t_stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, weights) of the evaluated KL terms, ascending: t_k = 1 + k s < T and
    w_k = min(s, T - t_k) (int64 both; they sum to T - 1)."""
    if t_stride < 1:
        raise ValueError(f"t_stride must be >= 1, got {t_stride}")
    ts = torch.arange(1, num_train_timesteps, t_stride, dtype=torch.int64)
    return ts, torch.clamp(num_train_timesteps - ts, max=t_stride)


def bpd_column_names(num_train_timesteps: int, t_stride: int = 1) -> list[str]:
    """Names of ``bpd_terms``' columns: "prior", "L_<t>" for each evaluated t, "decoder"."""
    ts, _ = bpd_timesteps(num_train_timesteps, t_stride)
    return ["prior", *[f"L_{t}" for t in ts.tolist()], "decoder"]


@torch.no_grad()
def bpd_terms(
    model: nn.Module,
    x0: torch.Tensor,
    schedule: Schedule,
    *,
    t_stride: int = 1,
    prediction_type: str,
    variance_type: str,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """The bound's terms for one batch of images, in bits per dimension.

    Args:
        model: called as ``model(x_t, t)`` (plus ``class_labels=``); its output (or ``.sample``) has C
            channels, or 2C for variance_type "learned" / "learned_range".
        x0: (B, C, H, W) images, 8-bit data scaled to [-1, 1].
        schedule: the training schedule (T steps).
        t_stride: evaluate every s-th KL term (see the module docstring's estimator).
        prediction_type, variance_type: what the model was trained with.
        class_labels: (B,) labels for a class-conditional model.
        generator: the draws of x_t (on x0's device).
        clip_denoised: clamp the predicted x_0 to [-1, 1] (improved-diffusion's bpd evaluation does).
        backend: the vlb_terms backend.

    Returns:
        (B, K + 2) float64: column 0 the prior term L_T, columns 1..K the evaluated KL terms in
        ascending t, each already multiplied by its weight w_k (so that a row's sum is the image's
        bits/dim estimate), column K + 1 the decoder term L_0. ``bpd_column_names`` names them.
    """
    prediction_type = normalize_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    variance_type = normalize_choice("variance_type", variance_type, VARIANCE_TYPES)
    if not isinstance(x0, torch.Tensor) or not x0.dtype.is_floating_point or x0.dim() < 2:
        raise TypeError("x0 must be a (B, C, ...) floating-point tensor")
    vlb.check_8bit_range(x0, "x0")
    T = schedule.num_train_timesteps
    schedule = schedule.to(x0.device)
    ts, weights = bpd_timesteps(T, t_stride)
    b = x0.shape[0]
    kwargs = {"class_labels": class_labels} if class_labels is not None else {}
    columns = [vlb.prior_bpd(schedule, x0)]
    terms = []
    for t_value in [*ts.tolist(), 0]:
        t = torch.full((b,), t_value, dtype=torch.int64, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        ab = schedule.alphas_cumprod[t_value]
        x_t = (ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()).to(x0.dtype)
        out = model(x_t, t, **kwargs)
        out = getattr(out, "sample", out)
        with no_value_checks():  # x0's range is checked above, t is in range
            term = vlb_terms(
                out,
                x0,
                x_t,
                t,
                schedule,
                prediction_type=prediction_type,
                variance_type=variance_type,
                clip_denoised=clip_denoised,
                backend=backend,
            )
        terms.append(term.double())
    kl = torch.stack(terms[:-1], 1) * weights.to(x0.device, torch.float64) if len(terms) > 1 else None
    columns = [columns[0].reshape(b, 1)]
    if kl is not None:
        columns.append(kl)
    columns.append(terms[-1].reshape(b, 1))
    return torch.cat(columns, 1)


def _batches(data: Any, batch_size: int) -> Iterable:
    """Batches of (images, labels or None) from a DataLoader-like iterable, an indexable dataset, an
    images tensor or an (images, labels) pair of tensors."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        images, labels = data
        for i in range(0, images.shape[0], batch_size):
            yield images[i : i + batch_size], labels[i : i + batch_size]
        return
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, torch.Tensor):
        from torch.utils.data import DataLoader

        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    elif isinstance(data, torch.Tensor):
        data = [data[i : i + batch_size] for i in range(0, data.shape[0], batch_size)]
    for batch in data:
        if isinstance(batch, (tuple, list)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


def bits_per_dim(
    model: nn.Module,
    data: Any,
    schedule: Schedule,
    *,
    prediction_type: str,
    variance_type: str,
    t_stride: int = 1,
    batch_size: int = 64,
    max_images: int | None = None,
    class_conditional: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
    clip_denoised: bool = True,
    backend: str | None = None,
) -> dict[str, Any]:
    """Bits per dimension of a dataset under the model, with the per-term breakdown.

    ``data``: a Dataset (indexable, items ``(image, label)`` or images), a DataLoader or any
    iterable of batches, an (N, C, H, W) tensor or an (images, labels) pair of tensors; images are
    8-bit data scaled to [-1, 1]. Labels are passed to the model only with ``class_conditional``.
    Draws come from one generator seeded ``seed``.

    Returns a dict: ``bpd`` (the mean over images of the bound's estimate), ``prior``, ``decoder``,
    ``kl`` (the sum of the weighted KL terms), ``terms`` ({"L_<t>": mean weighted term}), ``num_images``,
    ``t_stride``, ``timesteps_evaluated`` and ``estimator`` (how the strided sum is formed).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    names = bpd_column_names(schedule.num_train_timesteps, t_stride)
    total = torch.zeros(len(names), dtype=torch.float64)
    count = 0
    for images, labels in _batches(data, batch_size):
        if max_images is not None and count >= max_images:
            break
        if max_images is not None:
            images = images[: max_images - count]
            labels = labels[: max_images - count] if labels is not None else None
        images = images.to(device)
        cl = labels.to(device) if class_conditional and labels is not None else None
        rows = bpd_terms(
            model,
            images,
            schedule,
            t_stride=t_stride,
            prediction_type=prediction_type,
            variance_type=variance_type,
            class_labels=cl,
            generator=generator,
            clip_denoised=clip_denoised,
            backend=backend,
        )
        total += rows.sum(0).cpu()
        count += rows.shape[0]
    if count == 0:
        raise ValueError("bits_per_dim: the data gave no images")
    mean = total / count
    return {
        "bpd": float(mean.sum()),
        "prior": float(mean[0]),
        "decoder": float(mean[-1]),
        "kl": float(mean[1:-1].sum()),
        "terms": {name: float(v) for name, v in zip(names[1:-1], mean[1:-1].tolist(), strict=True)},
        "num_images": count,
        "t_stride": t_stride,
        "timesteps_evaluated": len(names) - 2,
        "estimator": "prior + sum_k min(s, T - t_k) L_{t_k} over t_k = 1, 1 + s, ... < T + decoder"
        if t_stride > 1
        else "the full bound: prior + sum_{t=1}^{T-1} L_t + decoder",
    }
