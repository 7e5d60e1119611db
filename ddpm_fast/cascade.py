"""Cascaded sampling (Ho et al. 2021, "Cascaded Diffusion Models for High Fidelity Image Generation"):
a base model generates small images, then each super-resolution stage generates a larger image
conditioned on the previous stage's output.

    sample_cascade([base, sr1, ...])  =  x_0 = sample(base)
                                         x_k = sample(sr_k conditioned on augment(clamp(x_{k-1}), s_k))

A super-resolution stage is a ``UNet`` with ``config.cond_channels > 0`` (trained by ``ddpm-fast train
--task superres``): it takes the conditioning image as ``model(x, t, low_res=..., aug_level=...)``,
upsamples it bilinearly and concatenates it to x. ``sample()`` calls its model as
``model(x, t, class_labels=...)``; ``LowResConditioned`` binds a batch's conditioning image to the
stage so that ``sample()`` drives it unchanged (CUDA graphs, guidance and every scheduler included).

Conditioning augmentation: a stage built with ``cond_noise_embedding`` was trained on conditioning
images noised with ``q_sample`` at a random level s and told s; at sampling the previous stage's output
is noised at one fixed level ``aug_level`` (default 0, the least noise) with the stage's own schedule,
the noise drawn from the cascade's generator(s), and the stage is told that level.

Random numbers: one generator (or one per image) serves the whole cascade, in order: the base stage's
draws, then per super-resolution stage the augmentation noise (when the stage is augmented) and that
stage's draws, chunk after chunk. Running the stages by hand in that order gives the same images.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .ops import q_sample
from .schedule import Schedule

Stage = nn.Module | Callable[..., Any] | str | os.PathLike


class LowResConditioned(nn.Module):
    """A super-resolution model with its conditioning bound: ``wrapped(x, t, class_labels=None)`` calls
    ``model(x, t, class_labels=..., low_res=low_res, aug_level=aug_level)``.

    Args:
        model: the stage, e.g. a ``UNet`` with cond_channels > 0.
        low_res: (N, C, h, w) the (already augmented) conditioning image of the N images sampled.
        aug_level: (N,) int64 level at which low_res was noised, for a model with cond_noise_embedding;
            None otherwise.
        guided: sampled with classifier-free guidance: ``sample()`` then calls the model on 2N images,
            the batch [uncond, cond] holding the same images twice, and the conditioning is repeated.

    ``sample()``
    splits a batch into chunks of ``chunk_size`` images: bind each chunk's conditioning and sample it
    with ``chunk_size=N`` (as ``super_resolve`` does). ``config`` and ``null_class_label`` are the
    model's, so ``sample()`` reads the image shape and the labels' meaning from them.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        low_res: torch.Tensor,
        aug_level: torch.Tensor | None = None,
        *,
        guided: bool = False,
    ):
        super().__init__()
        if not isinstance(low_res, torch.Tensor) or low_res.dim() != 4:
            raise ValueError(f"low_res must be an (N, C, h, w) tensor, got {getattr(low_res, 'shape', low_res)!r}")
        if aug_level is not None and tuple(aug_level.shape) != (low_res.shape[0],):
            raise ValueError(f"aug_level must have shape ({low_res.shape[0]},), got {tuple(aug_level.shape)}")
        self.model = model
        self.low_res = low_res
        self.aug_level = aug_level
        self.guided = guided
        self.config = getattr(model, "config", None)

    @property
    def null_class_label(self) -> int | None:
        return getattr(self.model, "null_class_label", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> Any:
        low, level = self.low_res, self.aug_level
        n, k = x.shape[0], low.shape[0] * (2 if self.guided else 1)
        if n != k:
            raise ValueError(
                f"the model was called on {n} images but the bound conditioning holds {low.shape[0]}"
                f"{' (x2 for guidance)' if self.guided else ''}: sample() splits a batch into chunks; bind one "
                f"chunk's conditioning and pass chunk_size={low.shape[0]} (and guided=True with guidance_scale)"
            )
        if self.guided:  # classifier-free guidance's [uncond, cond]: the same images twice
            low = torch.cat([low, low])
            level = None if level is None else torch.cat([level, level])
        kwargs: dict[str, Any] = {"low_res": low}
        if class_labels is not None:
            kwargs["class_labels"] = class_labels
        if level is not None:
            kwargs["aug_level"] = level
        return self.model(x, t, **kwargs)


def _config_value(model: Any, name: str, default: Any = None) -> Any:
    config = getattr(model, "config", None)
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default) if config is not None else default


