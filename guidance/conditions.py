"""Batching helpers for conditions: a condition is a tensor [B, ...], a dict of such tensors, or None."""
from __future__ import annotations

from typing import Any

import torch


def cond_cat(conds: list[Any]) -> Any:
    """Concatenate conditions along the batch dimension (tensors, dicts of tensors, or all None)."""
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: cond_cat([c[k] for c in conds]) for k in first}
    return torch.cat(conds, 0)


def cond_split(cond: Any, sizes: list[int]) -> list[Any]:
    """Inverse of `cond_cat`."""
    if cond is None:
        return [None] * len(sizes)
    if isinstance(cond, dict):
        parts = {k: cond_split(v, sizes) for k, v in cond.items()}
        return [{k: parts[k][i] for k in cond} for i in range(len(sizes))]
    return list(torch.split(cond, sizes, 0))


def cond_index(cond: Any, index) -> Any:
    """Select samples (a slice, mask or index tensor) from a condition."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: cond_index(v, index) for k, v in cond.items()}
    return cond[index]


def cond_to(cond: Any, device) -> Any:
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: cond_to(v, device) for k, v in cond.items()}
    return cond.to(device)


def cond_size(cond: Any) -> int:
    """Batch size of a condition (a tensor [B, ...] or a dict of them)."""
    if isinstance(cond, dict):
        return cond_size(next(v for v in cond.values() if v is not None))
    return cond.shape[0]


def cond_device(cond: Any) -> torch.device:
    """Device of a condition (a tensor or a dict of tensors)."""
    if isinstance(cond, dict):
        return cond_device(next(v for v in cond.values() if v is not None))
    return cond.device
