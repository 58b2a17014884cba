"""Decoded samples as images: the shape check and 8-bit quantisation the metrics share, PNG grids (and arrays for
W&B)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def check_images(images: Tensor, what: str = "images") -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a float tensor [N, 3, H, W] in [-1, 1] (decoded samples), got {got}")


def to_uint8(images: Tensor) -> Tensor:
    """[N, 3, H, W] float in [-1, 1] -> uint8 0..255 (round to nearest, clamped): the 8-bit images both metrics read."""
    return ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def grid_array(images: Tensor, nrow: int | None = None, scale: int = 4, pad: int = 1) -> np.ndarray:
    """images [N, C, H, W] in [-1, 1] -> uint8 array [H', W', 3] (rows of `nrow`, nearest upscaling)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    if c == 1:
        x = x.expand(n, 3, h, w)
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    hp, wp = h * scale + pad, w * scale + pad
    out = np.full((rows * hp + pad, nrow * wp + pad, 3), 255, np.uint8)
    big = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        out[pad + r * hp: pad + r * hp + h * scale, pad + col * wp: pad + col * wp + w * scale] = big[i]
    return out


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 4) -> Path:
    """Write a PNG grid atomically; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid_array(images, nrow, scale)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