def _draw(shape: tuple[int, ...], generator: Any, device: torch.device) -> torch.Tensor:
    """Standard normal noise from the generator (one per image when a list), on the device."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _schedule_of(scheduler: Any, scheduler_config: Any, device: torch.device) -> Schedule:
    """The stage's training schedule, resolved as sample() resolves it (for the augmentation noise)."""
    from .solvers.registry import resolve

    _, _, source = resolve(scheduler, scheduler_config, 0.0, False)
    return source.to(device) if isinstance(source, Schedule) else Schedule.from_config(source, device=device)


def _check_scheduler_options(scheduler: Any, scheduler_config: Any, options: Any, stage_name: str) -> None:
    """Resolves the stage's sampler with its options as sample() will (names and values), naming the stage."""
    from .solvers.registry import resolve

    if options is None:
        return
    try:
        resolve(scheduler, scheduler_config, options=options)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{stage_name}: {e}") from e


def _labels(class_labels: Any, n: int, device: torch.device) -> torch.Tensor | None:
    if class_labels is None:
        return None
    labels = torch.as_tensor(class_labels, device=device)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"class_labels must be integers, got {labels.dtype}")
    labels = labels.to(torch.int64)
    if labels.dim() == 0:
        labels = labels.expand(n)
    if labels.shape != (n,):
        raise ValueError(
            f"class_labels must be one int or {n} of them (one per image), got shape {tuple(labels.shape)}"
        )
    return labels.contiguous()


def _conditional(model: Any) -> bool:
    return bool(_config_value(model, "num_classes")) or getattr(model, "null_class_label", None) is not None


def _check_stage(
    model: Any,
    low_shape: tuple[int, ...],
    shape: Sequence[int] | None,
    aug_level: Any,
    scheduler: Any,
    scheduler_config: Any,
    device: torch.device,
    stage_name: str,
) -> tuple[tuple[int, ...], int | None, Schedule | None]:
    """Checks a super-resolution stage against its conditioning's (C, h, w): (output shape, the augmentation
    level or None when the stage takes none, the stage's schedule when it does)."""
    cond_channels = _config_value(model, "cond_channels", None)
    if cond_channels is not None and not cond_channels:
        raise ValueError(
            f"{stage_name} takes no conditioning image (its config has cond_channels=0): a super-resolution stage "
            "is a U-Net trained with --task superres (cond_channels > 0)"
        )
    if cond_channels is not None and low_shape[0] != cond_channels:
        raise ValueError(
            f"{stage_name} takes a {cond_channels}-channel conditioning image, got {low_shape[0]} channels "
            f"(image shape {low_shape})"
        )
    if shape is None:
        c, size = _config_value(model, "in_channels"), _config_value(model, "sample_size")
        if c is None or size is None:
            raise ValueError(f"cannot tell {stage_name}'s image shape: pass shape=(C, H, W)")
        shape = (int(c), int(size), int(size))
    shape = tuple(int(d) for d in shape)
    (h, w), (height, width) = low_shape[1:], shape[1:]
    if not (h <= height and w <= width and height % h == 0 and width % w == 0):
        raise ValueError(
            f"{stage_name} makes {height}x{width} images from {h}x{w} conditioning images: the size must divide "
            f"{height}x{width} (the previous stage's output is upsampled by an integer factor)"
        )
    if not _config_value(model, "cond_noise_embedding", False):
        if aug_level is not None:
            raise ValueError(
                f"aug_level={aug_level!r} given, but {stage_name} was not trained with conditioning augmentation "
                "(cond_noise_embedding=False): leave aug_level at None"
            )
        return shape, None, None
    schedule = _schedule_of(scheduler, scheduler_config, device)
    s = 0 if aug_level is None else aug_level
    if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < schedule.config.num_train_timesteps:
        raise ValueError(
            f"aug_level of {stage_name} must be an int timestep in "
            f"[0, {schedule.config.num_train_timesteps - 1}], got {s!r}"
        )
    return shape, s, schedule


