"""Optimizers shared by the methods."""
from __future__ import annotations

import torch


def adamw_with_warmup(params, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                      betas: tuple[float, float] = (0.9, 0.999)) -> dict:
    """AdamW with a linear learning-rate warm-up over `warmup_steps`, stepped every optimizer step."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
