"""OneStepDistillation's Score identity Distillation objective (SiD, arXiv 2404.04057; SiD-LSG, arXiv 2406.01561)."""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from guidance.guided import GuidedDenoiser
from guidance.guiders import CFG
from losses.sid import sid_generator_loss
from train.methods.onestep_config import ObjectiveArgs


def check_sid(objective: ObjectiveArgs, guider: str, pg_sb_range: Sequence[float] | None,
              p_uncond: float | None) -> None:
    """SiD (objective.kind sid) across argument groups: no PG-SB variant (forget is refused by
    onestep_config.check_combinations); SiD-LSG's fake-score scales are CFG scales of a fake score that keeps learning
    the null condition."""
    if pg_sb_range:
        raise ValueError("pg_sb_range draws the fake score's scale per sample, which SiD-LSG fixes (objective."
                         "lsg_fake_scale, lsg_train_scale); remove pg_sb_range with kind sid")
    if objective.sid_scales != (1.0, 1.0):
        if guider != "cfg":
            raise ValueError(f"objective.lsg_fake_scale / lsg_train_scale guide the fake score by CFG as SiD-LSG does; "
                             f"set guider: cfg (got {guider!r}) or leave both at 1")
        if p_uncond is not None and p_uncond <= 0:
            raise ValueError("objective.lsg_fake_scale / lsg_train_scale guide the fake score, which must keep learning "
                             "the null condition; set fake_score.p_uncond > 0 (SiD-LSG: 0.1) or null")


class SiDObjective:
    """Mixin of train.methods.onestep.OneStepDistillation (it provides objective, fake_score, generator, _guided,
    _uniform_t, noise_like and dmd_t_range).

    The networks and updates are DMD's (generator, frozen teacher, fake score; fake_score.updates fake-score updates
    then one generator update); SiD changes the generator's loss and, with SiD-LSG's kappa_1, the fake score's.
    SiD-LSG's four scales in this project's CFG convention D_u + w (D_c - D_u), which is the authors' (SiD-LSG
    training/sid_sd_util.py line 265: noise_pred_uncond + guidance_scale (noise_pred_text - noise_pred_uncond)):
        kappa_4 (cfg_eval_real, teacher f_phi in the generator loss):  guidance_scale (the module's, any guider);
        kappa_2 = kappa_3 (cfg_eval_fake, f_psi in the generator loss): objective.lsg_fake_scale;
        kappa_1 (cfg_train_fake, f_psi in its own denoising loss):      objective.lsg_train_scale.
    (SiD-LSG training/sid_training_loop.py lines 185-187, 418-421, 496-506.) The authors' released runs set all four
    equal (run_sid.sh lines 67-69: 2; their checkpoints at 1.5 and 4.5).
    """

    def _init_sid(self) -> None:
        """SiD-LSG's guided fake score for the generator loss (kappa_2 not 1), kept out of the module tree so no
        weight is registered twice."""
        if self.objective.kind == "sid" and self.objective.sid_scales[0] != 1.0:
            self._guided["sid_fake"] = GuidedDenoiser(self.fake_score, CFG())

    def _sid_loss(self, x: Tensor, labels: Any, w: Tensor) -> Tensor:
        """SiD's generator loss [B] for generator samples x [B, C, H, W] (with gradient), condition `labels` and
        teacher scales w [B].

        t ~ U[t_range] (objective.t_range; the authors' DDPM steps U{20..979} / 999 on Stable Diffusion, SiD-LSG
        sid_training_loop.py line 484, and U[0, tmax / 1000] on EDM's Karras grid, SiD sid_loss.py lines 27-33,
        which is this project's EDM time t: t_range [0, 0.8]); x_t = alpha_t x + sigma_t eps keeps x's gradient and
        both predictions are taken with gradient through x_t (the authors run neither under no_grad: SiD
        sid_training_loop.py lines 327-333; the networks' weights are frozen for this update by
        OneStepUpdates._updating, as the authors' requires_grad_(False), lines 178 and 311)."""
        b, dev, sched = x.shape[0], x.device, self.generator.schedule
        t = self._uniform_t(b, self.dmd_t_range, dev)
        x_t = sched.add_noise(x, self.noise_like(x), t)
        d_real = self._guided["teacher"](x_t, t, labels, w).x0
        d_fake = self._sid_fake_x0(x_t, t, labels)
        return sid_generator_loss(x, d_real, d_fake, self.objective.alpha)

    def _sid_fake_x0(self, x_t: Tensor, t: Tensor, labels: Any) -> Tensor:
        """f_psi at (x_t, t) [B, C, H, W], with gradient through x_t, guided at kappa_2 = lsg_fake_scale when it is
        not 1 (SiD-LSG sid_training_loop.py lines 496-499)."""
        if "sid_fake" not in self._guided:
            return self.fake_score(x_t, t, labels).x0
        return self._guided["sid_fake"](x_t, t, labels, self.objective.sid_scales[0]).x0

    @property
    def fake_train_scale(self) -> float:
        """The CFG scale of the fake score's output in its own denoising loss: SiD-LSG's kappa_1 = lsg_train_scale
        with kind sid (SiD-LSG sid_training_loop.py lines 418-443; losses.sid.guided_denoising_loss), else 1."""
        return self.objective.sid_scales[1] if self.objective.kind == "sid" else 1.0


def sid_p_uncond(objective: ObjectiveArgs) -> float:
    """The fake score's default label dropout under SiD: 0.1 when SiD-LSG guides it (the authors'
    use_context_dropout_train_fake, SiD-LSG sid_training_loop.py lines 208-211 and 393-397), else 0."""
    return 0.1 if objective.kind == "sid" and objective.sid_scales != (1.0, 1.0) else 0.0

