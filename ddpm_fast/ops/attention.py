"""attention and attention_block: softmax(q k^T * scale) v over the H*W pixels of the U-Net.

``attention(q, k, v)`` takes SDPA's (B, H, S, D) layout. Backends:
- ``"triton"``: a flash-style kernel (kernels/triton_attention.py): online softmax with fp32
  running max and sum, the S x S scores never stored; head_dim up to 512 (the 256x256 models'),
  beyond SDPA's flash path. A custom op (``ddpm_fast::attention``) with a fake implementation
  and an autograd formula whose backward (``ddpm_fast::attention_backward``) is a custom op too,
  so that a compiled training step keeps both as single nodes;
- ``"sdpa"``: torch's scaled_dot_product_attention (flash / memory-efficient / math, as torch picks);
- ``"reference"``: reference.attention (explicit softmax, fp32).
None picks (``ddpm_fast._backends.choose``): on CUDA, SDPA up to head_dim 256 (its flash and
memory-efficient kernels), Triton beyond. On CPU, what measured fastest per shape class
(benchmarks/results/cpu-*-attention.json, 2-core EPYC): the plain reference (two matmuls and a
softmax) for heads of 256 and more when gradients are needed (fwd+bwd at 8x1x256x256: 16.1 ms vs
SDPA 18.9) and for heads over 256 (forward at 2x1x256x512: 2.37 ms vs 2.60), else SDPA (its
flash-style CPU kernel; 8 heads of 64 over 512 tokens: 6.1 ms vs 8.3 forward, 16.7 vs 22.7
fwd+bwd). Elsewhere SDPA.

``attention_block`` is a Python composite of ops: GroupNorm (group_norm_silu with silu=False),
the qkv projection writing (N, S, 3C) from which q, k and v are strided views (no copies), the
attention, the output projection with the residual folded into the GEMM (baddbmm).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .. import reference
from .._backends import OP_BACKENDS, choose
from ._common import as_3d, direct_call_ok
from .groupnorm_silu import group_norm_silu

ATTENTION_BACKENDS = OP_BACKENDS["attention"]
MAX_HEAD_DIM = 512
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- the Triton custom ops
def _lse_shape(q: torch.Tensor) -> tuple[int, int, int]:
    return q.shape[0], q.shape[1], q.shape[2]


def _out_like(q: torch.Tensor, dv: int) -> torch.Tensor:
    """(B, H, S, Dv) stored as (B, S, H, Dv): the heads of one token side by side, so the block's
    output projection reads (B, S, H * Dv) as a view (one head: the same as contiguous)."""
    b, h, s, _ = q.shape
    return q.new_empty((b, s, h, dv)).transpose(1, 2)


def _attention_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): o (B, H, Sq, D) in q's dtype; lse (B, H, Sq) fp32, the log-sum-exp of the scaled
    scores of each query (what the backward needs to rebuild the probabilities)."""
    from ..kernels.triton_attention import attention_fwd_triton

    o = _out_like(q, v.shape[-1])
    lse = q.new_empty(_lse_shape(q), dtype=torch.float32)
    if o.numel():
        attention_fwd_triton(q, k, v, o, lse, scale)
    return o, lse


_attention_op = torch.library.custom_op("ddpm_fast::attention", mutates_args=())(_attention_impl)


@_attention_op.register_fake
def _(q, k, v, scale):
    return _out_like(q, v.shape[-1]), q.new_empty(_lse_shape(q), dtype=torch.float32)


