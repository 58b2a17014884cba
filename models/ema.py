"""Exponential moving average of a network's weights."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copy of `model` updated as p_ema <- d p_ema + (1 - d) p after each optimizer step, with the
    warm-up d_n = min(decay, (1 + n) / (10 + n)) (as in Song et al.'s score_sde and diffusers' EMAModel), or the
    constant d = decay with warmup=False (the target network of consistency distillation, Song et al. 2023).
    The shadow is a frozen module (`.module`) that is saved in checkpoints with the rest.
    Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.num_updates)
        d = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        ema_params = dict(self.module.named_parameters())
        with gathered_weights(model):
            for name, p in model.named_parameters():
                e = ema_params[name]
                e.lerp_(p.detach().to(e.dtype), 1 - d)
        ema_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@contextlib.contextmanager
def gathered_weights(model: nn.Module) -> Iterator[None]:
    """The full weights of `model` inside the block when DeepSpeed ZeRO-3 has partitioned them (its
    partitioned parameters carry a `ds_id`); a no-op otherwise."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
