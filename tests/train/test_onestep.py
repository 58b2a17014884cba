"""Tests of train/methods/onestep.py: a CLI fit with generator, LoRA fake score and discriminator, generator-only
step counting, checkpoint reload, one-step evaluation, NaN skipping, few-step / copy / Decoupled / PG-SB."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import train.methods.onestep as onestep
from data.digits import DigitsDataModule
from train.runtime.checkpoint import CheckpointError, load_method
from train.runtime.config import instantiate, read_yaml
from guidance.guided import GuidedDenoiser, teacher_target
from guidance.guiders import CFG
from losses.erasure import esd_target, toward_target
from train.methods.onestep import NonFiniteLoss, OneStepDistillation

ROOT = Path(__file__).resolve().parents[2]
TINY = {"fake_score": {"rank": 4}, "discriminator": {"hidden": 16}, "ema_decay": 0.9}


def merged(args: dict, **overrides) -> dict:
    """`args` with `overrides` applied; an argument group (a dict) is updated field by field."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in args.items()}
    for k, v in overrides.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(teacher: Path, **init_args) -> OneStepDistillation:
    return instantiate({"class_path": "train.methods.onestep.OneStepDistillation",
                        "init_args": merged({"teacher": str(teacher), **TINY}, **init_args)})


def fit(module, max_steps: int, batch_size: int = 8, root: Path | None = None) -> L.Trainer:
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(root) if root else None)
    trainer.fit(module, DigitsDataModule(batch_size=batch_size))
    return trainer


def adam_steps(opt) -> int:
    return int(next(iter(opt.optimizer.state.values()))["step"])


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_teacher_ckpt):
    """`python -m train fit` on a shrunk configs/digits/dmd.yaml: JS f-distill + GAN, so generator, LoRA fake
    score and discriminator all train; 3 generator steps, 2 fake-score updates each."""
    root = tmp_path_factory.mktemp("onestep")
    teacher = root / "teacher.ckpt"
    shutil.copy(tiny_teacher_ckpt, teacher)
    cfg = read_yaml(ROOT / "configs" / "digits" / "dmd.yaml")
    cfg["model"]["init_args"] = merged(merged(cfg["model"]["init_args"], **TINY), teacher=str(teacher),
                                       objective={"divergence": "jensen_shannon"}, discriminator={"gan_weight": 0.1},
                                       fake_score={"updates": 2})
    cfg["data"]["init_args"]["batch_size"] = 16
    cfg["trainer"].update(max_steps=3, val_check_interval=3, accelerator="cpu", logger=False, default_root_dir=str(root),
                          enable_progress_bar=False, enable_model_summary=False)
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True, "every_n_train_steps": 3, "save_top_k": 0}},
        {"class_path": "train.evaluation.callbacks.SampleMetrics", "init_args": {"num_per_class": 2}}]
    path = root / "onestep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from train.cli import main

    torch.manual_seed(0)
    cli = main(["fit", "--config", str(path)])
    return cli, root, teacher


def test_fit_counts_generator_steps_only(cli_run):
    cli, root, _ = cli_run
    module, trainer = cli.model, cli.trainer
    assert module.disc_head is not None and module.fake_score.mode == "lora"
    assert trainer.global_step == 3
    opt_g, opt_f, opt_d = module.optimizers()
    assert (adam_steps(opt_g), adam_steps(opt_f), adam_steps(opt_d)) == (3, 6, 6)
    assert int(module.ema.num_updates) == 3
    assert [s.last_epoch for s in module.lr_schedulers()] == [3, 6, 6]
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert "val/fd" in trainer.callback_metrics and trainer.callback_metrics["val/nfe"] == 1


def test_resume_continues_the_generator_step_count(cli_run):
    _, root, _ = cli_run
    from train.cli import main

    ckpt = root / "checkpoints" / "last.ckpt"
    cli = main(["fit", "--config", str(root / "onestep.yaml"), "--trainer.max_steps", "4",
                "--trainer.default_root_dir", str(root / "resumed"), "--ckpt_path", str(ckpt)])
    assert cli.trainer.global_step == 4
    assert [adam_steps(o) for o in cli.model.optimizers()] == [4, 8, 8]


