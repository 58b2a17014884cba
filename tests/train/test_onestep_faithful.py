"""OneStepDistillation's procedures as their papers and authors' code define them (issue 16): f-distill's two-stage
normalisation as training state (updated, saved, resumed), PG-SB's shared per-sample scale, Decoupled DMD's
Decoupled-Hybrid re-noising schedule, Score Forgetting Distillation's safe-class override from label-only data; and
the earlier behaviours kept as named options."""
from __future__ import annotations

import lightning as L
import pytest
import torch

import train.methods.onestep as onestep
from data.digits import DigitsDataModule
from losses.fdiv import density_ratio, f_weight, update_ratio_ema
from losses.erasure import toward_target
from tests.train.test_onestep import build, fit
from train.methods.onestep import OneStepDistillation
from train.methods.onestep_config import ForgetArgs, ObjectiveArgs
from train.runtime.checkpoint import load_method

JS = {"objective": {"divergence": "jensen_shannon", "ratio_ema_rate": 0.5}, "discriminator": {"gan_weight": 0.1}}


# --- f-distill: two-stage normalisation ------------------------------------------------------------------------

def test_fdistill_defaults_to_the_two_stage_scheme_with_its_running_means_as_state(tiny_teacher_ckpt, monkeypatch):
    module = build(tiny_teacher_ckpt, **JS)
    assert module.ratio_scheme == ("two_stage", 10, 0.5)
    assert torch.equal(module.ratio_ema, torch.ones(10)) and "ratio_ema" in module.state_dict()
    seen, real = [], onestep.two_stage_weights

    def spy(name, logits, t, ema, rate, gather):
        out = real(name, logits, t, ema, rate, gather)
        seen.append((logits, t, ema.clone(), rate, out))
        return out

    monkeypatch.setattr(onestep, "two_stage_weights", spy)
    weights_used, real_dmd = [], onestep.dmd_loss
    monkeypatch.setattr(onestep, "dmd_loss", lambda *a, **k: weights_used.append(k["weight"]) or real_dmd(*a, **k))
    labels = torch.arange(10).repeat(3)
    for _ in range(2):
        module.generator_losses(labels)
    (l1, t1, e0, rate, (w1, e1)), (l2, t2, e1_seen, _, (w2, e2)) = seen
    assert rate == 0.5 and torch.equal(e0, torch.ones(10))
    # the buffer follows the per-bin EMA of r (hand formula of losses.fdiv, checked there against numbers)
    assert torch.equal(e1, update_ratio_ema(torch.ones(10), density_ratio(l1), t1, 0.5))
    assert torch.equal(e1_seen, e1) and torch.equal(module.ratio_ema, e2)  # the second batch starts from the first's
    r_n = density_ratio(l2) / (e2[(t2 * 10).long().clamp(max=9)] + 1e-6)
    h = f_weight("jensen_shannon", r_n)
    torch.testing.assert_close(weights_used[1], h / (h.mean() + 1e-6))
    assert torch.equal(weights_used[1], w2)


@pytest.mark.parametrize("objective, bins", [({"ratio_time_bins": 0}, 0),  # the earlier default: h / its batch mean
                                             ({"ratio_normalization": "weight_bins", "ratio_time_bins": 3}, 3)])
def test_the_earlier_one_stage_schemes_are_named_options(tiny_teacher_ckpt, monkeypatch, objective, bins):
    module = build(tiny_teacher_ckpt, objective={"divergence": "jensen_shannon", **objective})
    assert not hasattr(module, "ratio_ema") and "ratio_ema" not in module.state_dict()
    seen, real = {}, onestep.fdistill_loss
    monkeypatch.setattr(onestep, "fdistill_loss", lambda *a: seen.update(args=a) or real(*a))
    module.generator_losses(torch.arange(10))
    divergence, _, time_bins = seen["args"][4:7]  # fdistill_loss(x, d_real, d_fake, logits, divergence, t, bins, ...)
    assert divergence == "jensen_shannon" and time_bins == bins


