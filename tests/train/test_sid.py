"""Tests of the SiD objective of train/methods/onestep.py (train/methods/onestep_sid.py): SiD-LSG's scales reach the
right networks, both scores are differentiated through x_t with only the generator trained, a fit with a LoRA fake
score and LSG, the shipped configs, and the refusals."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train.methods.onestep as onestep
import train.methods.onestep_sid as onestep_sid
from losses.sid import sid_generator_loss
from tests.train.test_onestep import build, fit
from train.methods.onestep import OneStepDistillation
from train.runtime.config import instantiate, read_yaml

ROOT = Path(__file__).resolve().parents[2]
LSG = {"kind": "sid", "lsg_fake_scale": 3.0, "lsg_train_scale": 2.5}


def spy_guided(module, monkeypatch, names) -> dict[str, list]:
    calls = {name: [] for name in names}
    for name in names:
        guided = module._guided[name]

        def spy(x_t, t, cond, w, neg_cond=None, _name=name, _real=guided.forward):
            calls[_name].append((x_t, t, cond, torch.as_tensor(w)))
            return _real(x_t, t, cond, w, neg_cond)

        monkeypatch.setattr(guided, "forward", spy)
    return calls


def test_lsg_scales_reach_the_right_networks(tiny_teacher_ckpt, monkeypatch):
    """kappa_4 (guidance_scale) guides the teacher and kappa_2 = kappa_3 (lsg_fake_scale) the fake score in the
    generator loss, at the same (x_t, t); kappa_1 (lsg_train_scale) guides the fake score in its own loss, whose
    cond and null branches run as one forward of the fake score; the fake score then drops 10% of the labels."""
    module = build(tiny_teacher_ckpt, guidance_scale=4.5, objective=LSG)
    assert module._guided["teacher"].denoiser is module.teacher
    assert module._guided["sid_fake"].denoiser is module.fake_score
    assert module.fake_p_uncond == 0.1
    calls = spy_guided(module, monkeypatch, ["teacher", "sid_fake"])
    labels = torch.arange(10).repeat(2)
    terms = module.generator_losses(labels)
    assert set(terms) == {"sid"} and torch.isfinite(terms["sid"])
    [(x_a, t_a, c_a, w_a)], [(x_b, t_b, c_b, w_b)] = calls["teacher"], calls["sid_fake"]
    assert torch.equal(x_a, x_b) and torch.equal(t_a, t_b) and torch.equal(c_a, c_b) and torch.equal(c_a, labels)
    assert bool((w_a == 4.5).all()) and w_a.shape == (20,) and float(w_b) == 3.0
    seen, sizes = [], []
    real = onestep.guided_denoising_loss

    def spy_loss(fake, x, cond, t, eps, scale):
        seen.append((fake, scale))
        return real(fake, x, cond, t, eps, scale)

    monkeypatch.setattr(onestep, "guided_denoising_loss", spy_loss)
    hook = module.fake_score.net.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    try:
        terms = module.fake_losses(None, labels)
    finally:
        hook.remove()
    assert set(terms) == {"fake_score"} and torch.isfinite(terms["fake_score"])
    assert seen == [(module.fake_score, 2.5)] and sizes == [40]


def test_plain_sid_uses_the_conditional_fake_score_and_the_plain_fake_loss(tiny_teacher_ckpt, monkeypatch):
    module = build(tiny_teacher_ckpt, guidance_scale=2.0, objective={"kind": "sid"})
    assert "sid_fake" not in module._guided and module.fake_p_uncond == 0.0 and module.objective.alpha == 1.2
    assert module.fake_train_scale == 1.0
    calls = spy_guided(module, monkeypatch, ["teacher"])
    fake_calls = []
    real_forward = module.fake_score.forward
    monkeypatch.setattr(module.fake_score, "forward",
                        lambda x_t, t, cond, **k: fake_calls.append(cond) or real_forward(x_t, t, cond, **k))
    labels = torch.tensor([0, 5, 9])
    module.generator_losses(labels)
    assert float(calls["teacher"][0][3][0]) == 2.0 and len(fake_calls) == 1 and torch.equal(fake_calls[0], labels)


def test_both_scores_are_differentiated_through_x_t_and_only_the_generator_trains(tiny_teacher_ckpt, monkeypatch):
    """SiD differentiates f_phi(x_t) and f_psi(x_t) through x_t = alpha x + sigma eps (the authors call neither under
    no_grad); within the generator update the teacher's and the fake score's weights get no gradient."""
    module = build(tiny_teacher_ckpt, objective=LSG)
    seen = {}

    def spy(x, d_real, d_fake, alpha):
        seen.update(x=x, d_real=d_real, d_fake=d_fake, alpha=alpha)
        return sid_generator_loss(x, d_real, d_fake, alpha)

    monkeypatch.setattr(onestep_sid, "sid_generator_loss", spy)
    gen_params = list(module.generator.net.parameters())
    with module._updating([gen_params]):
        loss = module.generator_losses(torch.arange(10))["sid"]
        # the loss's gradient w.r.t. the generator sample includes the paths through both score networks
        g_x, g_real, g_fake = torch.autograd.grad(loss, (seen["x"], seen["d_real"], seen["d_fake"]), retain_graph=True)
        loss.backward()
    assert seen["alpha"] == 1.2
    assert seen["d_real"].requires_grad and seen["d_fake"].requires_grad
    assert g_real.abs().sum() > 0 and g_fake.abs().sum() > 0
    assert all(p.grad is not None for p in gen_params if p.requires_grad)
    assert all(p.grad is None for p in module.fake_score.net.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())


def test_sid_with_a_lora_fake_score_and_lsg_fits_and_counts_fake_updates(tiny_teacher_ckpt):
    module = build(tiny_teacher_ckpt, objective=LSG, fake_score={"updates": 2})
    before = {k: v.clone() for k, v in module.generator.net.state_dict().items()}
    trainer = fit(module, max_steps=2)
    assert trainer.global_step == 2
    opt_f = module.optimizers()[1]
    assert int(next(iter(opt_f.optimizer.state.values()))["step"]) == 4
    assert torch.isfinite(trainer.callback_metrics["train/sid"]) and "train/dmd" not in trainer.callback_metrics
    assert any(not torch.equal(v, module.generator.net.state_dict()[k]) for k, v in before.items())


def test_the_shipped_configs_build(tiny_teacher_ckpt):
    cfg = read_yaml(ROOT / "configs" / "digits" / "sid.yaml")
    cfg["model"]["init_args"]["teacher"] = str(tiny_teacher_ckpt)
    module = instantiate(cfg["model"])
    assert module.objective.kind == "sid" and module.objective.alpha == 1.2 and module.fake_args.mode == "copy"
    sd = read_yaml(ROOT / "configs" / "sd15" / "sid.yaml")["model"]["init_args"]
    assert sd["objective"] == {"kind": "sid", "alpha": 1.0, "lsg_fake_scale": 2.0, "lsg_train_scale": 2.0,
                               "t_range": [0.02, 0.98]}
    assert sd["guidance_scale"] == 2.0 and sd["generator"]["times"] == [0.625626]
    sd_module = build(tiny_teacher_ckpt, objective=sd["objective"], guidance_scale=sd["guidance_scale"],
                      fake_score={"mode": "lora", "rank": 4, "updates": 1})
    assert sd_module.objective.sid_scales == (2.0, 2.0) and sd_module.fake_p_uncond == 0.1


@pytest.mark.parametrize("overrides, message", [
    ({"objective": {"kind": "sid", "divergence": "jensen_shannon"}}, "set divergence: reverse_kl or kind: dmd"),
    ({"objective": {"alpha": 1.0}}, "are SiD's; set kind: sid"),
    ({"objective": {"kind": "decoupled", "lsg_fake_scale": 2.0}}, "are SiD's; set kind: sid"),
    ({"objective": {"kind": "sid", "ca_weight": 2.0}}, "set kind: decoupled"),
    ({"objective": {"kind": "sid", "ratio_time_bins": 5}}, "reverse_kl"),
    ({"objective": {"kind": "sid"}, "forget": {"concepts": [3]}}, "set objective.kind: dmd"),
    ({"objective": {"kind": "sid"}, "pg_sb_range": [1.0, 3.0]}, "remove pg_sb_range with kind sid"),
    ({"objective": LSG, "guider": "apg"}, "set guider: cfg"),
    ({"objective": LSG, "fake_score": {"p_uncond": 0.0}}, r"set fake_score.p_uncond > 0"),
])
def test_sid_settings_that_cannot_apply_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        OneStepDistillation(teacher=str(tmp_path / "missing.ckpt"), **overrides)
