"""Input checks and tensor plumbing shared by the op wrappers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_value_checks = True


@contextlib.contextmanager
def no_value_checks() -> Iterator[None]:
    """Skip the checks that read tensor data (they sync the host with the device), e.g. in a
    sampling loop whose timesteps are known to be valid. Kernels clamp indices regardless."""
    global _value_checks
    old, _value_checks = _value_checks, False
    try:
        yield
    finally:
        _value_checks = old


def value_checks_enabled(device: torch.device | None = None) -> bool:
    """Data-reading checks run in eager mode only: never while compiling or capturing a graph.
    With a CPU ``device`` the capture query is skipped (it costs more than the check)."""
    if not _value_checks or torch.compiler.is_compiling():
        return False
    if device is not None and device.type == "cpu":
        return True
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def direct_call_ok(*tensors: torch.Tensor | None) -> bool:
    """True where calling an op's implementation directly is the same as going through the
    custom op: eager mode, plain tensors or parameters (no fake/functional subclasses), no
    autograd needed. It skips torch.library's dispatch, ~40 us a call, which dominates small
    launches (a U-Net's norms under no_grad pass nn.Parameter weights: those qualify)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # one loop: this runs on every eager call (eager_autograd_ok's test, and no gradient)
        if t is not None and (type(t) not in _PLAIN_TENSOR_TYPES or (grad and t.requires_grad)):
            return False
    return True


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager_autograd_ok(*tensors: torch.Tensor | None) -> bool:
    """True where an op may run its autograd as a plain torch.autograd.Function instead of the
    custom op: eager mode and plain tensors or parameters. torch.library's dispatch and autograd
    wrapper cost ~140 us a forward and ~250 us a backward, which is the whole op at batch-1 sizes;
    torch.compile keeps tracing the custom op."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) in _PLAIN_TENSOR_TYPES for t in tensors)


def check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype} (convert images to float first)"
        )
    if x.dim() < 2:
        raise ValueError(f"{name} must have a batch and at least one more dimension, got shape {tuple(x.shape)}")


def timesteps_arg(
    t: torch.Tensor | int,
    n: int,
    device: torch.device,
    name: str,
    num_train_timesteps: int,
    allow_minus_one: bool = False,
) -> torch.Tensor:
    """Per-sample int64 timesteps of shape (N,) on ``device``; an int is broadcast."""
    if isinstance(t, int):
        return torch.full((n,), t, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but the sample is on {device}: keep timesteps on the sample's device"
        )
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one timestep per sample), got {tuple(t.shape)}")
    if t.dtype != torch.int64 or not t.is_contiguous():
        t = t.to(torch.int64).contiguous()
    if n and value_checks_enabled(device):
        # One reduction and one read (one host sync on CUDA): a small call's wrapper time was
        # mostly this check when it took four ops.
        low = -1 if allow_minus_one else 0
        t_min, t_max = (int(v) for v in torch.aminmax(t))
        if t_min < low or t_max >= num_train_timesteps:
            raise ValueError(f"{name} must lie in [{low}, {num_train_timesteps - 1}], got {t_min}..{t_max}")
    return t


def as_3d(x: torch.Tensor) -> torch.Tensor:
    """An (N, C, S) view of x without copying when the trailing dims merge (NCHW and
    channels_last both do); otherwise a contiguous copy."""
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])  # not -1: that cannot be inferred when n * c is 0
    try:
        return x.view(n, c, s)
    except RuntimeError:
        return x.contiguous().view(n, c, s)


def kernel_view(x: torch.Tensor) -> torch.Tensor:
    """x as the C++/CUDA kernels take it: x itself where its dims after the second merge into
    one (contiguous and channels_last do; the kernels merge them), else as_3d(x)."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return as_3d(x)


def _as_is(x: torch.Tensor) -> torch.Tensor:
    return x


def kernel_views(backend: str):
    """(input view, output view) for a backend's launchers: the Triton ones take (N, C, S) views;
    the C++/CUDA kernels take (N, C, ...) tensors as they are (outputs come from new_like, and
    inputs whose trailing dims do not merge are copied)."""
    return (as_3d, as_3d) if backend == "triton" else (kernel_view, _as_is)


def new_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor with x's shape and memory format (channels_last stays so)."""
    out = torch.empty_like(x, dtype=dtype)
    if out.is_contiguous() or _views_3d(out):  # the first test is the cheap common case
        return out
    return torch.empty(x.shape, dtype=out.dtype, device=x.device)


def _views_3d(x: torch.Tensor) -> bool:
    try:
        x.view(*x.shape[:2], math.prod(x.shape[2:]))
        return True
    except RuntimeError:
        return False


def seed_from(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One int64 Philox key drawn from ``generator`` (it advances as torch's own draws do),
    as a device tensor, so that a replayed CUDA graph reads a fresh key."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def noise_arg(noise: torch.Tensor, like: torch.Tensor, name: str = "noise") -> torch.Tensor:
    """A tensor shaped like ``like`` on its device, in its dtype (the noise, or a guide)."""
    if not isinstance(noise, torch.Tensor) or not noise.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor")
    if noise.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(noise.shape)}, expected {tuple(like.shape)}")
    if noise.device != like.device:
        raise ValueError(f"{name} is on {noise.device}, expected {like.device}")
    return noise if noise.dtype == like.dtype else noise.to(like.dtype)