def test_teacher_is_untouched_frozen_and_in_eval_mode(cli_run, tiny_teacher_ckpt):
    module = cli_run[0].model
    reference = load_method(tiny_teacher_ckpt, expect="teacher").sampling_denoiser()
    teacher = module.teacher
    assert not teacher.training and not any(p.requires_grad for n, p in module.fake_score.net.named_parameters() if "lora_" not in n)
    x, t, c = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([1, 2, -1, 7])
    with torch.no_grad():
        assert torch.equal(teacher(x, t, c).x0, reference(x, t, c).x0)
        assert not torch.allclose(module.fake_score(x, t, c).x0, reference(x, t, c).x0)  # the fake score moved


def test_checkpoint_reloads_and_generates_in_one_step(cli_run):
    cli, root, teacher = cli_run
    moved = teacher.rename(teacher.with_suffix(".moved"))  # the teacher (the LoRA fake score's base) is left out
    try:
        with pytest.raises(CheckpointError, match=r"'fake_score.net' was left out .*which does not exist; restore"):
            load_method(root / "checkpoints" / "last.ckpt")
    finally:
        moved.rename(teacher)
    reloaded = load_method(root / "checkpoints" / "last.ckpt")
    assert isinstance(reloaded, OneStepDistillation)
    labels = torch.arange(10).repeat(2)
    a, nfe = reloaded.generate(labels, seed=3)
    b, _ = cli.model.generate(labels, seed=3)
    assert nfe == 1 and a.shape == (20, 1, 8, 8)
    assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="'onestep'"):
        load_method(root / "checkpoints" / "last.ckpt", expect="teacher")


