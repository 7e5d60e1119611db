"""sample(): the drop-in sampling loop (DDPM ancestral, DDIM, DPM-Solver++, UniPC, Euler, Euler
ancestral, Heun, score-SDE predictor-corrector; classifier-free guidance, classifier guidance,
SDEdit).

Arguments -> a plan -> one loop: the solver (``ddpm_fast.solvers.resolve``) plans the run (its
timesteps and coefficients, on the device before the loop starts), and a stepper
(``ddpm_fast.steppers``) applies each step: one model call and one fused kernel
(``posterior_step`` for DDPM/DDIM, ``solver_step`` for the linear solvers). The value checks
(timestep and label ranges) run once before the loop, so it never waits for the device (no
``.item()``, no branching on tensor values). On CUDA the model call and the step are captured
once per chunk size in a CUDA graph and replayed per step, reading the model's t and the step's
int64 row (prev_t / step index, seed) from static device buffers (and, with one generator per
image, the step's noise, drawn from the chunk's generators just before the replay); the model
runs under bf16 autocast while the step math stays in fp32.

Classifier guidance (Dhariwal & Nichol 2021): ``classifier=`` (a noise-aware classifier
``classifier(x_t, t) -> logits``, e.g. ``ddpm_fast.classifier.Classifier``) with ``classifier_scale``
and ``class_labels``, or any ``guidance=fn`` with ``fn(x_t, t) -> gradient``: each step computes the
gradient g = s grad_x log p(y | x_t, t) with autograd on the classifier alone (one batched forward
and backward), and the fused step takes g as one more input (DDPM: mean + sigma_t^2 g; the other
samplers: eps - sqrt(1 - a_bar_t) g; both after the x0 clip, as Dhariwal & Nichol's code;
``reference.posterior_step``, ``solvers.base.with_guidance``). On CUDA the classifier's forward
and backward are captured in the step's graph with the model.

With ``noise="torch"`` every random tensor is drawn as diffusers draws it (``randn_tensor``:
same shapes, generator(s), order, and the same skipped draw at DDPM's t = 0), so
``sample(unet, scheduler=DDPMScheduler(...), noise="torch", generator=g)`` reproduces
``DDPMPipeline(unet, scheduler)(generator=g)``. ``noise="kernel"`` draws the step noise inside
the kernel from one Philox key per step; the keys are drawn from the generator before the loop.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ._backends import cpu_bf16_autocast_default
from .ops import no_value_checks
from .ops.noising import q_sample
from .schedule import Schedule, SchedulerConfig
from .solvers.base import with_guidance
from .solvers.posterior import PosteriorPlan
from .solvers.registry import default_steps, resolve, step_fn_for
from .steppers import make_stepper

NOISE_MODES = ("kernel", "torch")
OUTPUT_TYPES = ("tensor", "pt", "np", "pil")
# Default chunk: 256 CIFAR-sized images (32 x 32 pixels) per forward pass, fewer for larger images.
CHUNK_PIXELS = 256 * 32 * 32
_DIFFUSERS_SCHEDULERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
_MISSING = object()

Generators = torch.Generator | Sequence[torch.Generator] | None


def sample(
    model: Callable[..., Any],
    shape: Sequence[int] | None = None,
    *,
    batch_size: int | None = None,
    num_inference_steps: int | None = None,
    timesteps: Sequence[int] | None = None,
    scheduler: str | Any = "ddpm",
    scheduler_config: SchedulerConfig | Mapping[str, Any] | Schedule | None = None,
    scheduler_options: Mapping[str, Any] | None = None,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    guidance_scale: float | None = None,
    class_labels: torch.Tensor | Sequence[int] | int | None = None,
    null_class_label: int | None = None,
    classifier: Callable[..., Any] | None = None,
    classifier_scale: float | None = None,
    guidance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    generator: Generators = None,
    x_T: torch.Tensor | None = None,
    image: torch.Tensor | None = None,
    strength: float = 1.0,
    noise: str = "kernel",
    output_type: str = "tensor",
    progress: bool = True,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    compile: bool = False,
    cuda_graph: bool | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
    decode: Any = None,
) -> torch.Tensor | np.ndarray | list:
    """Generate images from a noise-prediction model with DDPM, DDIM or a few-step solver.

    Args:
        model: a callable ``model(x, t) -> prediction`` (``t`` int64 (N,) on the device), called
            with ``class_labels=`` when labels are given; a tensor or an object with ``.sample``
            (diffusers ``UNet2DModel``) is returned, shaped like ``x`` (2x its channels for a
            learned variance).
        shape: one image's shape, e.g. (3, 32, 32); default: the model's ``in_channels`` and
            ``sample_size`` (``model.config`` for diffusers), else taken from ``x_T`` / ``image``.
        batch_size: number of images (diffusers' meaning); default 1, or x_T's / image's batch.
        num_inference_steps: timesteps; default all T for DDPM and "pc", 50 for DDIM, Euler and
            Euler ancestral, 20 for DPM-Solver++ and UniPC, 25 for Heun (2 model calls each).
        timesteps: custom descending timesteps instead (where the solver takes them).
        scheduler: "ddpm", "ddim", "dpmsolver++", "unipc", "euler", "euler_ancestral", "heun",
            "pc", or the diffusers scheduler object of one of them (its config is used; its own
            state is not touched). Each is a solver of ``ddpm_fast.solvers`` that plans the run.
        scheduler_config: a ``SchedulerConfig``, a diffusers scheduler config dict (with the
            solver's options under diffusers' names) or a ``Schedule``; default: diffusers'
            defaults (linear betas, T = 1000, epsilon). From a ``SchedulerConfig`` the few-step
            solvers take the schedule and the prediction / variance type only.
        scheduler_options: the sampler's options under diffusers' names, over those of
            ``scheduler`` / ``scheduler_config``: e.g. ``{"solver_order": 3, "use_karras_sigmas":
            True}`` for "dpmsolver++", ``{"timestep_spacing": "trailing"}`` for DDIM. The noise
            schedule and the prediction type are the model's and cannot be set here;
            ``ddpm_fast.solvers.sampling_option_names(name)`` lists what can.
        eta, use_clipped_model_output: DDIM's options.
        guidance_scale: classifier-free guidance s (s = 1 or None: no unconditional pass). Needs
            ``class_labels`` and a null label (``model.null_class_label`` or ``null_class_label``);
            each step calls the model once on the batch [uncond, cond].
        class_labels: (N,) int labels, a sequence, or one int for all images: the model's (when it
            is class-conditional) and the classifier's.
        classifier: classifier guidance: a noise-aware classifier ``classifier(x_t, t)`` returning
            (N, num_classes) logits (or an object with ``.logits``); needs ``class_labels`` in
            [0, num_classes). Each step adds g = classifier_scale * grad_x log softmax(logits)[y]
            (autograd through the classifier alone, batched) to the step: DDPM shifts the
            posterior mean by sigma_t^2 g after the x0 clip, the other samplers shift eps by
            -sqrt(1 - a_bar_t) g after it (x0 and v predictions converted to match). The model may be
            unconditional (labels then go to the classifier only) or take the labels too
            (classifier and classifier-free guidance together).
        classifier_scale: s of classifier guidance (default 1.0).
        guidance: instead of a classifier, any ``guidance(x_t, t) -> g`` returning the gradient to
            add (shaped like x_t; scale included), used as classifier guidance uses its gradient.
        generator: a ``torch.Generator`` or a list of one per image (each image's noise drawn from
            its own generator with torch, as diffusers does, whatever ``noise`` says).
        x_T: (N, *shape) starting noise instead of a draw.
        image, strength: SDEdit / img2img: ``image`` (N, *shape) in [-1, 1] is noised to the
            timestep that leaves ``int(steps * strength)`` steps (diffusers' img2img rule), and
            only those steps run.
        noise: "kernel" (drawn in the fused step, fast) or "torch" (diffusers' draws, bit for bit).
        output_type: "tensor" (the raw final sample), "pt" (NCHW in [0, 1]), "np" (NHWC float32
            in [0, 1]) or "pil" (a list of PIL images).
        progress: show a tqdm progress bar.
        callback: ``callback(step, t, x_t)`` after every step with that chunk's new sample.
        dtype: the model's autocast dtype: default bfloat16 on CUDA and on CPUs with bf16 units
            (AMX or AVX512-BF16, where the U-Net runs 1.7-2.4x faster; DDPM_FAST_CPU_BF16=0 turns
            that off), else none (fp32); torch.float32 turns autocast off (diffusers' fp32
            results). The sample and the step math stay in fp32.
        chunk_size: at most this many images per forward pass (2x that with guidance); default
            ~256 images of 32 x 32 pixels. Equivalence with diffusers holds within one chunk.
        compile: run the model through ``torch.compile``.
        cuda_graph: capture model + step in a CUDA graph (default: on CUDA, where possible).
        device: default the model's parameters' device, else x_T's / image's, else the CPU.
        backend: the posterior_step backend ("cpp", "cuda", "triton", "reference"); default the fastest.
        decode: latent diffusion: the final latents are decoded into images before ``output_type``
            applies: a ``ddpm_fast.latent.Autoencoder`` (its scaling applied, decoded in its chunks,
            bf16 on CUDA), a diffusers ``AutoencoderKL`` / ``VQModel``, a local autoencoder folder, or
            a callable ``decode(latents) -> images`` used as is. ``output_type="tensor"`` then returns
            the decoder's raw images.

    Returns:
        (N, *shape) float tensor on the device for "tensor"/"pt", an (N, H, W, C) array for "np",
        a list of N PIL images for "pil".
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
    noise = _choice("noise", noise, NOISE_MODES)
    output_type = _choice("output_type", output_type, OUTPUT_TYPES)
    if decode is not None:  # resolved before the loop: a bad decoder fails before any sampling
        from .latent import as_autoencoder

        decoder = as_autoencoder(decode)
    else:
        decoder = None
    device = _resolve_device(device, model, x_T, image)

    # Arguments -> a plan: the solver, its timesteps and coefficients, on the device before the loop.
    name, solver, source = resolve(scheduler, scheduler_config, eta, use_clipped_model_output, scheduler_options)
    schedule = source.to(device) if isinstance(source, Schedule) else Schedule.from_config(source, device=device)
    if timesteps is None and num_inference_steps is None:
        num_inference_steps = default_steps(name, solver, schedule)
    plan = solver.plan(schedule, num_inference_steps, timesteps, device=device)
    if image is not None:
        if not isinstance(plan, PosteriorPlan):
            raise ValueError(f"image= (SDEdit / img2img) is implemented for scheduler='ddpm' and 'ddim', not {name!r}")
        plan = plan.tail(_strength_steps(plan.num_steps, strength))
    elif strength != 1.0:
        raise ValueError("strength applies to image= (SDEdit / img2img); pass image or leave strength at 1.0")
    host_ts = plan.timesteps.cpu().tolist()  # for the callback (read once, before the loop)

    # Images: how many, what shape.
    if x_T is not None and image is not None:
        raise ValueError("pass either x_T (start from noise) or image (SDEdit), not both")
    start = x_T if x_T is not None else image
    start_name = "x_T" if x_T is not None else "image"
    if start is not None:
        _check_start(start, start_name, device)
        if batch_size is not None and batch_size != start.shape[0]:
            raise ValueError(f"batch_size={batch_size} but {start_name} holds {start.shape[0]} images")
        batch_size = start.shape[0]
    batch_size = 1 if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    image_shape = _resolve_shape(shape, model, start, start_name)
    if output_type in ("np", "pil") and len(image_shape) != 3:
        raise ValueError(f"output_type={output_type!r} needs (C, H, W) images, got shape {image_shape}")
    state_dtype = torch.float64 if start is not None and start.dtype == torch.float64 else torch.float32

    # Conditioning.
    guided = guidance_scale is not None and float(guidance_scale) != 1.0
    labels = _resolve_labels(model, class_labels, batch_size, device, guidance_scale, classifier is not None)
    null = None
    if guided:
        null = null_class_label if null_class_label is not None else getattr(model, "null_class_label", None)
        if null is None:
            raise ValueError(
                "classifier-free guidance needs a null (unconditional) class label: the model has none "
                "(model.null_class_label is None or missing; train with label dropout, or pass null_class_label=)"
            )
    if labels is not None and _takes_class_labels(model):
        _check_label_range(model, labels, null)
    guide_fn = _guidance_fn(classifier, classifier_scale, guidance, labels)
    if guide_fn is not None:
        plan = _plan_with_guidance(plan, solver, schedule, name)

    generators = _resolve_generators(generator, batch_size, device)
    torch_noise = noise == "torch" or isinstance(generators, list)
    # The captured step draws or not; a step that differs (DDPM's last with torch noise) runs uncaptured.
    # Kernel noise draws wherever the sampler is stochastic (DDPM's last step ignores it).
    draws = list(plan.draws) if torch_noise or not isinstance(plan, PosteriorPlan) else [plan.stochastic] * len(host_ts)

    chunk = _chunk_size(chunk_size, image_shape, guided)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device; sampling runs on {device}")
    autocast_dtype = _autocast_dtype(dtype, device)
    runner = _ModelRunner(model, device, autocast_dtype, guided, compile, pass_labels=_takes_class_labels(model))
    step_numel = min(chunk, batch_size) * math.prod(image_shape)  # the backend's size class: one chunk
    guidance = guidance_scale if guided else None
    # CPU-generator draws (diffusers' order) cannot be captured: those loops run uncaptured.
    graph_wanted = _graphs_possible(device) and cuda_graph is not False and not (torch_noise and _any_cpu(generators))
    stepper = make_stepper(
        plan, schedule, backend, device, state_dtype, step_numel, graph_wanted, guidance, step_fn_for(solver, plan)
    )
    use_graph = graph_wanted and stepper.capturable
    checked = False

    def body(
        x: torch.Tensor,
        t_row: torch.Tensor,
        row: torch.Tensor,
        chunk_labels: torch.Tensor | None,
        gens: Any,
        draw: bool,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step on x: the model on [uncond, cond] (or x), the guidance gradient (classifier
        guidance), then the step. ``t_row`` holds the model batch's t, ``row`` the step's int64
        arguments (stepper.row_for); torch noise is ``z`` when given (drawn by the caller), else
        drawn here from ``gens`` where the step draws."""
        nonlocal checked
        n = x.shape[0]
        n_model = 2 * n if guided else n
        with no_value_checks():  # t and the labels were checked before the loop: no per-step device reads
            out = runner(x, t_row, chunk_labels)
            guide = None
            if guide_fn is not None:
                y = None if chunk_labels is None else chunk_labels[n_model - n :]  # the cond half's labels
                guide = guide_fn(x, t_row[:n], y, runner.autocast_context, check=not checked)
            if not checked:
                _check_model_output(out, x, n_model, plan)
                checked = True
            if z is None and torch_noise and draw:
                z = _randn(x.shape, gens, device, x.dtype)
            return stepper(out, x, t_row, row, z, draw, guide)

    result = torch.empty((batch_size, *image_shape), dtype=state_dtype, device=device)
    graphs: dict[int, _CudaGraphStep] = {}
    bar = _progress_bar(progress, len(host_ts) * math.ceil(batch_size / chunk))
    with torch.no_grad():
        for lo in range(0, batch_size, chunk):
            hi = min(lo + chunk, batch_size)
            n = hi - lo
            gens = generators[lo:hi] if isinstance(generators, list) else generators
            dev_gen = None if torch_noise else _device_generator(gens, device)
            x = _initial_sample(
                x_T[lo:hi] if x_T is not None else None,
                image[lo:hi] if image is not None else None,
                (n, *image_shape),
                host_ts[0],
                schedule,
                gens,
                dev_gen,
                torch_noise,
                device,
                state_dtype,
            )
            if plan.init_noise_sigma != 1.0:  # diffusers' pipelines scale x_T, drawn or given, so
                x = x * plan.init_noise_sigma
            if torch_noise or not plan.stochastic:
                seeds = torch.zeros(len(host_ts), dtype=torch.int64, device=device)  # unused by the step
            else:
                seeds = torch.randint(0, 2**62, (len(host_ts),), generator=dev_gen, device=device, dtype=torch.int64)
            n_model = 2 * n if guided else n
            t_rows = plan.timesteps[:, None].expand(-1, n_model).contiguous()
            rows = [stepper.row_for(i, n, seeds) for i in range(len(host_ts))]
            if stepper.backend == "reference":
                stepper.host_seeds = seeds.tolist()  # the reference draws its Philox noise from host ints
            stepper.begin_chunk(x)
            chunk_labels = None
            if labels is not None:
                chunk_labels = labels[lo:hi]
                if guided:
                    chunk_labels = torch.cat([torch.full_like(chunk_labels, int(null)), chunk_labels])
            graph = graphs.get(n)
            for i, t in enumerate(host_ts):
                stepper.step_index = i
                if graph is not None and graph.draw == draws[i]:
                    x = graph.replay(x, t_rows[i], rows[i], chunk_labels, gens)
                    if callback is not None:
                        callback(i, t, x.clone())
                else:
                    warm_up = use_graph and graph is None and i + 1 < len(host_ts) and len(host_ts) > 2
                    on_side = warm_up and device.type == "cuda"
                    with _side_stream(device) if on_side else contextlib.nullcontext():
                        x = body(x, t_rows[i], rows[i], chunk_labels, gens, draws[i])
                    if on_side:
                        x.record_stream(torch.cuda.current_stream(device))  # made on the side stream, used here
                    if callback is not None:
                        callback(i, t, x)
                    if warm_up:
                        graph = _CudaGraphStep.capture(
                            body, x, t_rows[i + 1], rows[i + 1], chunk_labels, gens, draws[i + 1], torch_noise, graphs
                        )
                        if graph is None:
                            use_graph = False
                        else:
                            graphs[n] = graph
                bar.update(1)
            result[lo:hi].copy_(x)
    bar.close()
    if decoder is not None:
        result = decoder.decode(result)
    return _postprocess(result, output_type)


# ---------------------------------------------------------------- argument resolution
def _choice(name: str, value: Any, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value


def _resolve_device(
    device: torch.device | str | None, model: Any, x_T: torch.Tensor | None, image: torch.Tensor | None
) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    for start in (x_T, image):
        if isinstance(start, torch.Tensor):
            return start.device
    return torch.device("cpu")


def _strength_steps(num_steps: int, strength: float) -> int:
    """diffusers' img2img rule: keep the last int(n * strength) steps."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    keep = min(int(num_steps * strength), num_steps)
    if keep == 0:
        raise ValueError(f"strength={strength} with {num_steps} steps leaves no step to run: raise either")
    return keep


def _check_start(start: torch.Tensor, name: str, device: torch.device) -> None:
    if not isinstance(start, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(start).__name__}")
    if not start.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {start.dtype}")
    if start.dim() < 2:
        raise ValueError(f"{name} must be (N, C, ...), got shape {tuple(start.shape)}")
    if start.device != device:
        raise ValueError(f"{name} is on {start.device} but sampling runs on {device}")


def _cfg(model: Any, name: str) -> Any:
    """model.config['name'] (diffusers) or model.config.<name>, else model.<name>, else _MISSING.
    (The config first: diffusers warns on config values read as model attributes.)"""
    config = getattr(model, "config", None)
    if isinstance(config, Mapping):
        if name in config:
            return config[name]
    elif config is not None and hasattr(config, name):
        return getattr(config, name)
    return getattr(model, name, _MISSING)


def _resolve_shape(
    shape: Sequence[int] | None, model: Any, start: torch.Tensor | None, start_name: str
) -> tuple[int, ...]:
    if shape is not None:
        shape = tuple(int(d) for d in shape)
        if len(shape) < 1 or any(d < 1 for d in shape):
            raise ValueError(f"shape must be one image's positive dims, e.g. (3, 32, 32), got {shape}")
        if start is not None and tuple(start.shape[1:]) != shape:
            raise ValueError(f"{start_name} has image shape {tuple(start.shape[1:])}, but shape={shape}")
        return shape
    if start is not None:
        return tuple(start.shape[1:])
    channels, size = _cfg(model, "in_channels"), _cfg(model, "sample_size")
    if channels is _MISSING or size is _MISSING or channels is None or size is None:
        raise ValueError(
            "cannot tell the image shape: pass shape=(C, H, W) (the model has no in_channels / sample_size)"
        )
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (int(channels), *(int(s) for s in size))


def _takes_class_labels(model: Any) -> bool:
    """Whether the model is class-conditional: diffusers' class_embedding, a class count in the
    config, else whether its signature takes class_labels."""
    embedding = getattr(model, "class_embedding", _MISSING)
    if embedding is not _MISSING:
        return embedding is not None
    for name in ("num_classes", "num_class_embeds"):
        value = _cfg(model, name)
        if value is not _MISSING:
            return bool(value)
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True  # cannot tell: let the call decide
    return "class_labels" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _resolve_labels(
    model: Any,
    class_labels: torch.Tensor | Sequence[int] | int | None,
    n: int,
    device: torch.device,
    guidance_scale: float | None,
    for_classifier: bool = False,
) -> torch.Tensor | None:
    if class_labels is None:
        if guidance_scale is not None:
            raise ValueError("guidance_scale needs class_labels: classifier-free guidance is over class labels")
        return None
    if not for_classifier and not _takes_class_labels(model):
        raise ValueError(
            "class_labels (or guidance_scale) given, but the model is not class-conditional "
            "(no class embedding / num_classes, and model(x, t) takes no class_labels)"
        )
    if isinstance(class_labels, int):
        labels = torch.full((n,), class_labels, dtype=torch.int64, device=device)
    else:
        labels = torch.as_tensor(class_labels, device=device)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be integers, got {labels.dtype}")
        labels = labels.to(torch.int64)
        if labels.dim() == 0:
            labels = labels.expand(n)
        if labels.shape != (n,):
            raise ValueError(f"class_labels must hold one label per image ({n}), got shape {tuple(labels.shape)}")
    return labels.contiguous()


def _guidance_fn(
    classifier: Callable[..., Any] | None,
    scale: float | None,
    guidance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    labels: torch.Tensor | None,
) -> _ClassifierGuidance | _CallableGuidance | None:
    """What computes each step's guidance gradient, or None (no classifier guidance). The labels'
    range is read once here (one device read), against the classifier's ``num_classes`` when it
    tells one (else against its logits at the first step)."""
    if classifier is None and guidance is None:
        if scale is not None:
            raise ValueError("classifier_scale applies to classifier guidance: pass classifier= as well")
        return None
    if classifier is not None and guidance is not None:
        raise ValueError("pass either classifier= (with class_labels) or guidance= (a gradient function), not both")
    if guidance is not None:
        if not callable(guidance):
            raise TypeError(f"guidance must be callable as guidance(x_t, t) -> gradient, got {type(guidance).__name__}")
        if scale is not None:
            raise ValueError("classifier_scale applies to classifier=; a guidance function returns its scaled gradient")
        return _CallableGuidance(guidance)
    if not callable(classifier):
        raise TypeError(f"classifier must be callable as classifier(x_t, t) -> logits, got {type(classifier).__name__}")
    if labels is None:
        raise ValueError(
            "classifier guidance needs class_labels: the class each image is guided towards (one per image, or one int)"
        )
    scale = 1.0 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"classifier_scale must be a finite number, got {scale}")
    low, high = torch.stack(torch.aminmax(labels)).tolist()  # one read of the device
    num_classes = _cfg(classifier, "num_classes")
    if low < 0 or (_is_count(num_classes) and high >= num_classes):
        top = f"[0, {num_classes - 1}]" if _is_count(num_classes) else "[0, num_classes)"
        raise ValueError(f"class labels must lie in {top} for this classifier, got {low}..{high}")
    if scale == 0.0:  # no guidance: the step without a guide (what a zero gradient gives, bit for bit)
        return None
    return _ClassifierGuidance(classifier, scale, high)


class _ClassifierGuidance:
    """g = scale * grad_x sum_i log softmax(classifier(x, t))[i, y_i]: one batched forward and
    backward through the classifier (autograd on it alone, under the model's autocast), the
    per-image terms being independent. Returns g in x's dtype."""

    def __init__(self, classifier: Callable[..., Any], scale: float, top_label: int):
        self.classifier, self.scale, self.top_label = classifier, scale, top_label

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, autocast: Callable, check: bool
    ) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            with autocast():
                logits = self.classifier(x_in, t)
            logits = getattr(logits, "logits", logits)
            if check:
                _check_logits(logits, x, self.top_label)
            log_p = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(log_p, x_in)
        return grad.mul_(self.scale)


class _CallableGuidance:
    """A user's ``guidance(x_t, t) -> g`` (called with autograd enabled), its output checked once."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn = fn

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, autocast: Callable, check: bool
    ) -> torch.Tensor:
        with torch.enable_grad():
            g = self.fn(x, t)
        if check:
            if not isinstance(g, torch.Tensor) or not g.dtype.is_floating_point:
                raise TypeError(
                    f"guidance(x_t, t) must return a floating-point gradient tensor, got {getattr(g, 'dtype', type(g))}"
                )
            if g.shape != x.shape or g.device != x.device:
                raise ValueError(
                    f"guidance(x_t, t) returned shape {tuple(g.shape)} on {g.device}; the gradient must be shaped "
                    f"like x_t, {tuple(x.shape)} on {x.device}"
                )
        return g.detach()


def _check_logits(logits: Any, x: torch.Tensor, top_label: int) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(
            f"the classifier must return (N, num_classes) float logits, got {getattr(logits, 'dtype', type(logits))}"
        )
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        hint = " (an image-shaped output: a denoising model rather than a classifier?)" if logits.dim() > 2 else ""
        raise ValueError(
            f"the classifier must return (N, num_classes) logits for N = {x.shape[0]} images, got shape "
            f"{tuple(logits.shape)}{hint}"
        )
    if top_label >= logits.shape[1]:
        raise ValueError(
            f"class labels go up to {top_label}, but the classifier has {logits.shape[1]} classes "
            f"(labels 0..{logits.shape[1] - 1})"
        )


def _plan_with_guidance(plan: Any, solver: Any, schedule: Schedule, name: str) -> Any:
    """The plan taking a guidance gradient: DDPM/DDIM's kernel reads it as it is; a linear solver's
    plan gets its per-step coefficient (``with_guidance``)."""
    if isinstance(plan, PosteriorPlan):
        if plan.config.kind == "ddim" and schedule.zero_terminal_snr:
            raise ValueError(
                "classifier guidance through eps divides by sqrt(a_bar) = 0 at the first DDIM step of a "
                "zero-terminal-SNR schedule: use scheduler='ddpm' (its guidance shifts the mean) or another sampler"
            )
        return plan
    return with_guidance(plan, solver.prediction_type)


def _check_label_range(model: Any, labels: torch.Tensor, null: int | None) -> None:
    """The labels (and the null label) against the model's label embedding, once before the loop:
    the steps run without the per-call value checks (ddpm_fast.UNet's label check would read the
    device every step, and a replayed CUDA graph checks nothing). Labels lie in [0, num_classes]
    for ddpm_fast.UNet (num_classes is the null label), [0, num_class_embeds) for diffusers'
    class embedding; a model that tells neither is not checked."""
    num_classes = _cfg(model, "num_classes")
    if _is_count(num_classes):
        top = num_classes
    elif _is_count(_cfg(model, "num_class_embeds")) and _cfg(model, "class_embed_type") in (None, _MISSING):
        top = _cfg(model, "num_class_embeds") - 1
    else:
        return
    low, high = torch.stack(torch.aminmax(labels)).tolist()  # one read of the device
    if null is not None:
        low, high = min(low, int(null)), max(high, int(null))
    if low < 0 or high > top:
        raise ValueError(
            f"class labels must lie in [0, {top}] for this model (the null label included), got {low}..{high}"
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _resolve_generators(generator: Generators, n: int, device: torch.device) -> torch.Generator | list | None:
    """The generator, or a list of n; a CUDA generator for a CPU run is refused (as diffusers does)."""
    if generator is None:
        return None
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(g).__name__}")
        if g.device.type not in ("cpu", device.type):
            raise ValueError(
                f"generator is on {g.device} but sampling runs on {device}: use a CPU generator or one on {device.type}"
            )
    if isinstance(generator, (list, tuple)):
        if len(gens) != n:
            raise ValueError(f"got {len(gens)} generators for {n} images: pass one per image, or a single one")
        return gens[0] if n == 1 else gens  # diffusers treats a list of one as one generator
    return generator


def _any_cpu(generators: torch.Generator | list | None) -> bool:
    gens = generators if isinstance(generators, list) else [generators]
    return any(g is not None and g.device.type == "cpu" for g in gens)


def _chunk_size(chunk_size: int | None, image_shape: tuple[int, ...], guided: bool) -> int:
    if chunk_size is not None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        return chunk_size
    pixels = math.prod(image_shape[1:]) if len(image_shape) > 1 else 1
    return max(1, CHUNK_PIXELS // pixels // (2 if guided else 1))


def _autocast_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    if dtype is None:  # bf16 where the hardware makes it pay: a GPU, or a CPU with bf16 units
        bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_bf16_autocast_default())
        return torch.bfloat16 if bf16 else None
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype (the model's autocast dtype) must be float32, bfloat16 or float16, got {dtype}")
    return None if dtype == torch.float32 else dtype


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- noise
def _randn(
    shape: tuple[int, ...],
    generators: torch.Generator | list | None,
    device: torch.device,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """diffusers' randn_tensor: a list draws (1, ...) per image from its generator; a CPU
    generator draws on the CPU and the result moves to the device. ``out``: a buffer (on the
    generators' device) that a list's draws go into, as the same values."""
    if isinstance(generators, list):
        rand_device = "cpu" if generators[0].device.type == "cpu" else device
        parts = [torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in generators]
        if out is not None:
            return torch.cat(parts, out=out)
        return torch.cat(parts).to(device)
    rand_device = "cpu" if generators is not None and generators.device.type == "cpu" else device
    return torch.randn(shape, generator=generators, device=rand_device, dtype=dtype).to(device)


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The generator that kernel-mode draws use: the given one when it is on the device, else a
    device generator seeded from one draw of it (so the loop draws nothing on the host)."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64))
    return torch.Generator(device=device).manual_seed(seed)


def _initial_sample(
    x_T: torch.Tensor | None,
    image: torch.Tensor | None,
    shape: tuple[int, ...],
    t0: int,
    schedule: Schedule,
    gens: torch.Generator | list | None,
    dev_gen: torch.Generator | None,
    torch_noise: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    if x_T is not None:
        return x_T.to(dtype).contiguous()
    if image is None:
        if torch_noise:
            return _randn(shape, gens, device, dtype)
        return torch.randn(shape, generator=dev_gen, device=device, dtype=dtype)
    t = torch.full((shape[0],), int(t0), dtype=torch.int64, device=device)
    x0 = image.to(dtype).contiguous()
    if torch_noise:  # diffusers' img2img: noise = randn_tensor(shape), then add_noise at the first timestep
        return q_sample(x0, t, schedule, noise=_randn(shape, gens, device, dtype))[0]
    return q_sample(x0, t, schedule, generator=dev_gen)[0]


# ---------------------------------------------------------------- model and step
class _ModelRunner:
    """Calls the model on x (or [x, x] with guidance) under autocast; returns the output tensor."""

    def __init__(
        self,
        model: Any,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        guided: bool,
        compile: bool,
        pass_labels: bool = True,
    ):
        self.fn = torch.compile(model, dynamic=False) if compile else model
        self.pass_labels = pass_labels
        self.device_type = device.type
        self.autocast_dtype = autocast_dtype
        self.guided = guided
        self.input_dtype = None
        if autocast_dtype is None and isinstance(model, torch.nn.Module):
            for p in model.parameters():  # a half-precision model without autocast takes its own dtype
                self.input_dtype = p.dtype if p.dtype.is_floating_point else None
                break

    def autocast_context(self) -> Any:
        """The model's autocast (the classifier of classifier guidance runs under it too)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # no weight-cast cache: it would outlive a CUDA-graph capture
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, cache_enabled=False)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x_in = torch.cat([x, x]) if self.guided else x
        if self.input_dtype is not None and self.input_dtype != x_in.dtype:
            x_in = x_in.to(self.input_dtype)
        with self.autocast_context():
            out = self.fn(x_in, t) if labels is None or not self.pass_labels else self.fn(x_in, t, class_labels=labels)
        if isinstance(out, torch.Tensor):
            return out
        value = getattr(out, "sample", _MISSING)
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise TypeError(f"the model must return a tensor or an object with .sample, got {type(out).__name__}")


def _check_model_output(out: torch.Tensor, x: torch.Tensor, n_model: int, plan: Any) -> None:
    c, spatial = x.shape[1], tuple(x.shape[2:])
    if not out.dtype.is_floating_point:
        raise TypeError(f"the model returned {out.dtype}; expected a floating-point prediction")
    if out.device != x.device:
        raise ValueError(f"the model returned a tensor on {out.device}; the sample is on {x.device}")
    if out.shape[0] != n_model or tuple(out.shape[2:]) != spatial or out.shape[1] not in (c, 2 * c):
        raise ValueError(
            f"the model output has shape {tuple(out.shape)} for an input of shape ({n_model}, {c}, "
            f"{', '.join(map(str, spatial))}); expected ({n_model}, {c} (or {2 * c} with a learned variance), "
            f"{', '.join(map(str, spatial))})"
        )
    ddpm = isinstance(plan, PosteriorPlan) and plan.config.kind == "ddpm"
    variance = plan.config.variance_type if isinstance(plan, PosteriorPlan) else None
    if ddpm and plan.learned_variance and out.shape[1] != 2 * c:
        raise ValueError(f"variance_type={variance!r} needs a model output with 2 x {c} channels, got {out.shape[1]}")
    if (ddpm or not isinstance(plan, PosteriorPlan)) and not plan.learned_variance and out.shape[1] == 2 * c:
        raise ValueError(
            f"the model returns {2 * c} channels (a learned variance) but variance_type={variance!r}: pass a "
            "scheduler_config with variance_type='learned_range' (improved-diffusion) or 'learned'"
        )


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """Run a CUDA graph's warm-up step on a side stream (as torch.cuda.graph's docs ask), then
    make the current stream wait for it."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def _graphs_possible(device: torch.device) -> bool:
    return device.type == "cuda"


def _capture(fn: Callable[[], None], generators: list[torch.Generator], pool: Any) -> Any:
    """A CUDA graph of fn() (its kernels recorded, not run), replaying the generators' draws."""
    graph = torch.cuda.CUDAGraph()
    for g in generators:
        graph.register_generator_state(g)
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


class _CudaGraphStep:
    """Model + step captured once for one chunk size. Replays read the model's t row, the step row
    and the labels from static buffers and update the static sample in place.

    Torch noise from one generator (or torch's default one) is drawn inside the graph: the
    generator is registered with it, and every replay draws from it and advances it. With one
    generator per image the draws stay out of the graph: a graph replays the draws of the
    generators registered at its capture, so a later chunk would draw from the first chunk's
    generators. Before each replay those images' noise is drawn from the chunk's own generators,
    as the eager step draws it, into a static buffer that the graph reads; one graph then serves
    every chunk of its size."""

    def __init__(
        self,
        graph: Any,
        x: torch.Tensor,
        t_row: torch.Tensor,
        row: torch.Tensor,
        labels: torch.Tensor | None,
        draw: bool,
        noise: torch.Tensor | None = None,
    ):
        self.graph, self.x, self.t_row, self.row = graph, x, t_row, row
        self.labels, self.draw, self.noise = labels, draw, noise
        self.labels_from: torch.Tensor | None = labels

    @classmethod
    def capture(
        cls,
        body: Callable[..., torch.Tensor],
        x: torch.Tensor,
        t_row: torch.Tensor,
        row: torch.Tensor,
        labels: torch.Tensor | None,
        gens: Any,
        draw: bool,
        torch_noise: bool,
        graphs: dict,
    ) -> _CudaGraphStep | None:
        """Capture body(x) (x came out of an eager step: the warm-up). None, with a warning,
        where the model or the generator cannot be captured."""
        per_image = torch_noise and draw and isinstance(gens, list)
        generators = []
        if torch_noise and draw and gens is not None and not per_image:
            if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
                return None  # this torch cannot replay a user generator's draws: run uncaptured
            generators = [gens]
        static_x, static_t_row, static_row = x.clone(), t_row.clone(), row.clone()
        static_labels = None if labels is None else labels.clone()
        static_noise = torch.empty(x.shape, dtype=x.dtype, device=x.device) if per_image else None

        def step() -> None:
            static_x.copy_(body(static_x, static_t_row, static_row, static_labels, gens, draw, static_noise))

        pool = next(iter(graphs.values())).graph.pool() if graphs else None
        try:
            graph = _capture(step, generators, pool)
        except Exception as err:  # noqa: BLE001 (any capture failure falls back to eager steps)
            warnings.warn(f"CUDA-graph capture failed ({err}); sampling without a graph", stacklevel=3)
            return None
        captured = cls(graph, static_x, static_t_row, static_row, static_labels, draw, static_noise)
        captured.labels_from = labels
        return captured

    def replay(
        self, x: torch.Tensor, t_row: torch.Tensor, row: torch.Tensor, labels: torch.Tensor | None, gens: Any
    ) -> torch.Tensor:
        """One step: x, the row, the labels (a new chunk's) and, with one generator per image,
        this step's noise from ``gens`` go into the static buffers; then the graph runs."""
        if x is not self.x:
            self.x.copy_(x)
        if labels is not None and labels is not self.labels_from:  # a new chunk's labels
            self.labels.copy_(labels)
            self.labels_from = labels
        self.t_row.copy_(t_row)
        self.row.copy_(row)
        if self.noise is not None:
            _randn(self.noise.shape, gens, self.noise.device, self.noise.dtype, out=self.noise)
        self.graph.replay()
        return self.x


# ---------------------------------------------------------------- output
def _postprocess(x: torch.Tensor, output_type: str) -> torch.Tensor | np.ndarray | list:
    if output_type == "tensor":
        return x
    images = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.float().cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    from PIL import Image

    uint8 = (array * 255).round().astype("uint8")
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in uint8]
