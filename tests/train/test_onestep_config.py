"""Tests of train/methods/onestep_config.py: OneStepDistillation's argument groups refuse impossible settings with
what to change, go through jsonargparse (YAML, dotted overrides), are recorded as plain dicts, and checkpoints that
recorded the earlier flat arguments still load and sample the same."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from data.digits import DigitsDataModule
from train.methods.onestep_config import (DiscriminatorArgs, FakeScoreArgs, ForgetArgs, GeneratorArgs, ObjectiveArgs,
                                          OptimizerArgs, as_group)
from train.runtime.checkpoint import CHECKPOINT_KEY, is_rebuildable, load_method, plain_config, upgrade_config
from train.runtime.config import instantiate

# every argument as the flat layout's CLI recorded it (non-default values where the groups must keep them apart)
FLAT = {
    "_class_path": "train.onestep.OneStepDistillation", "teacher": "t.ckpt", "teacher_config": {"_class_path": "x"},
    "weak_teacher": None, "guider": "cfg", "guider_params": None, "guidance_scale": 2.5, "pg_sb_range": None,
    "objective": "dmd", "divergence": "jensen_shannon", "ratio_time_bins": 4, "dmd_t_range": [0.1, 0.9],
    "ca_t_range": None, "dm_t_range": None, "ca_weight": 1.0, "dm_weight": 1.0, "gan_weight": 0.1,
    "fake_score": "lora", "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ["to_q"], "fake_updates": 2,
    "fake_p_uncond": 0.2, "discriminator_features": "teacher", "discriminator_layer": "unet.mid_block",
    "discriminator_hidden": 16, "disc_t_range": [0.2, 0.8], "generator_steps": 2, "generator_times": [1.0, 0.5],
    "lr": 1e-3, "lr_fake": 2e-3, "lr_disc": 3e-3, "betas": [0.5, 0.99], "weight_decay": 0.01, "warmup_steps": 5,
    "grad_clip": 1.0, "ema_decay": 0.9, "max_skips": 3, "val_samples": 20, "nonfinite": "stop",
    "erase_concepts": None, "erase_eta": 1.0, "erase_targets": None, "frozen_dtype": "bfloat16",
}
GROUPED = {
    "_class_path": "train.methods.onestep.OneStepDistillation", "teacher": "t.ckpt",
    "teacher_config": {"_class_path": "x"}, "weak_teacher": None, "guider": "cfg", "guider_params": None,
    "guidance_scale": 2.5, "pg_sb_range": None,
    "objective": {"kind": "dmd", "divergence": "jensen_shannon", "ratio_time_bins": 4, "t_range": [0.1, 0.9],
                  "ca_t_range": None, "dm_t_range": None, "ca_weight": 1.0, "dm_weight": 1.0},
    "fake_score": {"mode": "lora", "rank": 4, "alpha": 8.0, "targets": ["to_q"], "updates": 2, "p_uncond": 0.2,
                   "lr": 2e-3},
    "discriminator": {"gan_weight": 0.1, "features": "teacher", "layer": "unet.mid_block", "hidden": 16,
                      "t_range": [0.2, 0.8], "lr": 3e-3},
    "generator": {"steps": 2, "times": [1.0, 0.5], "lr": 1e-3},
    "optimizer": {"betas": [0.5, 0.99], "weight_decay": 0.01, "warmup_steps": 5, "grad_clip": 1.0},
    "forget": None, "ema_decay": 0.9, "max_skips": 3, "val_samples": 20, "nonfinite": "stop",
    "frozen_dtype": "bfloat16",
}


def test_a_flat_config_maps_onto_the_groups():
    assert upgrade_config(FLAT) == GROUPED
    assert upgrade_config(GROUPED) == GROUPED  # a grouped config comes back unchanged
    sfd = upgrade_config({**FLAT, "divergence": "reverse_kl", "erase_concepts": [3], "erase_eta": 1.5,
                          "erase_targets": [8]})
    assert sfd["forget"] == {"concepts": [3], "eta": 1.5, "targets": [8]}
    assert not set(FLAT) - set(GROUPED) & set(sfd)  # no flat name left behind
    # only what a module built by `instantiate` recorded (the arguments it was given)
    given = upgrade_config({"_class_path": "train.methods.onestep.OneStepDistillation", "teacher": "t.ckpt",
                            "lora_rank": 4, "lr": 1e-3, "erase_eta": 2.0})
    assert given == {"_class_path": "train.methods.onestep.OneStepDistillation", "teacher": "t.ckpt",
                     "fake_score": {"rank": 4}, "generator": {"lr": 1e-3}, "forget": None}


def test_a_checkpoint_with_flat_arguments_loads_and_samples_the_same(tiny_teacher_ckpt, tmp_path):
    flat = {"teacher": str(tiny_teacher_ckpt), "divergence": "jensen_shannon", "gan_weight": 0.1, "fake_updates": 2,
            "lora_rank": 4, "discriminator_hidden": 16, "ema_decay": 0.9, "lr": 1e-3, "lr_fake": 2e-3,
            "generator_steps": 2, "dmd_t_range": [0.1, 0.9], "warmup_steps": 1}
    grouped = {"teacher": str(tiny_teacher_ckpt), "objective": {"divergence": "jensen_shannon", "t_range": [0.1, 0.9]},
               "discriminator": {"gan_weight": 0.1, "hidden": 16}, "fake_score": {"updates": 2, "rank": 4, "lr": 2e-3},
               "generator": {"steps": 2, "lr": 1e-3}, "optimizer": {"warmup_steps": 1}, "ema_decay": 0.9}
    module = instantiate({"class_path": "train.methods.onestep.OneStepDistillation", "init_args": grouped})
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DigitsDataModule(batch_size=8))
    module.self_contained_checkpoints = True  # the frozen teacher in the checkpoint, as the flat layout's held it
    trainer.save_checkpoint(tmp_path / "grouped.ckpt")
    ckpt = torch.load(tmp_path / "grouped.ckpt", map_location="cpu", weights_only=True)
    # what the flat layout wrote: its class path of before the train/ split and every argument flat
    old = {"_class_path": "train.onestep.OneStepDistillation", "teacher_config": module.hparams["teacher_config"], **flat}
    ckpt["hyper_parameters"], ckpt[CHECKPOINT_KEY]["config"] = old, old
    torch.save(ckpt, tmp_path / "flat.ckpt")
    tiny_teacher_ckpt.rename(tmp_path / "teacher.moved")  # rebuilt from the recorded teacher config
    try:
        reloaded = load_method(tmp_path / "flat.ckpt")
    finally:
        (tmp_path / "teacher.moved").rename(tiny_teacher_ckpt)
    assert (reloaded.lrs, reloaded.fake_args.updates, reloaded.dmd_t_range, reloaded.disc_t_range) == (
        (1e-3, 2e-3, 2e-3), 2, (0.1, 0.9), (0.1, 0.9))
    assert reloaded.divergence == "jensen_shannon" and reloaded.gan_weight == 0.1 and reloaded.generator_steps == 2
    assert reloaded.optim_args.warmup_steps == 1 and reloaded.disc_head is not None
    state = module.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())
    a, nfe = reloaded.generate(torch.arange(10), seed=3)
    b, _ = module.eval().generate(torch.arange(10), seed=3)
    assert nfe == 2 and torch.equal(a, b)


def test_groups_are_overridden_field_by_field_on_the_command_line(capsys):
    from train.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/digits/dmd.yaml", "--model.init_args.objective.divergence", "forward_kl",
              "--model.init_args.forget.concepts", "[3]", "--print_config"])
    out = capsys.readouterr().out
    assert "divergence: forward_kl" in out and "t_range:" in out  # the other fields of the group as shipped
    assert "rank: 32" in out and "concepts:\n      - 3" in out


def test_groups_are_recorded_as_plain_dicts():
    hp = {"_class_path": "train.methods.onestep.OneStepDistillation", "objective": ObjectiveArgs(divergence="pearson"),
          "forget": ForgetArgs([3], targets=[8])}
    plain = plain_config(hp)
    # the f-distill normalisation's fields default to None (the two-stage scheme, 10 bins, rate 0: ratio_scheme)
    assert plain["objective"] == {"kind": "dmd", "divergence": "pearson", "ratio_normalization": None,
                                  "ratio_time_bins": None, "ratio_ema_rate": None, "t_range": [0.02, 0.98],
                                  "ca_t_range": None, "dm_t_range": None, "ca_weight": 1.0, "dm_weight": 1.0,
                                  "renoise": None, "alpha": 1.2, "lsg_fake_scale": None, "lsg_train_scale": None}
    assert ObjectiveArgs(divergence="pearson").ratio_scheme() == ("two_stage", 10, 0.0)
    # the forgetting target is resolved when the group is built, so the record names it
    assert plain["forget"] == {"concepts": [3], "eta": None, "targets": [8], "target": "safe"}
    assert is_rebuildable(hp)  # and the checkpoint records them (MethodModule.on_save_checkpoint)
    assert ObjectiveArgs(**plain["objective"]) == ObjectiveArgs(divergence="pearson", t_range=[0.02, 0.98])


def test_a_group_is_given_as_itself_a_dict_or_nothing():
    assert as_group(FakeScoreArgs, {"rank": 4}) == FakeScoreArgs(rank=4)
    assert as_group(FakeScoreArgs, None) == FakeScoreArgs()
    args = GeneratorArgs(steps=2)
    assert as_group(GeneratorArgs, args) is args
    with pytest.raises(ValueError, match="FakeScoreArgs has no field lora_rank; its fields are mode, rank"):
        as_group(FakeScoreArgs, {"lora_rank": 4})


@pytest.mark.parametrize("build, message", [
    (lambda: ObjectiveArgs(kind="dmd2"), "objective.kind must be one of dmd, decoupled"),
    (lambda: ObjectiveArgs(divergence="kl"), "objective.divergence must be one of reverse_kl, forward_kl"),
    (lambda: ObjectiveArgs(t_range=(0.5, 1.5)), r"objective.t_range must satisfy"),
    (lambda: ObjectiveArgs(kind="decoupled", divergence="jensen_shannon"), "set divergence: reverse_kl or kind: dmd"),
    (lambda: ObjectiveArgs(ratio_time_bins=4), "set ratio_time_bins: 0 or another divergence"),
    (lambda: ObjectiveArgs(ca_t_range=(0.5, 0.9)), "set kind: decoupled or remove them"),
    (lambda: ObjectiveArgs(dm_weight=2.0), "set kind: decoupled or remove them"),
    (lambda: FakeScoreArgs(mode="full"), "fake_score.mode must be one of lora, copy"),
    (lambda: FakeScoreArgs(updates=0), "fake_score.updates must be >= 1"),
    (lambda: FakeScoreArgs(p_uncond=1.5), r"fake_score.p_uncond must be in \[0, 1\]"),
    (lambda: DiscriminatorArgs(features="real"), "discriminator.features must be one of fake, teacher"),
    (lambda: DiscriminatorArgs(gan_weight=-0.1), "discriminator.gan_weight must be >= 0"),
    (lambda: DiscriminatorArgs(t_range=(0.9, 0.1)), "discriminator.t_range must satisfy"),
    (lambda: GeneratorArgs(steps=0), "generator.steps must be >= 1"),
    (lambda: GeneratorArgs(steps=2, times=[0.5, 0.9]), r"descending times in \(0, 1\]"),
    (lambda: OptimizerArgs(betas=(0.9, 1.0)), r"optimizer.betas must be two numbers in \[0, 1\)"),
    (lambda: OptimizerArgs(warmup_steps=-1), "optimizer.warmup_steps must be >= 0"),
    (lambda: ForgetArgs([]), "set forget: null for plain distillation"),
])
def test_impossible_settings_of_a_group_say_what_to_change(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_group_error_reaches_the_command_line_as_one_line(tmp_path, capsys):
    from train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "configs/digits/dmd.yaml", "--model.init_args.teacher", str(tmp_path / "t.ckpt"),
              "--model.init_args.fake_score.updates", "0", "--trainer.default_root_dir", str(tmp_path)])
    assert e.value.code != 0
    assert "fake_score.updates must be >= 1" in capsys.readouterr().err


def test_a_run_with_flat_arguments_resumes_through_the_cli(tiny_teacher_ckpt, tmp_path):
    """`fit --config <its config.yaml> --ckpt_path` on a run of the flat layout: the config and the checkpoint's
    hyper-parameters are both read through upgrade_config, and the run continues."""
    import yaml

    from train.cli import main

    module = instantiate({"class_path": "train.methods.onestep.OneStepDistillation", "init_args": {
        "teacher": str(tiny_teacher_ckpt), "fake_score": {"rank": 4}, "generator": {"lr": 1e-3}, "ema_decay": 0.0}})
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DigitsDataModule(batch_size=8))
    trainer.save_checkpoint(tmp_path / "grouped.ckpt")
    ckpt = torch.load(tmp_path / "grouped.ckpt", map_location="cpu", weights_only=True)
    old = {"_class_path": "train.onestep.OneStepDistillation", "teacher": str(tiny_teacher_ckpt),
           "teacher_config": module.hparams["teacher_config"], "lora_rank": 4, "lr": 1e-3, "ema_decay": 0.0}
    ckpt["hyper_parameters"], ckpt[CHECKPOINT_KEY]["config"] = old, old
    torch.save(ckpt, tmp_path / "flat.ckpt")
    config = {"model": {"class_path": "train.onestep.OneStepDistillation",  # its config.yaml, of the flat layout
                        "init_args": {"teacher": str(tiny_teacher_ckpt), "lora_rank": 4, "lr": 1e-3, "ema_decay": 0.0}},
              "data": {"class_path": "data.digits.DigitsDataModule", "init_args": {"batch_size": 8}},
              "trainer": {"max_steps": 2, "accelerator": "cpu", "logger": False, "limit_val_batches": 0,
                          "enable_progress_bar": False, "enable_model_summary": False,
                          "default_root_dir": str(tmp_path / "run"),
                          "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                         "init_args": {"save_last": True, "save_top_k": 0}}]}}
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "resume.yaml"), "--ckpt_path", str(tmp_path / "flat.ckpt")])
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 2
    assert resumed["hyper_parameters"]["fake_score"]["rank"] == 4 and resumed["hyper_parameters"]["generator"]["lr"] == 1e-3
