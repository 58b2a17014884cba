"""Both guidance-distillation stages on text models: progressive distillation of a stage-1 SD 1.5 student and
data-free stage 1 on prompts, fitted through the CLI on the tiny folder (tests/train/text_fits.py), and the grid halving
progressive distillation needs, on the text models' schedules (SD 1.5's discrete VPLinear, SD3/Flux's shifted flow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance.schedules import EDM, RectifiedFlow, VPLinear
from tests.train.text_fits import PROMPTS
from train.methods.guidance_distillation import GuidanceDistillation
from train.methods.progressive import ProgressiveDistillation, check_grid_halving
from train.runtime.checkpoint import load_method, read_checkpoint


def _weights(ckpt, prefix: str) -> dict:
    sd = read_checkpoint(ckpt)["state_dict"]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.mark.parametrize("schedule", [VPLinear(1000, 0.00085, 0.012, scaled=True), RectifiedFlow(shift=3.0),
                                      RectifiedFlow(shift=float(np.exp(0.5 + 0.65 * (16 - 256) / 3840))), EDM()],
                         ids=["sd15", "sd3", "flux", "edm"])
def test_progressive_grids_halve_on_the_text_schedules(schedule):
    """SD 1.5's 1000-step VPLinear (trailing spacing) and SD3/Flux's shifted rectified flow nest every halving from
    64 to 1 DDIM steps (and rectified flow from any N: the shift is a monotone map of the same uniform grid)."""
    check_grid_halving(schedule, 64, 6)
    check_grid_halving(schedule, 512, 9)
    if not isinstance(schedule, VPLinear):
        check_grid_halving(schedule, 48, 4)
        check_grid_halving(schedule, 4096, 12)


def test_progressive_grid_errors_on_a_discrete_schedule():
    """A discrete schedule fails where the trailing spacing rounds unevenly, or where N exceeds its timesteps."""
    sd15 = VPLinear(1000, 0.00085, 0.012, scaled=True)
    with pytest.raises(ValueError, match=r"sampling_times\(112\) is not every other point of sampling_times\(224\)"):
        check_grid_halving(sd15, 224, 5)
    with pytest.raises(ValueError, match=r"repeats times \(the schedule has 1000 timesteps\).*start_steps <= 1000"):
        check_grid_halving(sd15, 2048, 11)


def test_progressive_distillation_of_a_text_student(t2i_workspace):
    """A stage-1 SD 1.5 student (CaptionedImageDataModule) distilled 4 -> 2 -> 1 DDIM steps through the CLI: each
    round's checkpoint samples prompts at its step count with one evaluation per step, and refuses other counts."""
    last = t2i_workspace.fitted("pd", "sd15")
    for ckpt, steps in [(last.parent / "round_0_2steps.ckpt", 2), (last, 1)]:
        module = load_method(ckpt)
        assert isinstance(module, ProgressiveDistillation) and module.student_steps() == steps
        assert isinstance(module.student.schedule, VPLinear) and module.student.schedule.num_steps == 1000
        latents, nfe = module.generate(PROMPTS, scale=3.0)
        assert latents.shape == (2, 4, 8, 8) and nfe == steps and torch.isfinite(latents).all()
        assert module.samples_to_images(latents).shape == (2, 3, 16, 16)
        with pytest.raises(ValueError, match=f"distilled to {steps} DDIM steps"):
            module.generate(PROMPTS, scale=3.0, steps=2 * steps)
    assert read_checkpoint(last)["global_step"] == 2
    # round 1's teacher is the EMA at the end of round 0: the round boundary ran on the text student
    end0, teacher1 = _weights(last.parent / "round_0_2steps.ckpt", "ema.module."), _weights(last, "round_teacher.net.")
    assert teacher1 and all(torch.equal(end0[k], teacher1[k]) for k in teacher1)


def test_data_free_guidance_distillation_of_a_text_model(t2i_workspace):
    """Prompts only (PromptDataModule yields (None, prompts)): the SD 1.5 student trains on the guided teacher's own
    DDIM trajectories through the CLI, moves away from its zero-initialised w-embedding, and samples prompts."""
    module = load_method(t2i_workspace.fitted("gd_prompts", "sd15"))
    assert isinstance(module, GuidanceDistillation) and module.trajectory_steps == 3
    assert module.student.net.w_embedding.linear_2.weight.abs().sum() > 0  # it trained
    latents, nfe = module.generate(PROMPTS, scale=3.0, steps=2)
    assert latents.shape == (2, 4, 8, 8) and nfe == 2 and torch.isfinite(latents).all()
