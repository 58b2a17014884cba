"""Teacher pretraining: checkpoints that rebuild safely, EMA sampling, and exact resume."""
from __future__ import annotations

import torch

from tests.conftest import TINY_TEACHER
from train.runtime.checkpoint import CHECKPOINT_KEY
from train.runtime.checkpoint import load_method
from train.cli import main


def test_checkpoint_is_weights_only_and_rebuilds(tiny_teacher_ckpt):
    ckpt = torch.load(tiny_teacher_ckpt, weights_only=True)
    meta = ckpt[CHECKPOINT_KEY]
    assert meta["method"] == "teacher" and meta["config"]["_class_path"] == "train.methods.teacher.TeacherPretraining"
    assert ckpt["global_step"] == 12
    module = load_method(tiny_teacher_ckpt)
    assert not module.training
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"][k], rtol=0, atol=0)
    # sampling uses the EMA weights, which differ from the raw weights after training
    assert module.sampling_denoiser().net is module.ema.module
    p_raw = next(module.denoiser.net.parameters())
    p_ema = next(module.ema.module.parameters())
    assert not torch.equal(p_raw, p_ema)


def test_generate_counts_evaluations_and_is_seeded(tiny_teacher_ckpt):
    module = load_method(tiny_teacher_ckpt)
    labels = torch.arange(10)
    a, nfe = module.generate(labels, scale=2.0, steps=3, seed=1)
    b, _ = module.generate(labels, scale=2.0, steps=3, seed=1)
    c, nfe1 = module.generate(labels, scale=1.0, steps=3, seed=1, guider="conditional")
    assert a.shape == (10, 1, 8, 8) and nfe == 6 and nfe1 == 3
    assert torch.equal(a, b) and not torch.equal(a, c)


def _losses(root):
    """train/loss per step from the CSV logger of a run."""
    import csv

    rows = list(csv.DictReader(open(next(root.rglob("metrics.csv")))))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_resume_continues_from_the_checkpoint(tmp_path, classifier):
    """A run stopped at step 6 and resumed from last.ckpt trains steps 6..11 from the saved weights and
    optimizer state. (Bit-exact equality with an uninterrupted run, for every method: tests/train/test_resume.py.)"""
    common = ["--config", str(TINY_TEACHER), "--trainer.log_every_n_steps", "1",
              "--trainer.logger", "lightning.pytorch.loggers.CSVLogger"]
    part = tmp_path / "part"
    main(["fit", *common, "--trainer.default_root_dir", str(part), "--trainer.logger.save_dir", str(tmp_path / "first"),
          "--trainer.max_steps", "6"])
    first = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 6
    main(["fit", *common, "--trainer.default_root_dir", str(part), "--trainer.logger.save_dir", str(tmp_path / "resumed"),
          "--ckpt_path", str(part / "checkpoints" / "last.ckpt"), "--weights_only", "true"])
    assert sorted(_losses(tmp_path / "first")) == list(range(6))
    assert sorted(_losses(tmp_path / "resumed")) == list(range(6, 12))
    final = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 12
    assert int(final["state_dict"]["ema.num_updates"]) == 12  # EMA state carried across the restart


def test_a_checkpoint_of_the_flat_train_layout_still_loads(tiny_teacher_ckpt, tmp_path):
    """Checkpoints written before train/ was split into methods/, runtime/ and evaluation/ record class paths such as
    train.teacher.TeacherPretraining; they load as today's classes."""
    import torch

    from train.runtime.checkpoint import load_method

    ckpt = torch.load(tiny_teacher_ckpt, weights_only=True)
    ckpt[CHECKPOINT_KEY]["config"]["_class_path"] = "train.teacher.TeacherPretraining"
    torch.save(ckpt, tmp_path / "old.ckpt")
    module = load_method(tmp_path / "old.ckpt", expect="teacher")
    assert type(module).__module__ == "train.methods.teacher"
