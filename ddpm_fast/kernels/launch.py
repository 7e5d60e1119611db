"""Launch configurations, the cached launch, layouts, index helpers and the in-kernel noise shared
by the elementwise Triton kernels.

Configurations are a pure function of (shape, device) so that the ahead-of-time compile check
can ask for them without a GPU; no autotuning (it does not run under the interpreter).

Launch cost. At CIFAR sizes (256x3x32x32) a kernel runs in a few microseconds and a call is all
host time. ``kernel[grid](...)`` spends most of it in Triton's JIT: binding every argument,
specialising it (dtype and 16-byte alignment of each pointer, value classes of each int), hashing
the specialisation into the cache key and checking the kernel's global constexprs (~55-110 us a
call of the old 27- and 38-argument kernels on this CPU, measured through a stand-in driver).
``launch`` pays that once per (kernel, device, argument key) and then calls the compiled kernel's
launcher directly, as the JIT's own last step does. The elementwise kernels take (N, C, S) sizes
and a layout code per tensor instead of three strides per tensor (``layouts``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

MAX_BLOCK = 1024

# Memory orders of an (N, C, S) view that the elementwise kernels read and write in place.
NCHW, NHWC = 0, 1


def elementwise_config(row_len: int, device: torch.device | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel whose program covers BLOCK elements of one row of
    length ``row_len``: the whole row up to 1024 (fewer, fuller programs), at least 16."""
    block = max(16, min(MAX_BLOCK, next_power_of_2(row_len)))
    return block, max(1, min(8, block // 128))


# triton.cdiv and triton.next_power_of_2 are constexpr functions since triton 3.9 (~2 us a call
# from Python): the launchers use these.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


# ---------------------------------------------------------------- layouts
def layout_of(x: torch.Tensor) -> int | None:
    """NCHW if the (N, C, S) view x is contiguous, NHWC if its (N, S, C) transpose is, else None.
    Strides of size-1 dims do not matter (torch reports either)."""
    if x.is_contiguous():
        return NCHW
    n, c, s = x.shape
    sn, sc, ss = x.stride()
    if (c == 1 or sc == 1) and (s == 1 or ss == c) and (n == 1 or sn == c * s):
        return NHWC
    return None


class Operands:
    """The tensors of one elementwise launch, taken in the kernel's order, and the layout code the
    kernel gets: bit i set where operand i is stored NHWC, clear where NCHW (or absent, None).
    A tensor in neither layout (a sliced or permuted view) goes through an NCHW copy: an input is
    copied before the launch, an output is written to a temporary copied into it by ``finish``."""

    def __init__(self) -> None:
        self.code = 0
        self._bit = 1
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _next(self, x: torch.Tensor | None, output: bool) -> torch.Tensor | None:
        bit, self._bit = self._bit, self._bit << 1
        if x is None:
            return None
        layout = layout_of(x)
        if layout == NHWC:
            self.code |= bit
        elif layout is None and output:
            tmp = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            self._pending.append((x, tmp))
            return tmp
        elif layout is None:
            return x.contiguous()
        return x

    def read(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return self._next(x, output=False)

    def write(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return self._next(y, output=True)

    def finish(self) -> None:
        """After the launch: copy the outputs' temporaries into them."""
        for dst, tmp in self._pending:
            dst.copy_(tmp)


@triton.jit
def offset(n, c, s, C, S, NHWC: tl.constexpr):
    """Element (n, c, s) of an (N, C, S) tensor stored NCHW ((n C + c) S + s) or NHWC
    ((n S + s) C + c); int64 when n, c or s is."""
    if NHWC:
        off = (n * S + s) * C + c
    else:
        off = (n * C + c) * S + s
    return off


@triton.jit
def row_index(C, S, BLOCK: tl.constexpr):
    """Program (row, tile) of an (N, C, S) view: row = n * C + c; s the tile's positions."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return row, row // C, row % C, s, s < S


# ---------------------------------------------------------------- the cached launch
def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


# The compiled kernel's launcher is called as JITFunction.run calls it in triton 3.6, 3.8 and 3.9
# (read in their sources, checked against a recording driver by tests/test_aot.py): other
# versions, and DDPM_FAST_TRITON_LAUNCH_CACHE=0, take the plain kernel[grid](...) every call.
CACHED_LAUNCH = (3, 6) <= _version(triton.__version__) < (3, 10) and os.environ.get(
    "DDPM_FAST_TRITON_LAUNCH_CACHE", "1"
) not in ("0", "")
_MAX_ENTRIES = 4096
_compiled: dict = {}


def launch(
    kernel,
    grid: tuple[int, ...],
    tensors: tuple,
    scalars: tuple,
    num_warps: int,
    num_stages: int | None = None,
    **constexprs,
) -> None:
    """``kernel[grid](*tensors, *scalars, **constexprs, num_warps=num_warps, num_stages=num_stages)``
    (num_stages: Triton's default when None): the kernel takes its pointer arguments first, then
    its int and float ones, then its constexprs (given by name, in the kernel's order).

    The first call per (kernel, current device, key) goes through the JIT (compiling if needed)
    and keeps the compiled kernel that it ran; later calls launch that kernel directly with what
    the JIT would pass: the current stream, the launch hooks, every argument. The key holds what
    the JIT's specialisation reads: each tensor's dtype, each int's value (its type, ==1 and %16
    classes follow), float as a type, the constexpr values; calls with a pointer off a 16-byte
    boundary (specialised per argument) take the JIT every time. Global Triton options (debug,
    instrumentation) are read at a key's first call. Under the interpreter, with a stand-in kernel
    (the AOT recorder) or where CACHED_LAUNCH is off, every call is the plain JIT call."""
    key = None
    if CACHED_LAUNCH and type(kernel) is JITFunction:
        pointers = 0
        for tensor in tensors:
            pointers |= tensor.data_ptr()
        if pointers % 16 == 0:
            driver = triton.runtime.driver.active
            device = driver.get_current_device()
            key = (
                id(kernel),
                device,
                num_warps,
                num_stages,
                *constexprs.values(),
                *[tensor.dtype for tensor in tensors],
                *[float if type(value) is float else value for value in scalars],
            )
            compiled = _compiled.get(key)
            if compiled is not None:  # JITFunction.run's last step, as it does it
                stream = driver.get_current_stream(device)
                args = (*tensors, *scalars, *constexprs.values())
                size = len(grid)
                meta = compiled.launch_metadata(grid, stream, *args)
                hooks = triton.knobs.runtime
                compiled.run(
                    grid[0],
                    grid[1] if size > 1 else 1,
                    grid[2] if size > 2 else 1,
                    stream,
                    compiled.function,
                    compiled.packed_metadata,
                    meta,
                    hooks.launch_enter_hook,
                    hooks.launch_exit_hook,
                    *args,
                )
                return
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    result = kernel[grid](*tensors, *scalars, **constexprs, **options)
    if key is not None and _cacheable(kernel, result, len(tensors) + len(scalars), constexprs):
        if len(_compiled) >= _MAX_ENTRIES:
            _compiled.clear()
        _compiled[key] = result


def clear_cache() -> None:
    """Forget every compiled kernel that ``launch`` kept (the next call of each goes through the JIT)."""
    _compiled.clear()


def _cacheable(kernel, result: object, num_args: int, constexprs: dict) -> bool:
    """Whether the JIT's result is a compiled kernel that ``launch`` may call directly: the
    positional arguments and the constexprs in the order given cover the signature in order."""
    from triton.compiler import CompiledKernel

    names = [param.name for param in kernel.params]
    return isinstance(result, CompiledKernel) and names[num_args:] == list(constexprs)


@triton.jit
def cos_or_sin(theta, want_sin):
    """cos(theta), or sin(theta) where ``want_sin``, for theta in [0, 2 pi] (fp32): one Cody-Waite
    reduction by pi/2 (in three parts) and Cephes' minimax polynomials on [-pi/4, pi/4], as
    csrc/philox_cpu.cpp's sincos8 (within 1e-7 of the exact values). Not tl.cos and tl.sin:
    libdevice keeps a local-memory array in each for huge arguments, and both in one kernel left
    8 bytes of stack in the posterior kernel."""
    q = tl.floor(theta * 0.63661977236758134 + 0.5)  # theta = q pi/2 + x, q in 0..4
    x = tl.fma(-q, 1.5703125, theta)
    x = tl.fma(-q, 4.837512969970703125e-4, x)
    x = tl.fma(-q, 7.54978995489188216e-8, x)
    z = x * x
    s = tl.fma(z, -1.9515295891e-4, 8.3321608736e-3)
    s = tl.fma(z, s, -1.6666654611e-1)
    s = tl.fma(z * x, s, x)
    c = tl.fma(z, 2.443315711809948e-5, -1.388731625493765e-3)
    c = tl.fma(z, c, 4.166664568298827e-2)
    c = tl.fma(z * z, c, tl.fma(z, -0.5, 1.0))
    # cos(theta) = sin(theta + pi/2); sin(x + k pi/2) is s, c, -s, -c for k % 4 = 0, 1, 2, 3
    k = q.to(tl.int32) + tl.where(want_sin, 0, 1)
    v = tl.where(k % 2 == 0, s, c)
    return tl.where(k % 4 >= 2, -v, v)


@triton.jit
def philox_normal(seed, element):
    """The normal of logical element ``element`` (int64, any block shape) of the stream ``seed``:
    lane element % 4 of ``tl.randn4x(seed, element // 4)`` (the contract of csrc/philox.h), up to
    the rounding of sin and cos. Only the lane's word pair (w0, w1 or w2, w3) goes through
    Box-Muller, and only its cos or sin: one log and one polynomial an element."""
    w0, w1, w2, w3 = tl.randint4x(seed, element // 4)
    lane = element % 4
    u = tl.maximum(tl.uint_to_uniform_float(tl.where(lane < 2, w0, w2)), 1.0e-7)
    theta = 6.283185307179586 * tl.uint_to_uniform_float(tl.where(lane < 2, w1, w3))
    return tl.sqrt(-2.0 * tl.log(u)) * cos_or_sin(theta, lane % 2 == 1)


@triton.jit
def philox_normals(seed, first, BLOCK: tl.constexpr):
    """philox_normal of elements first .. first + BLOCK - 1 in order, ``first`` a multiple of 4:
    one Philox call for each 4 elements (its 4 lanes) instead of one per element. Same
    arithmetic as philox_normal, so the same bits."""
    w0, w1, w2, w3 = tl.randint4x(seed, first // 4 + tl.arange(0, BLOCK // 4).to(tl.int64))
    r01 = tl.sqrt(-2.0 * tl.log(tl.maximum(tl.uint_to_uniform_float(w0), 1.0e-7)))
    r23 = tl.sqrt(-2.0 * tl.log(tl.maximum(tl.uint_to_uniform_float(w2), 1.0e-7)))
    theta01 = 6.283185307179586 * tl.uint_to_uniform_float(w1)
    theta23 = 6.283185307179586 * tl.uint_to_uniform_float(w3)
    lane0, lane1 = r01 * cos_or_sin(theta01, False), r01 * cos_or_sin(theta01, True)
    lane2, lane3 = r23 * cos_or_sin(theta23, False), r23 * cos_or_sin(theta23, True)
    # join(join(a, c), join(b, d))[j, k, m] is lane 2k + m of quad j: row-major, lanes in order
    return tl.reshape(tl.join(tl.join(lane0, lane2), tl.join(lane1, lane3)), [BLOCK])


@triton.jit
def tile_noise(seed, row, S, s, BLOCK: tl.constexpr, QUAD: tl.constexpr):
    """The noise of a row_index tile (elements row * S + s). QUAD (S % 4 == 0, so every tile
    starts on a Philox block): philox_normals, one Philox call per 4 elements; else one per
    element. Both give the same bits."""
    if QUAD:
        z = philox_normals(seed, row * S + tl.program_id(1).to(tl.int64) * BLOCK, BLOCK)
    else:
        z = philox_normal(seed, row * S + s)
    return z


def quad_noise(row_len: int) -> bool:
    """tile_noise's QUAD for rows of this length."""
    return row_len % 4 == 0
