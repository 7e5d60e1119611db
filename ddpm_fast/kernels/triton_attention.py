"""Flash-style attention in Triton, forward and backward (FlashAttention-2's algorithm), no mask:

    o = softmax(q k^T * scale) v        q: (B, H, Sq, D), k, v: (B, H, Sk, D), any strides

Forward: a program holds BLOCK_M queries and walks the keys BLOCK_N at a time with an online
softmax (fp32 running max m and sum l, scores in base 2: s * scale * log2 e), so the Sq x Sk
score matrix is never stored; it writes o and lse2 = m + log2 l per query (fp32) for the backward.
Backward: delta = rowsum(o * do) (_attn_bwd_delta_kernel), then one kernel per key block
accumulating dk and dv over the queries, one per query block accumulating dq over the keys: each
gradient has one writer, so no atomics and a fixed summation order (deterministic).

The head dimension: D is padded to a power of two (BLOCK_D >= 16; loads masked, so D = 96, 160,
320 work). Where the whole head fits (BLOCK_D <= 256 here) a program holds q (or k and v) for the
whole loop (fp16/bf16; fp32 up to 32, its products run on FMA units with operands in registers).
Wider heads (512) do not fit a program's registers at useful block sizes (DESIGN.md:
BM = BN = 64 at 8 warps spills), so there the head dim is split two ways:
- the score products (q k^T, do v^T) run over D in BLOCK_DK chunks loaded as they are needed (a
  runtime loop: unrolled, the chunks' loads were hoisted and spilled);
- the output (o, dq, dk, dv) is split into BLOCK_DV slices, one per program (grid axis 1): each
  program recomputes the scores over the whole of D (1.5x the FLOPs at D = 512, two slices) but
  holds only a [BLOCK, BLOCK_DV] fp32 accumulator.
Configurations are a pure function of (shapes, dtype, arch) (attention_config), so the AOT check
asks for them without a GPU. fp32 inputs multiply in IEEE fp32 (input_precision="ieee"), not TF32.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._backends import triton_interpreting
from .launch import cdiv, launch, next_power_of_2

LOG2E = 1.4426950408889634  # scores run in base 2: exp(x) = exp2(x log2 e)
# Widest head held whole by a program; wider heads are split (module docstring).
MAX_RESIDENT_D = 256


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    block_m: int  # queries per program (forward, dq) or per loop step (dk/dv)
    block_n: int  # keys per program (dk/dv) or per loop step (forward, dq)
    block_d: int  # the head dim padded to a power of two
    block_dk: int  # head-dim chunk of the score products; block_d when the head is held whole
    block_dv: int  # head-dim slice of the output a program writes
    num_warps: int
    num_stages: int

    @property
    def num_dk(self) -> int:
        return self.block_d // self.block_dk


def _pow2(x: int, low: int = 16) -> int:
    return max(low, next_power_of_2(max(x, 1)))


def attention_config(
    sq: int, sk: int, d: int, dtype: torch.dtype, arch: int | None, backward: bool = False
) -> AttentionConfig:
    """Block sizes, warps and pipeline stages for one launch; ``arch`` is the CUDA compute
    capability (90, 80) or None (the interpreter: the sm_90 configuration, so the kernels tested
    on CPU are those that run). Chosen from the AOT report (python -m ddpm_fast._aot): no register
    spills, shared memory within the device's (227 KB sm_90, 163 KB sm_80).

    fp16/bf16, head held whole (D <= 256): BLOCK_M = 64 (wgmma's M); BLOCK_N 64, 32 at D = 256 and
    at D >= 128 in the backward (whose program holds two accumulators); 8 warps at D = 256, else 4.
    fp16/bf16, D = 512: 64 x 64 blocks (the backward on sm_80: 32 x 32, one stage), 64-wide score
    chunks, two 256-wide output slices, 8 warps.
    fp32 (IEEE products on the FMA units, whose operand tiles live in registers): held whole up to
    D = 32; wider heads in 32-wide score chunks and output slices up to 128 wide, 32 x 32 blocks,
    8 warps (one stage in the backward)."""
    block_d = _pow2(d)
    hopper = arch is None or arch >= 90
    if dtype == torch.float32:
        block_m, block_n, num_warps = 32, 32, 8
        block_dk, block_dv = min(block_d, 32), min(block_d, 128)
        num_stages = 1 if backward else 2
    elif block_d <= MAX_RESIDENT_D:
        block_m, block_n = 64, 64
        if block_d >= 256 or (backward and block_d >= 128):
            block_n = 32
        num_warps = 8 if block_d >= 256 else 4
        block_dk = block_dv = block_d
        num_stages = 3 if hopper else 2
    else:
        block_m, block_n, num_warps, num_stages = 64, 64, 8, 2
        if backward and not hopper:  # sm_80's mma.sync operand layouts take more registers
            block_m, block_n, num_stages = 32, 32, 1
        block_dk, block_dv = 64, 256
    # Short sequences: no blocks larger than the (padded) sequence they cover.
    block_m = min(block_m, _pow2(sq))
    block_n = min(block_n, _pow2(sk))
    return AttentionConfig(block_m, block_n, block_d, block_dk, block_dv, num_warps, num_stages)


# ---------------------------------------------------------------- shared pieces
@triton.jit
def _program_ids(H, num_blocks):
    """(block index along the sequence, batch offset b, head h, output slice) of this program."""
    pid = tl.program_id(0)
    bh = pid // num_blocks
    return pid % num_blocks, (bh // H).to(tl.int64), (bh % H).to(tl.int64), tl.program_id(1)


@triton.jit
def _tile(base, rows, cols, rmask, cmask, s_row, s_col):
    """base[rows, cols] as a [len(rows), len(cols)] tile; out-of-range entries are 0."""
    return tl.load(
        base + rows[:, None] * s_row + cols[None, :] * s_col, mask=rmask[:, None] & cmask[None, :], other=0.0
    )


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b (fp32). UPCAST: bf16 operands multiplied in fp32, for the Triton 3.9 interpreter,
    whose tl.dot multiplies the uint16 bit patterns of bf16 tiles (the products are exact either way)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _chunked_dot(a_base, a_rows, a_mask, sa_row, sa_d, b_base, b_rows, b_mask, sb_row, sb_d, D,
                 ROWS_A: tl.constexpr, ROWS_B: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """a[a_rows, :D] @ b[b_rows, :D]^T over D in NUM_DK chunks of BLOCK_DK, loaded chunk by chunk."""
    acc = tl.zeros([ROWS_A, ROWS_B], tl.float32)
    for i in range(NUM_DK):
        d = i * BLOCK_DK + tl.arange(0, BLOCK_DK)
        dmask = d < D
        a = _tile(a_base, a_rows, d, a_mask, dmask, sa_row, sa_d)
        bt = _tile(b_base, d, b_rows, dmask, b_mask, sb_d, sb_row)
        acc = _dot(a, bt, acc, PRECISION, UPCAST)
    return acc


# ---------------------------------------------------------------- forward
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    H, SQ, SK, D, qk_scale, num_m_blocks,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One (query block, batch * head, output slice): online softmax over all the keys."""
    m_block, b, h, dv_block = _program_ids(H, num_m_blocks)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < SQ
    offs_c = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    c_mask = offs_c < D
    if NUM_DK == 1:  # the head held whole: q loaded once
        offs_d = tl.arange(0, BLOCK_DK)
        q = _tile(q_base, offs_m, offs_d, m_mask, offs_d < D, sqs, sqd)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, SK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < SK
        if NUM_DK == 1:
            kt = _tile(k_base, offs_d, offs_n, offs_d < D, n_mask, skd, sks)
            s = _dot(q, kt, None, PRECISION, UPCAST)
        else:
            s = _chunked_dot(q_base, offs_m, m_mask, sqs, sqd, k_base, offs_n, n_mask, sks, skd, D,
                             BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, PRECISION, UPCAST)  # fmt: skip
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(v_base, offs_n, offs_c, n_mask, c_mask, svs, svd)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
    o = acc / l_i[:, None]
    o_ptrs = o_ptr + b * sob + h * soh + offs_m[:, None] * sos + offs_c[None, :] * sod
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])
    if dv_block == 0:
        bh = b * H + h
        tl.store(lse_ptr + bh * SQ + offs_m, m_i + tl.log2(l_i), mask=m_mask)


