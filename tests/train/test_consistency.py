"""Latent consistency distillation (train.methods.consistency): the loss against a hand-written reference of LCM's
Algorithm 1, the multistep sampler against diffusers' LCMScheduler loop on the same UNet, the EMA target network, the
recipe's refusals, and a fit through the CLI that samples at 1/2/4/8 steps and resumes. Export: test_consistency_export.py."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import LCMScheduler

from guidance.denoiser import Denoiser
from guidance.schedules import VPCosine, VPLinear
from models.adapters import ClassConditionalUNet
from tests.train.test_guidance_distillation import write_config
from train.cli import main
from train.methods.consistency import ConsistencyDistillation
from train.methods.sampling import ConsistencySampling
from train.runtime.checkpoint import load_method

LCM = "train.methods.consistency.ConsistencyDistillation"


@pytest.fixture(scope="module")
def lcm(tiny_teacher_ckpt) -> ConsistencyDistillation:
    torch.manual_seed(0)
    module = ConsistencyDistillation(str(tiny_teacher_ckpt), w_min=1.0, w_max=5.0, solver_steps=10, target_decay=0.5)
    for p in module.student.net.w_embedding.parameters():  # a student that differs from the teacher
        p.data.normal_(0, 0.05)
    with torch.no_grad():
        for p in module.student.net.base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return module


def test_loss_equals_a_hand_written_lcm_step(lcm):
    """LCM Algorithm 1 written out from the papers' formulas: x_t = a x0 + s eps at t_i = grid[i]; the teacher's CFG
    x0 (D_u + w (D_c - D_u)) and the eps implied by it; one DDIM step to t_{i+1}; the target network's f there;
    the student's f at t_i; pseudo-Huber with c = 0.001."""
    sched, b = lcm.student.schedule, 4
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(b, 1, 8, 8, generator=g)
    eps = torch.randn(b, 1, 8, 8, generator=g)
    labels, w = torch.tensor([0, 3, 7, 9]), torch.tensor([1.0, 2.0, 3.5, 5.0])
    step = torch.tensor([0, 3, 8, 9])
    loss = lcm.consistency_loss(x0, labels, step, eps, w)

    T = sched.num_steps - 1
    times = (torch.round(torch.arange(1000, 0, -100, dtype=torch.float64)) - 1) / T  # 10-point trailing grid
    t = times[step].float()
    t_next = torch.cat([times[1:], torch.zeros(1, dtype=torch.float64)])[step].float()
    col = lambda v: v.reshape(-1, 1, 1, 1)
    a, s = (col(v) for v in sched.alpha_sigma(t))
    a2, s2 = (col(v) for v in sched.alpha_sigma(t_next))
    x_t = a * x0 + s * eps

    def x0_of(net, x, tt, alpha, sigma, cond):  # v-prediction: x0 = alpha x - sigma v
        return alpha * x - sigma * net(x, tt * T, cond)

    teacher = lcm.teacher.net
    d_c = x0_of(teacher, x_t, t, a, s, labels)
    d_u = x0_of(teacher, x_t, t, a, s, torch.full_like(labels, -1))
    d = d_u + col(w) * (d_c - d_u)
    x_next = a2 * d + s2 * (x_t - a * d) / s

    def f(net, x, tt, alpha, sigma):
        tau = 10 * tt * T
        c_skip, c_out = 0.25 / (tau**2 + 0.25), tau / (tau**2 + 0.25).sqrt()
        return col(c_skip) * x + col(c_out) * x0_of(net, x, tt, alpha, sigma, {"cond": labels, "w": w})

    with torch.no_grad():
        target = f(lcm.target.module, x_next, t_next, a2, s2)
        pred = f(lcm.student.net, x_t, t, a, s)
    expected = (((pred - target) ** 2 + 1e-6).sqrt() - 1e-3).flatten(1).mean(1)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-7)
    assert lcm.target.module is not lcm.student.net


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_equals_diffusers_lcm_scheduler_loop(param, steps):
    torch.manual_seed(0)
    net = ClassConditionalUNet(10, 8, 1, block_out_channels=(16, 32), attention_levels=(False, True),
                               layers_per_block=1, norm_num_groups=8).eval()
    den = Denoiser(net, VPLinear(1000, 0.00085, 0.012, scaled=True), param)
    recipe = ConsistencySampling(lambda: den, solver_steps=50, w_input=False)
    labels = torch.tensor([1, 4, 9])
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    ours, nfe = recipe.run(noise, labels, None, recipe.resolve(steps=steps), torch.Generator().manual_seed(6))
    assert nfe == steps

    sched = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, original_inference_steps=50,
                         prediction_type={"eps": "epsilon", "v": "v_prediction"}[param])
    sched.set_timesteps(steps)
    gen, x = torch.Generator().manual_seed(6), noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net.unet(x, t, class_labels=labels).sample, t, x, generator=gen).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_target_network_is_a_constant_rate_ema(tiny_teacher_ckpt):
    module = ConsistencyDistillation(str(tiny_teacher_ckpt), solver_steps=10, target_decay=0.9)
    before = {k: v.clone() for k, v in module.target.module.state_dict().items()}
    with torch.no_grad():
        for p in module.student.net.parameters():
            p.add_(1.0)
    module.on_update()  # no warm-up: theta^- <- 0.9 theta^- + 0.1 theta from the first update (LCM Algorithm 1)
    for k, p in module.student.net.named_parameters():
        torch.testing.assert_close(dict(module.target.module.named_parameters())[k], 0.9 * before[k] + 0.1 * p.detach())
    online = ConsistencyDistillation(str(tiny_teacher_ckpt), solver_steps=10, target_decay=0.0, w_input=False)
    assert online.target is None  # LCM-LoRA: the target is the student without gradient