def super_resolve(
    model: Callable[..., Any],
    low_res: torch.Tensor,
    *,
    aug_level: int | None = None,
    shape: Sequence[int] | None = None,
    scheduler: str | Any = "ddim",
    num_inference_steps: int | None = None,
    scheduler_config: Any = None,
    class_labels: torch.Tensor | Sequence[int] | int | None = None,
    guidance_scale: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    chunk_size: int | None = None,
    output_type: str = "tensor",
    stage_name: str = "the super-resolution model",
    **sample_options: Any,
) -> Any:
    """One super-resolution stage: sample N images conditioned on ``low_res`` (N, C, h, w) in [-1, 1].

    The conditioning is clamped to [-1, 1]; for a model with ``cond_noise_embedding`` it is noised with
    ``q_sample`` at ``aug_level`` (default 0) on the stage's schedule (noise drawn from ``generator``
    first) and the model is told that level. Then ``sample()`` runs chunk by chunk (``chunk_size``
    images, default sample()'s) on ``LowResConditioned(model, chunk's conditioning)``. ``shape`` is one
    output image's (C, H, W), default the model's in_channels and sample_size. The other arguments are
    ``sample()``'s (``sample_options``: eta, noise, dtype, progress, device, compile, cuda_graph, ...).
    Returns what ``sample()`` returns for ``output_type``.
    """
    from .sampler import _chunk_size, _postprocess, sample

    if not isinstance(low_res, torch.Tensor) or not low_res.dtype.is_floating_point or low_res.dim() != 4:
        raise ValueError(
            f"{stage_name}'s conditioning must be a float (N, C, h, w) tensor, got "
            f"{getattr(low_res, 'dtype', type(low_res).__name__)} {tuple(getattr(low_res, 'shape', ()))}"
        )
    device = torch.device(sample_options["device"]) if sample_options.get("device") is not None else low_res.device
    shape, s, schedule = _check_stage(
        model, tuple(low_res.shape[1:]), shape, aug_level, scheduler, scheduler_config, device, stage_name
    )
    n = low_res.shape[0]
    labels = _labels(class_labels, n, device)
    low = low_res.to(device, torch.float32).clamp(-1.0, 1.0)
    level = None
    if s is not None:
        level = torch.full((n,), s, dtype=torch.int64, device=device)
        low = q_sample(low, level, schedule, noise=_draw(tuple(low.shape), generator, device))[0]

    guided = guidance_scale is not None and float(guidance_scale) != 1.0
    chunk = _chunk_size(chunk_size, shape, guided)
    if isinstance(generator, (list, tuple)) and len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for {n} images: pass one per image, or a single one")
    parts = []
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        stage = LowResConditioned(model, low[lo:hi], None if level is None else level[lo:hi], guided=guided)
        parts.append(
            sample(
                stage,
                shape,
                batch_size=hi - lo,
                num_inference_steps=num_inference_steps,
                scheduler=scheduler,
                scheduler_config=scheduler_config,
                class_labels=None if labels is None else labels[lo:hi],
                guidance_scale=guidance_scale,
                generator=list(generator[lo:hi]) if isinstance(generator, (list, tuple)) else generator,
                chunk_size=hi - lo,
                output_type="tensor",
                **{"device": device, **sample_options},
            )
        )
    return _postprocess(torch.cat(parts), output_type)


def _per_stage(name: str, value: Any, n: int, what: str = "stage") -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries; the cascade has {n} {what}s (one per {what})")
        return list(value)
    return [value] * n


def _load_stage(stage: Stage, index: int, device: torch.device | None) -> tuple[Any, Any]:
    """(model, scheduler config or None) of a stage given as a model or a checkpoint path."""
    if isinstance(stage, (str, os.PathLike)):
        from .checkpoint import load_for_sampling

        return load_for_sampling(stage, device=device or "cpu")
    if not callable(stage):
        raise TypeError(f"stage {index} must be a model or a checkpoint path, got {type(stage).__name__}")
    return stage, None


