"""Image grids as PNG files (Pillow): samples in [-1, 1] (or [0, 1]) -> uint8 -> one tiled image."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(N, C, H, W) float images whose values span ``value_range`` -> (N, H, W, C) uint8.

    Values outside the range are clipped; C must be 1 or 3. Also takes a (C, H, W) image.
    """
    x = torch.as_tensor(images).detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (NCHW), got {x.shape[1]} in shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"images must be floating point in {value_range}, got {x.dtype}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    x = ((x.float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(
    images: torch.Tensor | np.ndarray,
    nrow: int | None = None,
    padding: int = 2,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> np.ndarray:
    """Tile (N, C, H, W) images into one (rows * (H + p) + p, nrow * (W + p) + p, C) uint8 array.

    ``nrow`` images per row (default: ceil(sqrt(N))); the gaps are black.
    """
    tiles = to_uint8(images, value_range)
    n, h, w, c = tiles.shape
    if n == 0:
        raise ValueError("no images to tile")
    nrow = math.ceil(math.sqrt(n)) if nrow is None else nrow
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = tiles[i]
    return grid


def save_grid(
    images: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    nrow: int | None = None,
    padding: int = 2,
    value_range: tuple[float, float] = (-1.0, 1.0),
    scale: int = 1,
) -> Path:
    """Write ``make_grid(images, ...)`` as a PNG (each pixel repeated ``scale`` times per side)."""
    from PIL import Image

    grid = make_grid(images, nrow, padding, value_range)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path, format="PNG")
    return path
