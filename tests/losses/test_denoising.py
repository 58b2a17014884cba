"""The denoising loss: zero for the exact network in every parameterisation, the MSE of the raw output otherwise."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from guidance.denoiser import Denoiser
from guidance.parameterization import PARAMETERIZATIONS, raw_target
from guidance.schedules import EDM, VPCosine, RectifiedFlow, _bcast
from losses.denoising import denoising_loss


class Oracle(nn.Module):
    """Knows the clean x0 and noise of the batch and returns the exact raw output."""

    def __init__(self, schedule, kind, x0, eps):
        super().__init__()
        self.schedule, self.kind, self.x0, self.eps = schedule, kind, x0, eps

    def forward(self, x_in, net_time, cond):
        t = net_time / self.schedule.time_scale
        a, s = self.schedule.alpha_sigma(_bcast(t, x_in))
        return raw_target(self.kind, self.x0, self.eps, a, s)


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
@pytest.mark.parametrize("schedule", [VPCosine(), RectifiedFlow(t_max=0.999), EDM()], ids=lambda s: type(s).__name__)
def test_exact_network_has_zero_loss_and_offset_has_its_mse(kind, schedule):
    torch.manual_seed(0)
    x0, eps = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64) * 0.9 + 0.05
    den = Denoiser(Oracle(schedule, kind, x0, eps), schedule, kind)
    loss = denoising_loss(den, x0, None, t, eps)
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, torch.zeros(6, dtype=torch.float32), atol=1e-10, rtol=0)

    class Off(Oracle):
        def forward(self, *a):
            return super().forward(*a) + 0.5

    off = Denoiser(Off(schedule, kind, x0, eps), schedule, kind)
    torch.testing.assert_close(denoising_loss(off, x0, None, t, eps), torch.full((6,), 0.25), atol=1e-6, rtol=0)
