"""Guidance distillation end to end: stage 1 (train/guidance_distillation) and stage 2 (train/progressive) from the
tiny teacher, through the CLI; checkpoints, sampling cost, round bookkeeping, resume, and the losses' wiring on
Gaussian-mixture data where the targets are known in closed form; data-free stage 1 (x_t from the teacher's guided
trajectories); every draw through per_sample (two processes equal one). Text models: test_distillation_text.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from guidance.denoiser import Denoiser
from guidance.parameterization import from_x0
from guidance.samplers import ddim_step
from guidance.schedules import _bcast
from losses.distillation import progressive_target
from models.w_embedding import WInputGuided
from tests.guidance.gmm import GaussianMixture, gmm_denoiser
from tests.losses.test_distillation import ExactGuidedStudent
from train.runtime.checkpoint import load_method, read_checkpoint
from train.cli import main
from train.runtime.config import instantiate, read_yaml
from train.methods.guidance_distillation import GuidanceDistillation
from train.methods.progressive import ProgressiveDistillation

ROOT = Path(__file__).resolve().parents[2]
GD = "train.methods.guidance_distillation.GuidanceDistillation"
PD = "train.methods.progressive.ProgressiveDistillation"


def write_config(path: Path, class_path: str, init_args: dict, root: Path, max_steps: int, ckpt_every: int,
                 keep_all: bool = False) -> Path:
    """A tiny fit config (cpu, no logger) in the layout of configs/digits/*.yaml."""
    ckpt = {"save_last": True, "every_n_train_steps": ckpt_every, "save_top_k": -1 if keep_all else 0}
    if keep_all:
        ckpt["filename"] = "{step}"
    cfg = {"seed_everything": 0,
           "model": {"class_path": class_path, "init_args": init_args},
           "data": {"class_path": "data.digits.DigitsDataModule", "init_args": {"batch_size": 16}},
           "trainer": {"max_steps": max_steps, "accelerator": "cpu", "default_root_dir": str(root),
                       "check_val_every_n_epoch": None, "val_check_interval": 2, "limit_val_batches": 1,
                       "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                       "logger": False,
                       "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": ckpt},
                                     {"class_path": "train.evaluation.callbacks.SampleMetrics", "init_args": {"num_per_class": 1}}]}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def stage1_ckpt(tiny_teacher_ckpt, tmp_path_factory) -> Path:
    """Stage 1 fitted for 4 steps through `python -m train fit` from a COPY of the tiny teacher, which is then
    deleted: the self-contained student checkpoint (--self_contained_checkpoints true, which keeps the frozen teacher
    in it) must not need the teacher file afterwards."""
    root = tmp_path_factory.mktemp("stage1")
    teacher = root / "teacher_copy.ckpt"
    shutil.copy(tiny_teacher_ckpt, teacher)
    cfg = write_config(root / "gd.yaml", GD, {"teacher": str(teacher), "w_min": 1.0, "w_max": 5.0, "lr": 1e-3,
                                               "warmup_steps": 1, "ema_decay": 0.5, "val_steps": 2}, root, 4, 2)
    main(["fit", "--config", str(cfg), "--self_contained_checkpoints", "true"])
    teacher.unlink()
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def progressive_root(stage1_ckpt, tmp_path_factory) -> Path:
    """Stage 2 through the CLI: 4 -> 2 -> 1 steps, 3 optimizer steps per round, a checkpoint every step."""
    root = tmp_path_factory.mktemp("progressive")
    cfg = write_config(root / "pd.yaml", PD, {"student": str(stage1_ckpt), "start_steps": 4, "end_steps": 1,
                                               "steps_per_round": 3, "lr": 1e-3, "warmup_steps": 1, "ema_decay": 0.5},
                       root, 6, 1, keep_all=True)
    main(["fit", "--config", str(cfg)])
    return root


# ------------------------------------------------------------------------------------------------ stage 1

def test_stage1_checkpoint_rebuilds_without_the_teacher_and_samples_one_eval_per_step(stage1_ckpt, tmp_path):
    module = load_method(stage1_ckpt)
    assert isinstance(module, GuidanceDistillation)
    assert read_checkpoint(stage1_ckpt)["guidedistill"]["config"]["teacher_config"]["_class_path"] == "train.methods.teacher.TeacherPretraining"
    assert module.sampling_denoiser().net.w_embedding.linear_2.weight.abs().sum() > 0  # trained away from zero
    images, nfe = module.generate(torch.arange(10), 3.0, steps=3, seed=1)
    assert images.shape == (10, 1, 8, 8) and torch.isfinite(images).all() and nfe == 3
    with pytest.raises(ValueError, match="guidance-distilled student"):
        module.generate(torch.arange(2), 3.0, steps=2, guider="apg")

    main(["sample", "--ckpt", str(stage1_ckpt), "--scale", "2", "--steps", "2", "--num-per-class", "2",
          "--out", str(tmp_path / "s")])
    assert float(np.load(tmp_path / "s" / "samples.npz")["nfe_per_sample"]) == 2
    main(["evaluate", "--ckpt", str(stage1_ckpt), "--scales", "1", "3", "--steps", "2", "--num-per-class", "3",
          "--out", str(tmp_path / "m.json")])
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [r["w"] for r in rows] == [1.0, 3.0] and all(r["nfe_per_sample"] == 2 for r in rows)


def _gd(tiny_teacher_ckpt, **kw) -> GuidanceDistillation:
    return instantiate({"class_path": GD, "init_args": {"teacher": str(tiny_teacher_ckpt), **kw}})


@pytest.mark.parametrize("negative_label", [None, 2])
def test_stage1_loss_on_gaussian_data_has_the_analytic_values(tiny_teacher_ckpt, negative_label):
    """The module's loss with a closed-form GMM teacher: 0 for the exact guided student, and the analytic
    ((w' - w)(D_c - D_neg))^2 weighted error for a student with the wrong scale."""
    m = _gd(tiny_teacher_ckpt, negative=negative_label, loss_space="v", weighting="none")
    sched = m.student.schedule
    gmm = GaussianMixture.random(num_classes=3, per_class=2, shape=(1, 3, 3), seed=5)
    m.teacher = gmm_denoiser(gmm, sched, "v")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (32,), generator=g)
    x0, eps = gmm.sample(labels, g), torch.randn(32, 1, 3, 3, generator=g, dtype=torch.float64)
    t, w = (0.05 + 0.9 * torch.rand(32, generator=g)).double(), (1 + 5 * torch.rand(32, generator=g)).double()

    m.student = Denoiser(ExactGuidedStudent(gmm, sched, "eps", negative_label), sched, "eps")
    assert m.distillation_loss(x0, labels, t, eps, w).max() < 1e-18

    m.student = Denoiser(ExactGuidedStudent(gmm, sched, "eps", negative_label, w_offset=1.0), sched, "eps")
    loss = m.distillation_loss(x0, labels, t, eps, w)
    x_t = sched.add_noise(x0, eps, t)
    a, s = sched.alpha_sigma(t)
    neg = torch.full_like(labels, -1 if negative_label is None else negative_label)
    delta = gmm.posterior_mean(x_t, a, s, labels) - gmm.posterior_mean(x_t, a, s, neg)
    expected = ((_bcast(1 / s, x_t) * delta) ** 2).flatten(1).mean(1)  # v error = x0 error / sigma on VP
    torch.testing.assert_close(loss, expected, rtol=1e-8, atol=1e-14)


def test_stage1_distils_any_guider_apg_on_gaussian_data(tiny_teacher_ckpt):
    """guider="apg" (r=None, eta=0, no momentum state in targets): D = D_c + (w - 1) Delta_perp (Sadat et al.
    2025), so a student that learned CFG instead is off by exactly (w - 1) Delta_par in x0."""
    m = _gd(tiny_teacher_ckpt, guider="apg", guider_params={"r": None, "eta": 0.0}, loss_space="x0", weighting="none")
    sched = m.student.schedule
    gmm = GaussianMixture.random(num_classes=3, per_class=2, shape=(1, 3, 3), seed=6)
    m.teacher = gmm_denoiser(gmm, sched, "v")
    m.student = Denoiser(ExactGuidedStudent(gmm, sched, "v"), sched, "v")  # the CFG optimum
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (16,), generator=g)
    x0, eps = gmm.sample(labels, g), torch.randn(16, 1, 3, 3, generator=g, dtype=torch.float64)
    t, w = (0.1 + 0.8 * torch.rand(16, generator=g)).double(), (1 + 5 * torch.rand(16, generator=g)).double()
    x_t = sched.add_noise(x0, eps, t)
    a, s = sched.alpha_sigma(t)
    d_c = gmm.posterior_mean(x_t, a, s, labels)
    delta = d_c - gmm.posterior_mean(x_t, a, s, torch.full_like(labels, -1))
    par = (delta * d_c).flatten(1).sum(1) / d_c.flatten(1).pow(2).sum(1)
    expected = ((_bcast((w - 1) * par, x_t) * d_c) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(m.distillation_loss(x0, labels, t, eps, w), expected, rtol=1e-8, atol=1e-14)
    assert expected.max() > 1e-4


def test_stage1_teacher_is_frozen_and_student_starts_equal(tiny_teacher_ckpt):
    m = _gd(tiny_teacher_ckpt).train()
    assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())
    assert m.student.training and all(p.requires_grad for p in m.student.parameters())
    x, t, labels = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 3, 9, -1])
    with torch.no_grad():
        m.eval()
        assert torch.equal(m.student(x, t, {"cond": labels, "w": torch.tensor([1.0, 2.0, 4.0, 6.0])}).x0,
                           m.teacher(x, t, labels).x0)


def test_stage1_lora_trains_only_adapters_and_the_w_embedding(tiny_teacher_ckpt):
    m = _gd(tiny_teacher_ckpt, lora_rank=2)
    names = [n for n, p in m.student.net.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("w_embedding.") for n in names)
    assert any("lora_" in n for n in names) and any(n.startswith("w_embedding.") for n in names)
    before = {n: p.detach().clone() for n, p in m.student.net.named_parameters()}
    opt = m.configure_optimizers()["optimizer"]
    m.train()
    x0, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):  # two steps: lora_A moves once lora_B is non-zero
        opt.zero_grad()
        m._loss(x0, labels).backward()
        opt.step()
    changed = {n for n, p in m.student.net.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(names)
    assert any("lora_B" in n for n in changed) and any("w_embedding.linear_2" in n for n in changed)


def test_stage1_refuses_bad_settings(tiny_teacher_ckpt):
    with pytest.raises(ValueError, match="second model"):
        _gd(tiny_teacher_ckpt, guider="autoguidance")
    with pytest.raises(ValueError, match="w_min"):
        _gd(tiny_teacher_ckpt, w_min=4.0, w_max=2.0)
    with pytest.raises(ValueError, match="log_uniform"):
        _gd(tiny_teacher_ckpt, w_min=0.0, w_distribution="log_uniform")
    with pytest.raises(ValueError, match="cosine"):
        _gd(tiny_teacher_ckpt, lr_decay="linear")


def test_stage1_cosine_lr_decays_to_zero_at_max_steps(tiny_teacher_ckpt, tmp_path):
    import lightning as L

    from data.digits import DigitsDataModule

    module = _gd(tiny_teacher_ckpt, lr=1e-3, warmup_steps=2, lr_decay="cosine", val_samples=0, ema_decay=0.0)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path), callbacks=[Record()])
    trainer.fit(module, DigitsDataModule(batch_size=8))
    # warm-up 1/2, 2/2, then half a cosine over the remaining 4 steps: 1, cos^2(pi/8) ... down to 0 at step 6
    want = [1e-3 * f for f in (0.5, 1.0, 1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4)))]
    np.testing.assert_allclose(lrs, want, rtol=1e-6)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ stage 2

def test_progressive_writes_one_checkpoint_per_round_and_samples_with_its_steps(progressive_root):
    ckpts = progressive_root / "checkpoints"
    for name, k, steps in [("round_0_2steps.ckpt", 0, 2), ("round_1_1steps.ckpt", 1, 1), ("last.ckpt", 1, 1)]:
        module = load_method(ckpts / name)
        assert isinstance(module, ProgressiveDistillation)
        assert int(module.round_index) == k and module.student_steps() == steps
        assert read_checkpoint(ckpts / name)["progressive"]["student_steps"] == steps
        images, nfe = module.generate(torch.arange(10), 2.0, seed=0)  # default: the round's step count
        assert nfe == steps and torch.isfinite(images).all()
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 6


def _weights(ckpt: Path, prefix: str) -> dict:
    sd = read_checkpoint(ckpt)["state_dict"]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def test_progressive_resume_mid_round_continues_the_same_round(progressive_root, tmp_path):
    ckpts = progressive_root / "checkpoints"
    mid = ckpts / "step=4.ckpt"  # round 1 (steps 3..5), one step into it
    assert read_checkpoint(mid)["progressive"]["round"] == 1
    # round 1's teacher is the EMA at the end of round 0
    end0, teacher1 = _weights(ckpts / "round_0_2steps.ckpt", "ema.module."), _weights(mid, "round_teacher.net.")
    assert all(torch.equal(end0[k], teacher1[k]) for k in teacher1)

    cfg = progressive_root / "pd.yaml"
    main(["fit", "--config", str(cfg), "--ckpt_path", str(mid), "--trainer.default_root_dir", str(tmp_path)])
    resumed = tmp_path / "checkpoints" / "step=5.ckpt"  # steps 5 and 6 ran; the run stopped after the last round
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert read_checkpoint(resumed)["progressive"]["round"] == 1
    after = _weights(resumed, "round_teacher.net.")
    assert all(torch.equal(after[k], teacher1[k]) for k in teacher1)  # not re-copied: the same round goes on
    student_mid, student_after = _weights(mid, "student.net."), _weights(resumed, "student.net.")
    assert any(not torch.equal(student_mid[k], student_after[k]) for k in student_mid)  # and it trained


class TwoStepOracle(nn.Module):
    """A student that answers, at its own grid time t, the x0 landing on two exact DDIM steps of `teacher`
    (computed here independently of the module's grid bookkeeping)."""

    def __init__(self, teacher: Denoiser, student_steps: int):
        super().__init__()
        self.teacher, self.m = teacher, student_steps

    def forward(self, x_t, net_time, cond):
        sched = self.teacher.schedule
        t = torch.as_tensor(net_time, dtype=x_t.dtype) / sched.time_scale
        coarse, fine = sched.sampling_times(self.m).to(x_t.dtype), sched.sampling_times(2 * self.m).to(x_t.dtype)
        idx = (coarse[None] - t[:, None]).abs().argmin(1)
        t_mid = fine[2 * idx + 1]
        t_next = torch.where(idx + 1 < self.m, coarse[(idx + 1).clamp(max=self.m - 1)], torch.full_like(t, -1.0))
        guided = WInputGuided(self.teacher)
        x_mid = ddim_step(guided(x_t, t, cond["cond"], cond["w"]), x_t, t_mid, sched)
        x_next = ddim_step(guided(x_mid, t_mid, cond["cond"], cond["w"]), x_mid, t_next, sched)
        a, s = sched.alpha_sigma(_bcast(t, x_t))
        last = _bcast(t_next, x_t) < 0
        a_n, s_n = sched.alpha_sigma(_bcast(t_next.clamp(min=0), x_t))
        a_n, s_n = torch.where(last, torch.ones_like(a_n), a_n), torch.where(last, torch.zeros_like(s_n), s_n)
        return from_x0(progressive_target(x_t, x_next, a, s, a_n, s_n), x_t, a, s, "v")


def test_progressive_loss_is_zero_for_the_two_step_oracle_on_gaussian_data(stage1_ckpt):
    m = instantiate({"class_path": PD, "init_args": {"student": str(stage1_ckpt), "start_steps": 8, "end_steps": 2}})
    sched = m.student.schedule
    gmm = GaussianMixture.random(num_classes=3, per_class=2, shape=(1, 3, 3), seed=7)
    m.round_teacher = Denoiser(ExactGuidedStudent(gmm, sched, "v"), sched, "v")  # a w-conditioned round teacher
    m.round_index.fill_(0)  # teacher 8 steps -> student 4
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (16,), generator=g)
    x0, eps = gmm.sample(labels, g), torch.randn(16, 1, 3, 3, generator=g, dtype=torch.float64)
    w = (1 + 4 * torch.rand(16, generator=g)).double()
    step = torch.arange(16) % 4  # every student step, the last one (to clean data) included
    m.student = Denoiser(TwoStepOracle(m.round_teacher, 4), sched, "v")
    assert m.progressive_loss(x0, labels, step, eps, w).max() < 1e-16
    m.student = Denoiser(TwoStepOracle(m.round_teacher, 2), sched, "v")  # wrong grid: the check can fail
    assert m.progressive_loss(x0, labels, step, eps, w).max() > 1e-4


# ------------------------------------------------------------------------------------------------ configs

def test_digits_configs_build_with_a_tiny_checkpoint(tiny_teacher_ckpt, stage1_ckpt):
    gd = read_yaml(ROOT / "configs/digits/guidance_distill.yaml")["model"]
    gd["init_args"]["teacher"] = str(tiny_teacher_ckpt)
    assert isinstance(instantiate(gd), GuidanceDistillation)
    pd = read_yaml(ROOT / "configs/digits/progressive.yaml")["model"]
    pd["init_args"]["student"] = str(stage1_ckpt)
    module = instantiate(pd)
    assert isinstance(module, ProgressiveDistillation)
    assert module.num_rounds == 5 and module.teacher_steps(0) == 32 and module.student_steps(4) == 1
    pd["init_args"]["start_steps"] = 48
    with pytest.raises(Exception, match="power of two"):
        instantiate(pd)


# ------------------------------------------------------------------------------------------------ data-free stage 1

def _on_rank(module, rank: int, world: int):
    """`module` as process `rank` of `world` for MethodModule.per_sample (what it reads of the trainer)."""
    from types import SimpleNamespace

    module._trainer = SimpleNamespace(world_size=world, global_rank=rank)
    return module


def _two_processes_equal_one(module, loss, n: int = 16) -> None:
    """loss(rank_rows, generator) on one process (rows 0..n-1) equals the mean of two processes' losses on rows r::2
    (the distributed sampler's shares), each seeded alike, as StepSeed seeds every rank: every draw is per_sample's."""
    rows = torch.arange(n)
    single = loss(_on_rank(module, 0, 1), rows, torch.Generator().manual_seed(3))
    parts = [loss(_on_rank(module, r, 2), rows[r::2], torch.Generator().manual_seed(3)) for r in range(2)]
    module._trainer = None
    torch.testing.assert_close((parts[0] + parts[1]) / 2, single, rtol=1e-5, atol=1e-7)
    assert not torch.equal(parts[0], parts[1])


def test_stage1_data_free_draws_make_two_processes_equal_one(tiny_teacher_ckpt):
    """x0 None: the grid step (one per global batch), the noise and w are drawn through per_sample, so two processes
    each with half the batch compute what one process computes on the whole; the same holds with images."""
    m = _gd(tiny_teacher_ckpt, trajectory_steps=4, ema_decay=0.0)
    labels = torch.arange(16) % 10
    x0 = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _two_processes_equal_one(m, lambda mod, rows, g: mod._loss(None, labels[rows], g, n=len(rows)))
        _two_processes_equal_one(m, lambda mod, rows, g: mod._loss(x0[rows], labels[rows], g))


def test_stage1_data_free_regresses_the_guided_teacher_on_its_own_trajectories(tiny_teacher_ckpt):
    """With a closed-form GMM teacher: x_t is the CFG teacher's DDIM trajectory stopped at grid step k
    (guidance.samplers.sample_until, at the sample's w or trajectory_scale); the exact guided student has zero data-free
    loss and a student with the wrong scale the analytic ((w' - w)(D_c - D_u))^2 error there."""
    from guidance.guided import GuidedDenoiser
    from guidance.guiders import build_guider
    from guidance.samplers import sample_until

    m = _gd(tiny_teacher_ckpt, loss_space="v", weighting="none", trajectory_steps=4)
    sched = m.student.schedule
    gmm = GaussianMixture.random(num_classes=3, per_class=2, shape=(1, 3, 3), seed=5)
    m.teacher = gmm_denoiser(gmm, sched, "v")
    m.sample_shape = lambda: (1, 3, 3)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (32,), generator=g)
    noise = torch.randn(32, 1, 3, 3, generator=g, dtype=torch.float64)
    w = 1 + 5 * torch.rand(32, generator=g, dtype=torch.float64)
    cfg = GuidedDenoiser(m.teacher, build_guider("cfg"))
    grid = sched.sampling_times(4)
    m.student = Denoiser(ExactGuidedStudent(gmm, sched, "eps", w_offset=1.0), sched, "eps")
    for k in range(4):
        x_t, t = m.teacher_trajectory(noise, labels, w, k)
        ref, t_ref = sample_until(cfg, noise, labels, w, 4, k)
        assert torch.equal(x_t, ref) and torch.equal(t, t_ref) and torch.equal(t, grid[k].expand(32))
        a, s = sched.alpha_sigma(t)
        delta = gmm.posterior_mean(x_t, a, s, labels) - gmm.posterior_mean(x_t, a, s, torch.full_like(labels, -1))
        expected = ((_bcast(1 / s, x_t) * delta) ** 2).flatten(1).mean(1)  # v error = x0 error / sigma on VP
        torch.testing.assert_close(m.regression_loss(x_t, labels, t, w), expected, rtol=1e-8, atol=1e-14)
    m.trajectory_scale = 2.0  # the trajectories at one scale, the targets still at each sample's w
    x2, _ = m.teacher_trajectory(noise, labels, w, 3)
    assert torch.equal(x2, sample_until(cfg, noise, labels, 2.0, 4, 3)[0]) and not torch.equal(x2, x_t)
    # the whole data-free path (draws in float32): the exact student is the optimum, the wrong one is not
    wrong = m._loss(None, labels, torch.Generator().manual_seed(1), n=32)
    m.student = Denoiser(ExactGuidedStudent(gmm, sched, "eps"), sched, "eps")
    assert m._loss(None, labels, torch.Generator().manual_seed(1), n=32) < 1e-6 * wrong


def test_stage1_data_free_settings_are_checked(tiny_teacher_ckpt):
    with pytest.raises(ValueError, match="trajectory_steps must be a positive integer"):
        _gd(tiny_teacher_ckpt, trajectory_steps=0)
    with pytest.raises(ValueError, match="trajectory_scale must be a finite"):
        _gd(tiny_teacher_ckpt, trajectory_scale=float("inf"))


# ------------------------------------------------------------------------------------------------ stage 2 details

def test_progressive_draws_make_two_processes_equal_one(stage1_ckpt):
    """Student steps, noise and w through per_sample: two processes with half the batch each equal one process."""
    m = instantiate({"class_path": PD, "init_args": {"student": str(stage1_ckpt), "start_steps": 8, "end_steps": 1}})
    labels = torch.arange(16) % 10
    x0 = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _two_processes_equal_one(m, lambda mod, rows, g: mod._loss(x0[rows], labels[rows], g))
    with pytest.raises(ValueError, match="prompt-only data module"):
        m._loss(None, labels)
