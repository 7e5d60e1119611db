"""Launch configurations and index helpers shared by the elementwise Triton kernels.

Configurations are a pure function of (shape, device) so that the ahead-of-time compile check
can ask for them without a GPU; no autotuning (it does not run under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 1024


def elementwise_config(row_len: int, device: torch.device | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel whose program covers BLOCK elements of one row of
    length ``row_len``: the whole row up to 1024 (fewer, fuller programs), at least 16."""
    block = max(16, min(MAX_BLOCK, triton.next_power_of_2(max(row_len, 1))))
    return block, max(1, min(8, block // 128))


@triton.jit
def row_index(C, S, BLOCK: tl.constexpr):
    """Program (row, tile) of an (N, C, S) view: row = n * C + c; s the tile's positions."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return row, row // C, row % C, s, s < S