def sample_cascade(
    stages: Sequence[Stage],
    *,
    batch_size: int = 1,
    schedulers: str | Any | Sequence[Any] = "ddim",
    steps: int | None | Sequence[int | None] = None,
    scheduler_configs: Any = None,
    scheduler_options: Mapping[str, Any] | None | Sequence[Mapping[str, Any] | None] = None,
    class_labels: torch.Tensor | Sequence[int] | int | None = None,
    guidance_scale: float | None | Sequence[float | None] = None,
    aug_level: int | None | Sequence[int | None] = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    chunk_size: int | None = None,
    output_type: str = "tensor",
    return_all: bool = False,
    device: torch.device | str | None = None,
    progress: bool = False,
    **sample_options: Any,
) -> Any:
    """Sample ``batch_size`` images through a cascade: the base stage from noise, then each
    super-resolution stage conditioned on the previous stage's output.

    Args:
        stages: [base, sr_1, ...]: models (``UNet``s; sr_k with cond_channels equal to the previous
            stage's channels) or checkpoint paths (run, step or pipeline directories, read with
            ``load_for_sampling``: EMA weights and the scheduler config they were trained with).
        schedulers, steps: one value for every stage or a list with one per stage (sample()'s
            ``scheduler`` and ``num_inference_steps``; steps None = that scheduler's default).
        scheduler_configs: one per stage (or one for all): the stage's SchedulerConfig / diffusers config /
            Schedule; None = the checkpoint's (stages given as paths), else diffusers' defaults.
        scheduler_options: sample()'s ``scheduler_options`` (sampler options under diffusers' names,
            e.g. ``{"solver_order": 3}``), one mapping for every stage or a list with one per stage (None
            entries: none). Every stage's options are checked against its sampler before any stage samples.
        class_labels: (N,) labels or one int, given to every class-conditional stage (one at least).
        guidance_scale: classifier-free guidance, one for all conditional stages or one per stage.
        aug_level: the fixed conditioning-augmentation level of each super-resolution stage (one value,
            or a list of len(stages) - 1): a timestep of the stage's schedule; only for stages trained
            with augmentation (cond_noise_embedding), where None means 0.
        generator: a torch.Generator, or one per image, serving every stage in order (see the module doc).
        chunk_size: images per forward pass (sample()'s default when None).
        output_type: of the last stage, as sample()'s ("tensor", "pt", "np", "pil").
        return_all: return every stage's raw output (a list of tensors) instead.
        device: default the base model's device (the CPU for paths).
        progress: show sample()'s progress bars.
        sample_options: passed to every sample() call (eta, noise, dtype, compile, cuda_graph, ...).
    """
    from .sampler import OUTPUT_TYPES, _postprocess, sample

    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
    if isinstance(stages, (str, os.PathLike)) or not isinstance(stages, Sequence) or not stages:
        raise ValueError("stages must be a non-empty list [base, sr_1, ...] of models or checkpoint paths")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    k = len(stages)
    schedulers = _per_stage("schedulers", schedulers, k)
    steps = _per_stage("steps", steps, k)
    configs = _per_stage("scheduler_configs", scheduler_configs, k)
    options = _per_stage("scheduler_options", scheduler_options, k)
    scales = _per_stage("guidance_scale", guidance_scale, k)
    levels = _per_stage("aug_level", aug_level, k - 1, "super-resolution stage")
    if device is not None:
        device = torch.device(device)
    loaded = []
    for i, stage in enumerate(stages):
        model, config = _load_stage(stage, i, device)
        if device is None:
            params = model.parameters() if isinstance(model, nn.Module) else iter(())
            device = next((p.device for p in params), torch.device("cpu"))
        loaded.append((model, configs[i] if configs[i] is not None else config))
    base = loaded[0][0]
    if _config_value(base, "cond_channels", 0):
        raise ValueError(
            "stage 0 is a super-resolution model (cond_channels > 0): the first stage must generate from noise"
        )
    conditional = [_conditional(m) for m, _ in loaded]
    labels = _labels(class_labels, batch_size, device)
    if labels is not None and not any(conditional):
        raise ValueError("class_labels given, but no stage of the cascade is class-conditional")
    if isinstance(guidance_scale, (list, tuple)):
        wrong = [i for i, s in enumerate(scales) if s is not None and not conditional[i]]
        if wrong:
            raise ValueError(f"guidance_scale given for stage(s) {wrong}, which are not class-conditional")

    # every stage is checked before the first one samples
    for i, (_, config) in enumerate(loaded):
        _check_scheduler_options(schedulers[i], config, options[i], f"stage {i}")
    c, size = _config_value(base, "in_channels"), _config_value(base, "sample_size")
    low_shape = (int(c), int(size), int(size)) if c is not None and size is not None else None
    for i in range(1, k):
        if low_shape is None:
            break  # a base model without a config: the stages check themselves when they run
        model, config = loaded[i]
        low_shape = _check_stage(model, low_shape, None, levels[i - 1], schedulers[i], config, device, f"stage {i}")[0]

    outputs = []
    for i, (model, config) in enumerate(loaded):
        stage_labels = labels if conditional[i] else None
        stage_scale = scales[i] if conditional[i] else None
        common = dict(
            scheduler=schedulers[i],
            num_inference_steps=steps[i],
            scheduler_config=config,
            scheduler_options=options[i],
            class_labels=stage_labels,
            guidance_scale=stage_scale,
            generator=generator,
            chunk_size=chunk_size,
            output_type="tensor",
            device=device,
            progress=progress,
            **sample_options,
        )
        if i == 0:
            x = sample(model, batch_size=batch_size, **common)
        else:
            x = super_resolve(model, outputs[-1], aug_level=levels[i - 1], stage_name=f"stage {i}", **common)
        outputs.append(x)
    if return_all:
        return outputs
    return _postprocess(outputs[-1], output_type)