def test_cli_evaluate_reports_one_network_evaluation(cli_run):
    _, root, _ = cli_run
    from train.cli import main

    out = root / "metrics.json"
    main(["evaluate", "--ckpt", str(root / "checkpoints" / "last.ckpt"), "--num-per-class", "3", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["nfe_per_sample"] == 1 and rows[0]["num_samples"] == 30


def test_generator_starts_as_the_teachers_one_step_denoiser(tiny_teacher_ckpt):
    module = build(tiny_teacher_ckpt, fake_score={"mode": "copy"})
    assert module.generator.net.training and module.fake_score.net.training
    assert not module.teacher.training and not module.ema.module.training
    teacher = load_method(tiny_teacher_ckpt, expect="teacher").sampling_denoiser()
    z, c = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    t0 = module.generator_times[0]
    assert t0.item() == 1.0
    with torch.no_grad():
        want = teacher(z * teacher.schedule.sigma(t0), t0.expand(5), c).x0
        assert torch.equal(module.run_generator(module.generator, z, c), want)


def test_non_finite_losses_are_skipped_and_reported(tiny_teacher_ckpt, monkeypatch):
    calls = {"dmd": 0, "fake": 0}
    real_dmd, real_fake = onestep.dmd_loss, onestep.fake_score_loss

    def nan_dmd(*a, **k):
        calls["dmd"] += 1
        out = real_dmd(*a, **k)
        return out * float("nan") if calls["dmd"] == 2 else out

    def nan_fake(*a, **k):
        calls["fake"] += 1
        out = real_fake(*a, **k)
        return out + float("inf") if calls["fake"] == 1 else out

    monkeypatch.setattr(onestep, "dmd_loss", nan_dmd)
    monkeypatch.setattr(onestep, "fake_score_loss", nan_fake)
    module = build(tiny_teacher_ckpt)
    before = [p.detach().clone() for p in module.generator.net.parameters()]
    with pytest.warns(NonFiniteLoss) as record:
        trainer = fit(module, max_steps=3)
    messages = [str(w.message) for w in record if issubclass(w.category, NonFiniteLoss)]
    assert len(messages) == 2
    assert messages[0].startswith("step 0: non-finite fake_score=inf") and "fake score update" in messages[0]
    assert messages[1].startswith("step 1: non-finite dmd=nan") and "generator update" in messages[1]
    assert [(s["step"], s["phase"]) for s in module.nonfinite_guard.skipped] == [(0, "fake score"), (1, "generator")]
    assert trainer.global_step == 3  # 4 batches, 3 generator updates
    opt_g, opt_f = module.optimizers()
    assert (adam_steps(opt_g), adam_steps(opt_f)) == (3, 3)
    assert all(torch.isfinite(p).all() for p in module.generator.net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, module.generator.net.parameters()))


def test_training_stops_after_max_skips_consecutive_non_finite_steps(tiny_teacher_ckpt, monkeypatch):
    monkeypatch.setattr(onestep, "dmd_loss", lambda *a, **k: torch.full((a[0].shape[0],), float("nan")))
    module = build(tiny_teacher_ckpt, max_skips=2)
    with pytest.warns(NonFiniteLoss), pytest.raises(RuntimeError, match="2 generator updates in a row"):
        fit(module, max_steps=3)


def test_few_step_decoupled_pgsb_with_a_copied_fake_score(tiny_teacher_ckpt, tmp_path):
    module = build(tiny_teacher_ckpt, fake_score={"mode": "copy"}, pg_sb_range=[1.0, 3.0], generator={"steps": 2},
                   objective={"kind": "decoupled", "ca_t_range": [0.5, 0.98], "dm_t_range": [0.02, 0.5],
                              "renoise": "full"})  # fixed ranges (the default, hybrid, refuses CA lo 0.5 > step 2's t)
    assert "fake" in module._guided and module.disc_head is None and module.fake_p_uncond == 0.1
    trainer = fit(module, max_steps=2, root=tmp_path)
    assert trainer.global_step == 2
    opt_g, opt_f = module.optimizers()
    assert (adam_steps(opt_g), adam_steps(opt_f)) == (2, 2)
    assert torch.allclose(module.generator_times, module.generator.schedule.sampling_times(2).float())
    images, nfe = module.generate(torch.arange(10), seed=0)
    assert nfe == 2 and torch.isfinite(images).all()
    # the copy's teacher stays frozen; its weights are saved once, under fake_score.teacher
    keys = module.state_dict().keys()
    assert any(k.startswith("fake_score.teacher.net.") for k in keys)
    assert not any(k.startswith("teacher.") for k in keys)


def test_discriminator_on_the_frozen_teachers_features_trains(tiny_teacher_ckpt, tmp_path):
    """discriminator.features: teacher reads the frozen teacher's mid block (no grad, channels_last on CPU), which
    crashed GroupNorm's backward in the head (a segmentation fault) before the head made its input contiguous."""
    module = build(tiny_teacher_ckpt, objective={"divergence": "jensen_shannon"},
                   discriminator={"gan_weight": 0.1, "features": "teacher"})
    head = [p.detach().clone() for p in module.disc_head.parameters()]
    trainer = fit(module, max_steps=2, root=tmp_path)
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(head, module.disc_head.parameters()))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.disc_head.parameters())