# ---------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr,
    H, SQ, D, num_m_blocks,
    sob, soh, sos, sod, sdb, sdh, sds, sdd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(o * do) per query, fp32 (dS = P (dP - delta))."""
    m_block, b, h, _ = _program_ids(H, num_m_blocks)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < SQ
    acc = tl.zeros([BLOCK_M], tl.float32)
    for start_d in range(0, D, BLOCK_D):
        offs_d = start_d + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        o = _tile(o_ptr + b * sob + h * soh, offs_m, offs_d, m_mask, d_mask, sos, sod).to(tl.float32)
        do = _tile(do_ptr + b * sdb + h * sdh, offs_m, offs_d, m_mask, d_mask, sds, sdd).to(tl.float32)
        acc += tl.sum(o * do, 1)
    tl.store(delta_ptr + (b * H + h) * SQ + offs_m, acc, mask=m_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, SQ, SK, D, qk_scale, scale, num_n_blocks,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One (key block, batch * head, output slice): dk and dv summed over every query block, in
    the transposed orientation (rows = keys): pT = exp2(k q^T * scale log2 e - lse2),
    dv += pT do, dsT = pT (v do^T - delta), dk += dsT q (times scale at the end)."""
    n_block, b, h, dv_block = _program_ids(H, num_n_blocks)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    do_base = do_ptr + b * sdb + h * sdh
    bh = b * H + h
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < SK
    offs_c = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    c_mask = offs_c < D
    if NUM_DK == 1:  # the head held whole: k and v loaded once (then BLOCK_DV == BLOCK_DK)
        k = _tile(k_base, offs_n, offs_c, n_mask, c_mask, sks, skd)
        v = _tile(v_base, offs_n, offs_c, n_mask, c_mask, svs, svd)
    dk = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, SQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < SQ
        # Rows past SQ: lse2 = +inf makes their probabilities 0.
        lse = tl.load(lse_ptr + bh * SQ + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(delta_ptr + bh * SQ + offs_m, mask=m_mask, other=0.0)
        q = _tile(q_base, offs_m, offs_c, m_mask, c_mask, sqs, sqd)
        do = _tile(do_base, offs_m, offs_c, m_mask, c_mask, sds, sdd)
        if NUM_DK == 1:
            qkt = _dot(k, tl.trans(q), None, PRECISION, UPCAST)
            dpt = _dot(v, tl.trans(do), None, PRECISION, UPCAST)
        else:
            qkt = _chunked_dot(k_base, offs_n, n_mask, sks, skd, q_base, offs_m, m_mask, sqs, sqd, D,
                               BLOCK_N, BLOCK_M, BLOCK_DK, NUM_DK, PRECISION, UPCAST)  # fmt: skip
            dpt = _chunked_dot(v_base, offs_n, n_mask, svs, svd, do_base, offs_m, m_mask, sds, sdd, D,
                               BLOCK_N, BLOCK_M, BLOCK_DK, NUM_DK, PRECISION, UPCAST)  # fmt: skip
        pt = tl.exp2(qkt * qk_scale - lse[None, :])
        dv = _dot(pt.to(do.dtype), do, dv, PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk = _dot(dst.to(q.dtype), q, dk, PRECISION, UPCAST)
    out_mask = n_mask[:, None] & c_mask[None, :]
    dk_ptrs = dk_ptr + b * sdkb + h * sdkh + offs_n[:, None] * sdks + offs_c[None, :] * sdkd
    tl.store(dk_ptrs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=out_mask)
    dv_ptrs = dv_ptr + b * sdvb + h * sdvh + offs_n[:, None] * sdvs + offs_c[None, :] * sdvd
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    H, SQ, SK, D, qk_scale, scale, num_m_blocks,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    sdqb, sdqh, sdqs, sdqd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One (query block, batch * head, output slice): dq = scale * sum over keys of dS k,
    dS = P (do v^T - delta)."""
    m_block, b, h, dv_block = _program_ids(H, num_m_blocks)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    do_base = do_ptr + b * sdb + h * sdh
    bh = b * H + h
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < SQ
    offs_c = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    c_mask = offs_c < D
    lse = tl.load(lse_ptr + bh * SQ + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(delta_ptr + bh * SQ + offs_m, mask=m_mask, other=0.0)
    if NUM_DK == 1:  # the head held whole: q and do loaded once
        q = _tile(q_base, offs_m, offs_c, m_mask, c_mask, sqs, sqd)
        do = _tile(do_base, offs_m, offs_c, m_mask, c_mask, sds, sdd)
    dq = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, SK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < SK
        k = _tile(k_base, offs_n, offs_c, n_mask, c_mask, sks, skd)
        if NUM_DK == 1:
            vt = _tile(v_base, offs_c, offs_n, c_mask, n_mask, svd, svs)
            s = _dot(q, tl.trans(k), None, PRECISION, UPCAST)
            dp = _dot(do, vt, None, PRECISION, UPCAST)
        else:
            s = _chunked_dot(q_base, offs_m, m_mask, sqs, sqd, k_base, offs_n, n_mask, sks, skd, D,
                             BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, PRECISION, UPCAST)  # fmt: skip
            dp = _chunked_dot(do_base, offs_m, m_mask, sds, sdd, v_base, offs_n, n_mask, svs, svd, D,
                              BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, PRECISION, UPCAST)  # fmt: skip
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PRECISION, UPCAST)
    dq_ptrs = dq_ptr + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_c[None, :] * sdqd
    tl.store(dq_ptrs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])


# ---------------------------------------------------------------- launchers
def _arch(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 = the default; fp16/bf16 ignore it


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and triton_interpreting()  # _dot: the interpreter's bf16 tl.dot is wrong


def _check_offsets(*tensors: torch.Tensor) -> None:
    """In-tile offsets are int32 (the per-(batch, head) base is int64): one head's extent must fit."""
    for t in tensors:
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[2:], t.stride()[2:], strict=True))
        if extent >= 2**31:
            raise ValueError(f"one head of a {tuple(t.shape)} tensor spans {extent} elements: at most 2^31 supported")


def attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    *,
    arch: int | None = None,
) -> None:
    """Writes o (B, H, Sq, D) and lse (B, H, Sq) contiguous fp32, log2-sum-exp2 of scores * scale * log2 e.
    ``arch`` overrides the device's compute capability in the choice of configuration (the AOT check)."""
    bsz, heads, sq, d = q.shape
    sk = k.shape[2]
    _check_offsets(q, k, v, o)
    cfg = attention_config(sq, sk, d, q.dtype, arch or _arch(q.device))
    num_m = cdiv(sq, cfg.block_m)
    grid = (num_m * bsz * heads, cdiv(d, cfg.block_dv))
    launch(
        _attn_fwd_kernel, grid, (q, k, v, o, lse),
        (heads, sq, sk, d, scale * LOG2E, num_m, *q.stride(), *k.stride(), *v.stride(), *o.stride()),
        cfg.num_warps, cfg.num_stages,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_DK=cfg.block_dk, NUM_DK=cfg.num_dk, BLOCK_DV=cfg.block_dv,
        PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
    )  # fmt: skip


def attention_bwd_triton(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    scale: float,
    *,
    arch: int | None = None,
) -> None:
    """Writes dq, dk, dv (shaped like q, k, v) from do (like o), o and the forward's lse; ``arch`` as
    attention_fwd_triton's."""
    bsz, heads, sq, d = q.shape
    sk = k.shape[2]
    _check_offsets(q, k, v, o, do, dq, dk, dv)
    cfg = attention_config(sq, sk, d, q.dtype, arch or _arch(q.device), backward=True)
    precision = _precision(q.dtype)
    delta = torch.empty_like(lse)
    block_m_delta = 64
    num_m = cdiv(sq, block_m_delta)
    launch(
        _attn_bwd_delta_kernel, (num_m * bsz * heads, 1), (o, do, delta),
        (heads, sq, d, num_m, *o.stride(), *do.stride()), 4, BLOCK_M=block_m_delta, BLOCK_D=min(128, cfg.block_d),
    )  # fmt: skip
    blocks = dict(
        BLOCK_DK=cfg.block_dk, NUM_DK=cfg.num_dk, BLOCK_DV=cfg.block_dv, PRECISION=precision, UPCAST=_upcast(q.dtype)
    )  # fmt: skip
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    num_n = cdiv(sk, cfg.block_n)
    qk_scale = scale * LOG2E
    launch(
        _attn_bwd_dkdv_kernel, (num_n * bsz * heads, cdiv(d, cfg.block_dv)), (q, k, v, do, lse, delta, dk, dv),
        (heads, sq, sk, d, qk_scale, scale, num_n, *strides, *dk.stride(), *dv.stride()),
        cfg.num_warps, cfg.num_stages, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **blocks,
    )  # fmt: skip
    num_m = cdiv(sq, cfg.block_m)
    launch(
        _attn_bwd_dq_kernel, (num_m * bsz * heads, cdiv(d, cfg.block_dv)), (q, k, v, do, lse, delta, dq),
        (heads, sq, sk, d, qk_scale, scale, num_m, *strides, *dq.stride()),
        cfg.num_warps, cfg.num_stages, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **blocks,
    )  # fmt: skip