@torch.library.custom_op("ddpm_fast::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each shaped and typed like its input."""
    from ..kernels.triton_attention import attention_bwd_triton

    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    if q.numel() and k.numel():
        attention_bwd_triton(grad_o.to(q.dtype), q, k, v, o, lse, dq, dk, dv, scale)
    else:
        for t in (dq, dk, dv):
            t.zero_()
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(grad_o, q, k, v, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_o, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- dispatch and checks
def _backend_for(requested: str | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return choose("attention", requested, q.device, dtype=q.dtype, head_dim=q.shape[-1], needs_grad=needs_grad)


def _check_qkv(q: object, k: object, v: object, scale: object) -> None:
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, seq, head_dim) as SDPA takes, got shape {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"k has shape {tuple(k.shape)}, expected ({b}, {h}, seq_k, {d}) to match q {tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}, expected k's {tuple(k.shape)}")
    if k.shape[2] == 0 and q.shape[2] and b * h:
        raise ValueError("k and v have no keys (seq_k = 0): the softmax over them is undefined")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} is not supported: 1..{MAX_HEAD_DIM} (split the heads further)")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v, no mask, as ``F.scaled_dot_product_attention(q, k, v, scale=scale)``.

    Args:
        q: (B, H, Sq, D); k, v: (B, H, Sk, D); float32/float16/bfloat16 (float64 on sdpa and
            reference), one dtype and device, any strides. D (head_dim) 1..512.
        scale: multiplies the scores; None = D ** -0.5.
        backend: "triton", "sdpa" or "reference"; None picks (module docstring).

    Softmax statistics are fp32 whatever the dtype. Differentiable in q, k and v.

    Returns:
        (B, H, Sq, D) in q's dtype.
    """
    _check_qkv(q, k, v, scale)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    name = _backend_for(backend, q, k, v)
    if name == "reference":
        return reference.attention(q, k, v, scale)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    op = _attention_impl if direct_call_ok(q, k, v) else _attention_op  # no autograd: skip dispatch
    return op(q, k, v, scale)[0]


# ---------------------------------------------------------------- the U-Net block
def _check_param(t: object, name: str, shape: tuple[int, ...], x: torch.Tensor, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, expected {x.device} (x's device)")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def attention_block(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    *,
    num_groups: int = 32,
    eps: float = 1e-6,
    num_heads: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """The U-Net self-attention block over the H*W pixels, as reference.attention_block:

        h = GroupNorm(x);  q, k, v = split(h W_qkv^T + b_qkv);  o = attention(q, k, v) per head
        y = x + o W_proj^T + b_proj

    Args:
        x: (N, C, H, W) (or (N, C, L)), NCHW or channels_last, float32/float16/bfloat16/float64.
        norm_weight, norm_bias: (C,) GroupNorm affine.
        qkv_weight: (3C, C) = [to_q; to_k; to_v] (diffusers' to_q/to_k/to_v weights, or the
            original DDPM's q/k/v 1x1 convs squeezed, concatenated along dim 0); qkv_bias (3C,) or None.
        proj_weight: (C, C) (diffusers' to_out[0], DDPM's proj_out); proj_bias (C,) or None.
        num_groups, eps: the GroupNorm's; num_heads divides C (head_dim = C / num_heads).
        backend: the attention's ("triton", "sdpa", "reference"; None picks); "reference" also
            runs the reference GroupNorm.

    Weights are used in x's dtype; under autocast the projections and the attention run in the
    autocast dtype and the residual add in x's, as in the reference. Differentiable in every tensor.

    Returns:
        y shaped like x, in x's dtype; channels_last stays channels_last.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 3:
        raise ValueError(f"x must be (N, C, H, W) or (N, C, L), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    n, c = x.shape[:2]
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0 or c % num_heads:
        raise ValueError(f"num_heads={num_heads!r} must be a positive int dividing the {c} channels")
    _check_param(norm_weight, "norm_weight", (c,), x)
    _check_param(norm_bias, "norm_bias", (c,), x)
    _check_param(qkv_weight, "qkv_weight", (3 * c, c), x)
    _check_param(qkv_bias, "qkv_bias", (3 * c,), x, optional=True)
    _check_param(proj_weight, "proj_weight", (c, c), x)
    _check_param(proj_bias, "proj_bias", (c,), x, optional=True)
    gn_backend = "reference" if backend == "reference" else None  # the oracle runs whole; else the fastest
    h = group_norm_silu(x, num_groups, norm_weight, norm_bias, eps, silu=False, backend=gn_backend)
    dtype = x.dtype
    w_qkv, w_proj = qkv_weight.to(dtype), proj_weight.to(dtype)
    # Tokens (N, S, C): a view of h, contiguous for channels_last, column-major per sample for
    # NCHW; bmm reads either layout in place (F.linear would copy the NCHW one).
    tokens = as_3d(h).transpose(1, 2)
    s = tokens.shape[1]
    qkv = torch.bmm(tokens, w_qkv.t().expand(n, c, 3 * c))  # (N, S, 3C)
    if qkv_bias is not None:
        qkv = qkv + qkv_bias.to(qkv.dtype)  # qkv's: bf16 under autocast
    d = c // num_heads
    # unbind: the backward stacks dq, dk, dv into one (N, S, 3C) gradient (slices would each zero-fill it)
    q, k, v = (t.transpose(1, 2) for t in qkv.view(n, s, 3, num_heads, d).unbind(2))
    o = attention(q, k, v, backend=backend).transpose(1, 2).reshape(n, s, c)  # a view for Triton's output
    x3 = as_3d(x)
    tokens_out = x3.stride(1) == 1 and c > 1  # channels_last: y in (N, S, C); NCHW: y in (N, C, S)
    residual = x3.transpose(1, 2) if tokens_out else x3
    a, b = (o, w_proj.t().expand(n, c, c)) if tokens_out else (w_proj.expand(n, c, c), o.transpose(1, 2))
    if o.dtype == x.dtype:
        y = torch.baddbmm(residual, a, b)  # the residual folded into the GEMM
    else:  # autocast ran the projections in lower precision: the residual stays in x's dtype (as reference's)
        y = residual + torch.bmm(a, b)
    if proj_bias is not None:
        y = y + (proj_bias if tokens_out else proj_bias[:, None]).to(y.dtype)
    return (y.transpose(1, 2) if tokens_out else y).reshape(x.shape)
