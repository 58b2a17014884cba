"""losses.consistency against diffusers' LCMScheduler (the LCM authors' sampler) and hand-computed values: the
boundary scalings, the solver grid with skipping step k, the sampler's time choice and the distances."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import LCMScheduler

from guidance.schedules import RectifiedFlow, VPLinear
from losses.consistency import (boundary_scalings, consistency_distance, consistency_output, lcm_inference_indices,
                                solver_grid)

SD = VPLinear(1000, 0.00085, 0.012, scaled=True)  # Stable Diffusion's schedule


def test_boundary_scalings_equal_lcm_scheduler_and_pin_the_boundary():
    sched = LCMScheduler()
    for tau in (0, 1, 19, 259, 999):
        c_skip, c_out = boundary_scalings(torch.tensor(float(tau), dtype=torch.float64))
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(tau)
        assert c_skip.item() == pytest.approx(ref_skip, rel=1e-12, abs=0)
        assert c_out.item() == pytest.approx(ref_out, rel=1e-12, abs=1e-300)
    # by hand at tau = 1: s tau = 10, c_skip = 0.25 / 100.25, c_out = 10 / sqrt(100.25)
    c_skip, c_out = boundary_scalings(torch.tensor(1.0, dtype=torch.float64))
    assert c_skip.item() == pytest.approx(0.25 / 100.25, rel=1e-15)
    assert c_out.item() == pytest.approx(10 / math.sqrt(100.25), rel=1e-15)
    x, x0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(consistency_output(x, x0, torch.zeros(3), SD), x)  # f(x, 0) = x exactly


def test_solver_grid_is_lcms_ddim_solver_grid_with_skipping_step():
    """N = 50 on 1000 steps: timesteps 999, 979, ..., 19 (k = 20), each mapped to t - k, the last to timestep 0:
    the grid of the LCM training code's DDIMSolver (timesteps (1..50) * 20 - 1, targets start - k clamped at 0)."""
    t, t_next = solver_grid(SD, 50)
    steps = torch.round(t * 999).long()
    assert steps.tolist() == [20 * j - 1 for j in range(50, 0, -1)]
    assert torch.round(t_next * 999).long().tolist() == [max(s - 20, 0) for s in steps.tolist()]
    t, t_next = solver_grid(RectifiedFlow(), 4)  # continuous: the Euler grid, the last step to t_min = 0 (clean)
    assert t.tolist() == [1.0, 0.75, 0.5, 0.25] and t_next.tolist() == [0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="solver_steps"):
        solver_grid(SD, 0)
    with pytest.raises(ValueError, match="repeats times"):
        solver_grid(SD, 2000)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 50])
def test_sampler_times_equal_lcm_scheduler_timesteps(steps):
    grid, _ = solver_grid(SD, 50)
    ours = torch.round(grid[lcm_inference_indices(50, steps)] * 999).long()
    sched = LCMScheduler(beta_schedule="scaled_linear", original_inference_steps=50)
    sched.set_timesteps(steps)
    assert ours.tolist() == sched.timesteps.tolist()


def test_sampler_step_counts_outside_the_grid_are_refused():
    for bad in (0, 51, 2.0):
        with pytest.raises(ValueError, match="1 to 50 steps"):
            lcm_inference_indices(50, bad)


def test_distances_by_hand():
    pred = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    target = torch.tensor([[4.0, 3.0], [0.0, 1.0]])
    c = 0.5
    huber = consistency_distance(pred, target, "huber", c)
    expected = [((16 + 0.25) ** 0.5 - 0.5 + 0.0) / 2, ((1 + 0.25) ** 0.5 - 0.5 + 0.0) / 2]
    assert huber.tolist() == pytest.approx(expected, rel=1e-6)
    assert consistency_distance(pred, target, "l2").tolist() == pytest.approx([8.0, 0.5])
    with pytest.raises(ValueError, match="huber, l2"):
        consistency_distance(pred, target, "l1")