def test_a_two_stage_run_resumes_its_running_means_exactly(tiny_teacher_ckpt, tmp_path, monkeypatch):
    """The running means are in the checkpoint: a stopped-and-resumed run logs the uninterrupted losses bit for bit;
    with them dropped from the checkpoint (restarted at ones) the losses after the restart differ."""
    from tests.train.test_resume import straight_and_resumed

    def make():
        return build(tiny_teacher_ckpt, **JS, fake_score={"rank": 4, "updates": 1})

    data = lambda: DigitsDataModule(batch_size=16)  # noqa: E731
    straight, resumed = straight_and_resumed(make, data, 4, 2, tmp_path / "kept")
    assert resumed == straight
    load = OneStepDistillation.on_load_checkpoint  # fills the frozen teacher the checkpoint left out (runtime.frozen)
    monkeypatch.setattr(OneStepDistillation, "on_load_checkpoint",
                        lambda self, ckpt: (load(self, ckpt), ckpt["state_dict"].pop("ratio_ema")))
    straight, resumed = straight_and_resumed(make, data, 4, 2, tmp_path / "dropped")
    assert [resumed[i] for i in (0, 1)] == [straight[i] for i in (0, 1)]
    assert resumed[2]["train/dmd"] != straight[2]["train/dmd"]


def test_a_checkpoint_without_running_means_loads_with_their_initial_value(tiny_teacher_ckpt, tmp_path):
    module = build(tiny_teacher_ckpt, **JS)
    trainer = fit(module, max_steps=1, root=tmp_path)
    assert not torch.equal(module.ratio_ema, torch.ones(10))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(ckpt["state_dict"]["ratio_ema"], module.ratio_ema)
    del ckpt["state_dict"]["ratio_ema"]  # as written before the two-stage scheme
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert torch.equal(load_method(tmp_path / "old.ckpt").ratio_ema, torch.ones(10))
    assert torch.equal(load_method(tmp_path / "m.ckpt").ratio_ema, module.ratio_ema)


@pytest.mark.parametrize("args, message", [
    ({"ratio_time_bins": 4}, "set ratio_time_bins: 0 or another divergence"),
    ({"ratio_ema_rate": 0.5}, "which reverse_kl \\(DMD\\) does not have"),
    ({"divergence": "forward_kl", "ratio_ema_rate": 1.0}, r"ratio_ema_rate must be in \[0, 1\)"),
    ({"divergence": "forward_kl", "ratio_normalization": "batch"}, "must be one of two_stage, weight_bins"),
    ({"divergence": "forward_kl", "ratio_normalization": "weight_bins", "ratio_time_bins": 0}, "give ratio_time_bins >= 1"),
    ({"divergence": "forward_kl", "ratio_time_bins": 0, "ratio_ema_rate": 0.5}, "or remove it"),
    ({"divergence": "forward_kl", "ratio_time_bins": -1}, "ratio_time_bins must be >= 0"),
    ({"renoise": "hybrid"}, "set kind: decoupled or remove them"),
    ({"kind": "decoupled", "renoise": "late"}, "must be one of hybrid, constrained, full"),
])
def test_normalisation_and_schedule_settings_that_cannot_apply_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveArgs(**args)


# --- PG-SB: one scale per sample for both scores ---------------------------------------------------------------

def test_pgsb_gives_the_teacher_and_the_fake_score_the_same_per_sample_scale(tiny_teacher_ckpt, monkeypatch):
    """SNOOPI (arXiv 2412.02687) PG-SB: w ~ U[lo, hi] drawn per sample and used by BOTH guided scores."""
    module = build(tiny_teacher_ckpt, pg_sb_range=[1.5, 4.0])
    calls = {}
    for name in ("teacher", "fake"):
        guided = module._guided[name]

        def spy(x_t, t, cond, w, neg_cond=None, _name=name, _real=guided.forward):
            calls[_name] = (x_t, t, cond, w)
            return _real(x_t, t, cond, w, neg_cond)

        monkeypatch.setattr(guided, "forward", spy)
    module.generator_losses(torch.arange(10).repeat(2))
    (x_a, t_a, c_a, w_a), (x_b, t_b, c_b, w_b) = calls["teacher"], calls["fake"]
    assert torch.equal(w_a, w_b) and torch.equal(x_a, x_b) and torch.equal(t_a, t_b) and torch.equal(c_a, c_b)
    assert w_a.shape == (20,) and len(set(w_a.tolist())) == 20 and bool(((w_a >= 1.5) & (w_a < 4.0)).all())


