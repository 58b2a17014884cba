"""Denoiser: a network together with its schedule and parameterisation, returning a Prediction."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from guidance.parameterization import Prediction, check_parameterization, input_scale, to_x0
from guidance.schedules import Schedule, _bcast


class Denoiser(nn.Module):
    """D(x_t, t, cond) for a network `net(x, net_time, cond) -> raw output` of parameterisation
    `parameterization` under `schedule`.

    x_t: [B, C, H, W]; t: [B] in [0, 1]; cond: whatever the network takes ([B] labels, a dict, ...).
    Conversions run in float32 or wider even when the network runs in bf16/fp16.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, parameterization: str = "eps", sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.parameterization = check_parameterization(parameterization)
        self.sigma_data = sigma_data

    def raw(self, x_t: Tensor, t: Tensor, cond: Any, **net_kwargs) -> Tensor:
        """The network's raw output y for x_t at time t (input scaling applied)."""
        a, s = self.schedule.alpha_sigma(_bcast(t, x_t))
        x_in = input_scale(self.parameterization, a, s, self.sigma_data) * x_t
        return self.net(x_in, self.schedule.net_time(t), cond, **net_kwargs)

    def forward(self, x_t: Tensor, t: Tensor, cond: Any, **net_kwargs) -> Prediction:
        y = self.raw(x_t, t, cond, **net_kwargs)
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x_t = x_t.to(dtype)
        a, s = self.schedule.alpha_sigma(_bcast(t, x_t))
        x0 = to_x0(y.to(dtype), x_t, a, s, self.parameterization, self.sigma_data)
        return Prediction.from_x0(x0, x_t, a, s)

    def null_cond(self, cond: Any) -> Any:
        """The network's null condition for a batch shaped like `cond`."""
        return self.net.null_cond(cond)