def test_recipe_refuses_what_it_cannot_honour(tiny_teacher_ckpt):
    baked = ConsistencyDistillation(str(tiny_teacher_ckpt), solver_steps=10, w_input=False, w_min=2, w_max=4).recipe()
    with pytest.raises(ValueError, match=r"w in \[2, 4\]\), so --scale cannot"):
        baked.resolve(scale=3.0)
    assert baked.resolve().scale is None and baked.resolve(steps=10).steps == 10
    with pytest.raises(ValueError, match="1 to 10 steps"):
        baked.resolve(steps=11)
    taking = ConsistencyDistillation(str(tiny_teacher_ckpt), solver_steps=10).recipe()
    assert taking.resolve(scale=4.0).scale == 4.0 and taking.resolve().steps == 4
    with pytest.raises(ValueError, match="--sampler, --guider, --eta, --negative-prompt cannot"):
        taking.resolve(sampler="ddim", guider="apg", eta=0.5, negative=True)
    for bad in ({"w_min": 3, "w_max": 2}, {"loss": "l1"}, {"target_decay": 1.0}, {"huber_c": 0.0},
                {"guider": "autoguidance"}):
        with pytest.raises(ValueError):
            ConsistencyDistillation(str(tiny_teacher_ckpt), **bad)


def test_fit_through_the_cli_samples_at_1_2_4_8_steps_and_resumes(tiny_teacher_ckpt, tmp_path):
    args = {"teacher": str(tiny_teacher_ckpt), "w_min": 1.0, "w_max": 4.0, "solver_steps": 8, "lr": 1e-3,
            "warmup_steps": 1, "val_steps": 2, "val_samples": 10}
    cfg = write_config(tmp_path / "lcm.yaml", LCM, args, tmp_path / "run", max_steps=4, ckpt_every=2, keep_all=True)
    main(["fit", "--config", str(cfg)])
    ckpts = tmp_path / "run" / "checkpoints"
    module = load_method(ckpts / "last.ckpt")
    assert isinstance(module, ConsistencyDistillation) and module.recipe().describe()["solver_steps"] == 8
    for steps in (1, 2, 4, 8):
        x, nfe = module.generate(torch.arange(10), scale=2.0, steps=steps, seed=0)
        assert x.shape == (10, 1, 8, 8) and nfe == steps and torch.isfinite(x).all()
    a, _ = module.generate(torch.arange(10), scale=1.0, steps=2, seed=0)
    b, _ = module.generate(torch.arange(10), scale=5.0, steps=2, seed=0)
    assert (a - b).abs().max() > 0  # w is an input
    # resume from step 2 reaches the same weights as the uninterrupted run
    resumed = tmp_path / "resumed"
    cfg2 = write_config(tmp_path / "lcm2.yaml", LCM, args, resumed, max_steps=4, ckpt_every=2, keep_all=True)
    main(["fit", "--config", str(cfg2), "--ckpt_path", str(ckpts / "step=2.ckpt")])
    again = load_method(resumed / "checkpoints" / "last.ckpt")
    for (k, v), (_, u) in zip(module.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(v, u, msg=k)