# --- Decoupled DMD: Decoupled-Hybrid ---------------------------------------------------------------------------

def decoupled_times(module, monkeypatch, step: int, b: int = 256) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(CA times, DM times, the generator step's input time) of one generator loss on step `step` of the chain."""
    drawn, real_uniform, real_sample = [], module._uniform_t, module._train_sample
    monkeypatch.setattr(module, "_uniform_t", lambda *a, **k: drawn.append(real_uniform(*a, **k)) or drawn[-1])

    def at_step(labels, grad):
        z = torch.randn(labels.shape[0], *module.sample_shape())
        return module.run_generator(module.generator, z, labels, step, grad), step

    monkeypatch.setattr(module, "_train_sample", at_step)
    module.generator_losses(torch.arange(10).repeat(b // 10 + 1)[:b])
    return drawn[0], drawn[1], float(module.generator_times[step])


DECOUPLED = {"kind": "decoupled", "ca_t_range": [0.02, 0.98], "dm_t_range": [0.02, 0.98]}


@pytest.mark.parametrize("step", [0, 1, 2])
def test_decoupled_hybrid_draws_ca_times_cleaner_than_the_generator_step_and_dm_over_the_full_range(
        tiny_teacher_ckpt, monkeypatch, step):
    """Liu et al. 2025 (arXiv 2511.22677) sec. 4.3, Decoupled-Hybrid: tau_CA cleaner than the step's input time
    (their tau > t with t = 0 noise; ours t = 1 noise), tau_DM over the whole range."""
    module = build(tiny_teacher_ckpt, objective=DECOUPLED, generator={"steps": 3})
    assert module.objective.renoise_schedule == "hybrid"
    t_ca, t_dm, t_gen = decoupled_times(module, monkeypatch, step)
    assert bool((t_ca < t_gen).all()) and bool((t_ca >= 0.02).all())
    assert t_ca.max() > min(t_gen, 0.98) - 0.05  # the whole allowed range is drawn
    assert bool((t_dm >= 0.02).all() & (t_dm < 0.98).all()) and t_dm.max() > 0.9 and t_dm.min() < 0.1
    if step > 0:
        assert (t_dm > t_gen).any()  # DM is not constrained


def test_the_constrained_and_full_schedules_are_options(tiny_teacher_ckpt, monkeypatch):
    constrained = build(tiny_teacher_ckpt, objective={**DECOUPLED, "renoise": "constrained"}, generator={"steps": 3})
    t_ca, t_dm, t_gen = decoupled_times(constrained, monkeypatch, 2)
    assert bool((t_ca < t_gen).all()) and bool((t_dm < t_gen).all())
    monkeypatch.undo()
    full = build(tiny_teacher_ckpt, objective={**DECOUPLED, "renoise": "full"}, generator={"steps": 3})
    t_ca, t_dm, t_gen = decoupled_times(full, monkeypatch, 2)
    assert (t_ca > t_gen).any() and (t_dm > t_gen).any()  # fixed ranges, as before


def test_for_a_one_step_generator_hybrid_is_the_fixed_range_schedule(tiny_teacher_ckpt):
    """The one step starts at t_0 >= the ranges' hi, so hybrid draws exactly what the fixed ranges drew."""
    terms = []
    for renoise in ("hybrid", "full"):
        module = build(tiny_teacher_ckpt, objective={"kind": "decoupled", "renoise": renoise})
        torch.manual_seed(0)
        terms.append(module.generator_losses(torch.arange(10))["dmd"])
    assert torch.equal(terms[0], terms[1])


def test_a_generator_step_below_the_ca_range_is_refused(tiny_teacher_ckpt):
    with pytest.raises(ValueError, match="set renoise: full"):
        build(tiny_teacher_ckpt, objective={"kind": "decoupled", "ca_t_range": [0.5, 0.98]}, generator={"steps": 2})
    with pytest.raises(ValueError, match="draws dm times"):  # constrained also bounds the DM times
        build(tiny_teacher_ckpt, objective={"kind": "decoupled", "dm_t_range": [0.6, 0.98], "renoise": "constrained"},
              generator={"steps": 2})
    build(tiny_teacher_ckpt, objective={"kind": "decoupled", "dm_t_range": [0.6, 0.98]}, generator={"steps": 2})


# --- Score Forgetting Distillation: safe-class override, data-free ---------------------------------------------

def test_forget_defaults_to_the_safe_class_override():
    assert ForgetArgs([3]).target == "safe" and ForgetArgs([3]).eta is None
    assert ForgetArgs([3], targets=[8]).target == "safe"
    assert (ForgetArgs([3], eta=1.5).target, ForgetArgs([3], eta=1.5).eta) == ("esd", 1.5)  # earlier ESD records
    assert (ForgetArgs([3], eta=1.0, targets=[8]).target, ForgetArgs([3], eta=1.0, targets=[8]).eta) == ("safe", None)
    assert ForgetArgs([3], target="esd").eta == 1.0
    with pytest.raises(ValueError, match="remove them or set target: safe"):
        ForgetArgs([3], target="esd", targets=[8])
    with pytest.raises(ValueError, match="remove it or set target: esd"):
        ForgetArgs([3], target="safe", eta=1.0)
    with pytest.raises(ValueError, match="must be one of safe, esd"):
        ForgetArgs([3], target="toward")


def test_forgetting_every_class_leaves_no_safe_class(tiny_teacher_ckpt):
    with pytest.raises(ValueError, match="leaving no safe class"):
        build(tiny_teacher_ckpt, forget={"concepts": list(range(10))})


def test_without_safe_classes_each_forgotten_sample_gets_a_random_kept_class(tiny_teacher_ckpt, monkeypatch):
    module = build(tiny_teacher_ckpt, forget={"concepts": [3, 7]})
    draws = module.random_safe_classes(4000, torch.device("cpu"))
    counts = torch.bincount(draws, minlength=10)
    assert counts[3] == 0 and counts[7] == 0 and bool((counts[[0, 1, 2, 4, 5, 6, 8, 9]] > 400).all())
    seen, real_fake, real_dmd = {}, module._fake_x0, onestep.dmd_loss
    safe = torch.tensor([8, 8, 1, 1, 5, 5])
    monkeypatch.setattr(module, "random_safe_classes", lambda b, device: safe)
    monkeypatch.setattr(module, "_fake_x0", lambda x_t, t, c, w: seen.update(x_t=x_t, t=t, w=w) or real_fake(x_t, t, c, w))
    monkeypatch.setattr(onestep, "dmd_loss", lambda x, d_real, *a, **k: seen.update(d_real=d_real) or real_dmd(x, d_real, *a, **k))
    labels = torch.tensor([3, 0, 7, 5, 9, 3])
    module.generator_losses(labels)
    erased = torch.isin(labels, torch.tensor([3, 7]))
    want = toward_target(module.teacher, seen["x_t"][erased], seen["t"][erased], safe[erased], seen["w"][erased], "x0",
                         guider=module._guided["teacher"].guider)
    assert torch.equal(seen["d_real"][erased], want)


def test_labels_only_digits_give_the_same_requests_without_images():
    with_images, labels_only = DigitsDataModule(batch_size=32), DigitsDataModule(batch_size=32, images=False)
    assert with_images.has_images and not labels_only.has_images
    for dm in (with_images, labels_only):
        dm.setup()
    torch.manual_seed(0)
    images, labels = next(iter(with_images.train_dataloader()))
    torch.manual_seed(0)
    batch = labels_only.on_after_batch_transfer(next(iter(labels_only.train_dataloader())), 0)
    assert images.shape == (32, 1, 8, 8) and batch[0] is None and torch.equal(batch[1], labels)


def test_sfd_trains_data_free_and_refuses_a_discriminator_without_images(tiny_teacher_ckpt, tmp_path):
    module = build(tiny_teacher_ckpt, forget={"concepts": [3], "targets": [8]})
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=1,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(module, DigitsDataModule(batch_size=8, images=False))
    assert trainer.global_step == 2 and module.forget.target == "safe"
    gan = build(tiny_teacher_ckpt, forget={"concepts": [3]}, discriminator={"gan_weight": 0.1})
    with pytest.raises(ValueError, match="gives requests only"):
        gan.check_data(DigitsDataModule(images=False))
