"""Optimizers shared by the methods."""
from __future__ import annotations

import math

import torch

LR_DECAYS = ("constant", "cosine")


def lr_factor(step: int, warmup_steps: int, decay: str = "constant", total_steps: int | None = None) -> float:
    """The learning-rate multiplier at optimizer step `step`: a linear warm-up over `warmup_steps`, then constant, or
    (decay "cosine") half a cosine from 1 down to 0 at `total_steps` (Loshchilov & Hutter 2017, SGDR, without
    restarts)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_with_warmup(params, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                      betas: tuple[float, float] = (0.9, 0.999), decay: str = "constant",
                      total_steps: int | None = None) -> dict:
    """AdamW with a linear learning-rate warm-up over `warmup_steps`, then constant or cosine decay to 0 at
    `total_steps` (`lr_factor`), stepped every optimizer step."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    if decay not in LR_DECAYS:
        raise ValueError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {decay!r}")
    if decay != "constant" and not (total_steps and total_steps > 0):
        raise ValueError(f"lr_decay {decay!r} decays to 0 at trainer.max_steps; set trainer.max_steps (got {total_steps})")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup_steps, decay, total_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