def test_frozen_weights_in_bfloat16_train_and_reload(tiny_teacher_ckpt, tmp_path):
    """frozen_dtype: bfloat16 holds the teacher / the LoRA base in bfloat16 (models.frozen_dtype); the generator,
    the LoRA weights and the discriminator train in float32, and the checkpoint rebuilds the same module."""
    module = build(tiny_teacher_ckpt, frozen_dtype="bfloat16", objective={"divergence": "jensen_shannon"},
                   discriminator={"gan_weight": 0.1})
    trainer = fit(module, max_steps=2, root=tmp_path)
    assert trainer.global_step == 2
    named = dict(module.fake_score.net.named_parameters())
    assert all(p.dtype == (torch.float32 if "lora_" in n else torch.bfloat16) for n, p in named.items())
    trainable = list(module.generator.net.parameters()) + list(module.disc_head.parameters())
    assert all(p.dtype == torch.float32 for p in trainable)
    assert module.hparams.frozen_dtype == "bfloat16"
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    reloaded = load_method(tmp_path / "m.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), module.state_dict().values()))
    assert reloaded.fake_score.net.unet.conv_in.base_layer.weight.dtype == torch.bfloat16
    a, nfe = reloaded.generate(torch.arange(10), seed=1)
    assert nfe == 1 and torch.isfinite(a).all() and torch.equal(a, module.generate(torch.arange(10), seed=1)[0])


@pytest.mark.parametrize("guider, params", [
    ("apg", {"eta": 0.0}),
    ("interval", {"t_lo": 0.2, "t_hi": 0.8, "inner": {"name": "rescale", "inner": "cfg"}}),
    ("conditional", {}),
])
def test_any_registered_guider_gives_the_teacher_target(tiny_teacher_ckpt, guider, params, monkeypatch):
    module = build(tiny_teacher_ckpt, guider=guider, guider_params=params)
    seen = {}
    real = onestep.teacher_target

    def spy(guided, *a, **k):
        seen["guider"] = guided.guider.name
        return real(guided, *a, **k)

    monkeypatch.setattr(onestep, "teacher_target", spy)
    terms = module.generator_losses(torch.tensor([0, 5, 9]))
    assert seen["guider"] == guider and torch.isfinite(terms["dmd"])
    terms["dmd"].backward()
    assert any(p.grad is not None for p in module.generator.net.parameters())
    assert all(p.grad is None for p in module.fake_score.net.parameters())


@pytest.mark.parametrize("overrides, message", [
    ({"objective": {"kind": "decoupled"}, "guider": "apg"}, "set guider: cfg"),
    ({"generator": {"steps": 2, "times": [0.9]}}, "one time per generator step"),
    ({"objective": {"divergence": "js"}}, "jensen_shannon"),
    ({"objective": {"t_range": [0.5, 0.2]}}, "objective.t_range"),
    ({"fake_score": {"updates": 0}}, "fake_score.updates"),
    ({"frozen_dtype": "bf16"}, "bfloat16"),
])
def test_impossible_settings_are_refused_with_what_to_change(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        OneStepDistillation(teacher=str(tmp_path / "missing.ckpt"), **overrides)


def test_missing_teacher_says_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/digits/teacher.yaml"):
        OneStepDistillation(teacher=str(tmp_path / "missing.ckpt"))


@pytest.mark.parametrize("name", ["dmd.yaml", "fdistill_js.yaml", "sfd.yaml"])
def test_shipped_configs_build(name, tiny_teacher_ckpt):
    cfg = read_yaml(ROOT / "configs" / "digits" / name)
    assert cfg["model"]["class_path"] == "train.methods.onestep.OneStepDistillation"
    cfg["model"]["init_args"]["teacher"] = str(tiny_teacher_ckpt)
    module = instantiate(cfg["model"])
    assert module.generator_steps == 1
    assert (module.disc_head is not None) == (module.divergence != "reverse_kl" or module.gan_weight > 0)
    assert module.hparams["objective"] == cfg["model"]["init_args"]["objective"]  # recorded as given: plain dicts
    assert isinstance(instantiate(cfg["data"], base=L.LightningDataModule), DigitsDataModule)


# --- Score Forgetting Distillation: forget ----------------------------------------------------------

@pytest.mark.parametrize("targets", [None, [8]])
def test_sfd_generator_target_is_the_erasure_target_for_erased_labels(tiny_teacher_ckpt, monkeypatch, targets):
    toward = None if targets is None else [8, 1]
    module = build(tiny_teacher_ckpt, forget={"concepts": [3, 7], "eta": 1.5, "targets": toward},
                   discriminator={"gan_weight": 0.1})
    seen, real_fake, real_dmd = {}, module._fake_x0, onestep.dmd_loss

    def spy_fake(x_t, t, cond, w):
        seen.update(x_t=x_t, t=t, w=w)
        return real_fake(x_t, t, cond, w)

    def spy_dmd(x, d_real, d_fake, *a, **k):
        seen["d_real"] = d_real
        return real_dmd(x, d_real, d_fake, *a, **k)

    monkeypatch.setattr(module, "_fake_x0", spy_fake)
    monkeypatch.setattr(onestep, "dmd_loss", spy_dmd)
    labels = torch.tensor([3, 0, 7, 5, 9, 3])
    terms = module.generator_losses(labels)
    x_t, t, w, d_real = seen["x_t"], seen["t"], seen["w"], seen["d_real"]
    erased, teacher = torch.isin(labels, torch.tensor([3, 7])), module.teacher
    plain = teacher_target(GuidedDenoiser(teacher, CFG()), x_t, t, labels, w, space="x0")
    if targets is None:  # ESD: the frozen teacher guided at w = -eta
        want = esd_target(teacher, x_t[erased], t[erased], labels[erased], 1.5, space="x0")
    else:  # toward: the guided teacher's target for 3 -> 8, 7 -> 1 at the sample's own scale
        to = torch.where(labels[erased] == 3, 8, 1)
        want = toward_target(teacher, x_t[erased], t[erased], to, w[erased], "x0", guider=module._guided["teacher"].guider)
    assert torch.equal(d_real[erased], want)
    assert torch.equal(d_real[~erased], plain[~erased])
    assert not torch.allclose(d_real[erased], plain[erased])
    reference = load_method(tiny_teacher_ckpt, expect="teacher").sampling_denoiser()  # the teacher itself, no LoRA view
    torch.testing.assert_close(d_real[~erased], teacher_target(GuidedDenoiser(reference, CFG()), x_t, t, labels, 2.0,
                                                                  "x0")[~erased], rtol=1e-5, atol=1e-5)
    (terms["dmd"] + terms["generator_gan"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in module.generator.net.parameters() if p.grad is not None)


def test_sfd_turns_the_gan_term_off_for_erased_labels(tiny_teacher_ckpt):
    module = build(tiny_teacher_ckpt, forget={"concepts": [3]}, discriminator={"gan_weight": 0.1})
    assert module.gan_keep(torch.tensor([3, 1, 3])).tolist() == [0.0, 1.0, 0.0]
    assert module.generator_losses(torch.tensor([3, 3]))["generator_gan"].item() == 0.0
    assert module.generator_losses(torch.tensor([3, 4]))["generator_gan"].item() > 0.0
    assert build(tiny_teacher_ckpt, discriminator={"gan_weight": 0.1}).gan_keep(torch.tensor([3])) == 1.0


@pytest.mark.parametrize("overrides, message", [
    ({"forget": {"concepts": [3, 3]}}, "distinct classes in 0..9"),
    ({"forget": {"concepts": [10]}}, "distinct classes in 0..9"),
    ({"forget": {"concepts": [3], "eta": -1.0}}, "forget.eta must be >= 0"),
    ({"forget": {"concepts": [3]}, "objective": {"kind": "decoupled"}}, "set objective.kind: dmd"),
    ({"forget": {"concepts": [3]}, "objective": {"divergence": "jensen_shannon"}}, "objective.divergence: reverse_kl"),
    ({"forget": {"concepts": [3, 4], "targets": [8]}}, "one class in 0..9 per erased concept"),
    ({"forget": {"concepts": [3, 4], "targets": [8, 3]}}, "none of them erased"),
    ({"forget": {"targets": [8]}}, "forget.concepts is empty"),
])
def test_sfd_impossible_settings_are_refused(tiny_teacher_ckpt, overrides, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_teacher_ckpt, **overrides)


def test_sfd_toward_refuses_a_guider_that_needs_a_weak_model(tiny_teacher_ckpt):
    with pytest.raises(ValueError, match="cannot need a weak model"):
        build(tiny_teacher_ckpt, forget={"concepts": [3], "targets": [8]}, guider="autoguidance",
              weak_teacher=str(tiny_teacher_ckpt))
