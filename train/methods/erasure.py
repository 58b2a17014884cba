"""Concept erasure: fine-tune a copy of a trained model so that chosen classes no longer appear (ESD, ANT,
erase-toward), with preservation terms, parameter selection (ESD-x/-u, LoRA, SalUn) and erasure metrics."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from data.steps import ErasureSteps
from guidance.conditions import cond_cat
from guidance.guided import GuidedDenoiser
from guidance.guiders import CFG
from guidance.samplers import ddim_step
from losses.erasure import (ant_target, esd_target, preservation_target, regression_loss, toward_target,
                            windowed)
from models.adapters import NULL_LABEL
from models.param_select import SELECTIONS, SaliencyMask
from train.methods.base import MethodModule
from train.methods.erasure_base import ErasureMethod

SAMPLING = ("one", "all")


class TrajectoryBank:
    """DDIM trajectories of a guided model per condition, kept as the guided prediction (x0, eps) [N, S, C, H, W]
    at each of the S grid times. The state after a partial trajectory stopped at any t is one DDIM jump from the
    last grid state at or above t: x_t = alpha(t) x0_i + sigma(t) eps_i (Song et al. 2021, Eq. 12, eta = 0).
    This is ESD's x_t (Gandikota et al. 2023, sec. 4: sample the frozen model with the erased condition up to a
    random step), with t drawn from the schedule's training distribution, as ESD draws a DDPM step inside the
    chosen DDIM interval. Memory: 2 N S C H W floats per condition (0.7 MB per 100 digit trajectories).

    The trajectories of a condition are a function of (condition, `generation`) only (their start noise has its
    own seed), so a bank rebuilt after a restart, or first built during validation, is the same bank.
    """

    def __init__(self, guided: GuidedDenoiser, shape: tuple[int, ...], steps: int = 50, scale: float = 2.0,
                 size: int = 128):
        self.guided, self.shape, self.steps, self.scale, self.size = guided, tuple(shape), steps, scale, size
        self.banks: dict[int, tuple[Tensor, Tensor]] = {}  # label -> (x0, eps) [N, S, C, H, W]
        self.generation = 0  # bumped (and the banks dropped) by the owner to draw fresh trajectories
        self.times: Tensor | None = None  # the S grid times, descending

    @torch.no_grad()
    def build(self, label: int, device) -> None:
        """Sample `size` trajectories for class `label` (-1: unconditional) and store their predictions."""
        with torch.inference_mode(False):  # a bank first built during validation must serve training too
            self._build(label, device)

    def _build(self, label: int, device) -> None:
        sched = self.guided.schedule
        times = sched.sampling_times(self.steps, device=device).float()
        a0, s0 = sched.alpha_sigma(times[:1])
        noise = torch.Generator().manual_seed(hash((label, self.generation)) % 2**63)
        x = torch.randn(self.size, *self.shape, generator=noise).to(device) * (a0**2 + s0**2).sqrt()  # as samplers.sample
        cond = torch.full((self.size,), label, device=device, dtype=torch.long)
        x0s, epss = [], []
        for i in range(self.steps):
            t = times[i].expand(self.size)
            pred = self.guided(x, t, cond, self.scale)
            x0s.append(pred.x0.float())
            epss.append(pred.eps.float())
            t_next = times[i + 1].expand(self.size) if i + 1 < self.steps else torch.full_like(t, -1.0)
            x = ddim_step(pred, x, t_next, sched)
        self.banks[label] = (torch.stack(x0s, 1), torch.stack(epss, 1))
        self.times = times

    def draw(self, labels: Tensor, generator: torch.Generator | None = None,
             per_sample: Callable[[Callable[[int], Tensor], int], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(x_t [B, C, H, W], t [B]) for condition labels [B], building missing banks first.

        per_sample(draw, n): how the per-sample draws are made (MethodModule.per_sample); default draw(n)."""
        per_sample = per_sample or (lambda fn, n: fn(n))
        device = labels.device
        for c in labels.unique().tolist():
            if c not in self.banks:
                self.build(int(c), device)
        sched = self.guided.schedule
        n = len(labels)
        t = per_sample(lambda m: sched.sample_t(m, generator=generator), n).float().to(device)  # CPU draws: same on every device
        t = t.clamp(max=float(self.times[0]))
        step = ((self.times[None, :] >= t[:, None]).sum(1) - 1).clamp(min=0)
        traj = per_sample(lambda m: torch.randint(0, self.size, (m,), generator=generator), n).to(device)
        x0 = torch.empty(len(labels), *self.shape, device=device)
        eps = torch.empty_like(x0)
        for c in labels.unique().tolist():
            m = labels == c
            bx0, beps = self.banks[int(c)]
            x0[m], eps[m] = bx0[traj[m], step[m]], beps[traj[m], step[m]]
        a, s = (v.reshape(-1, *([1] * len(self.shape))) for v in sched.alpha_sigma(t))
        return a * x0 + s * eps, t  # DDIM jump to t (Song et al. 2021, Eq. 12, eta = 0)


class ConceptErasure(ErasureMethod):
    """Concept erasure on a trained class-conditional model: the student (a copy of the frozen model) regresses
    erasure targets built by the guidance core on the frozen model, plus preservation terms.

    model:            path of the teacher checkpoint to erase (runs/.../checkpoints/last.ckpt).
    concepts:         classes to erase.
    targets:          erase toward these classes (one per concept; All but One, arXiv 2312.12807) instead of
                      ESD's negative guidance (Gandikota et al. 2023, arXiv 2303.07345).
    eta:              ESD negative-guidance strength: the target is the frozen model guided at w = -eta.
    t_window:         ANT window (arXiv 2504.12782): erase only at t <= t_window, keep the frozen conditional
                      prediction above (early, high-noise steps). None: erase at every t.
    toward_scale:     guidance scale of the toward target (1: the plain frozen prediction for the target class).
    toward_away:      use the erased class as the negative condition of the toward target.
    anchors:          classes whose predictions stay the frozen ones (SPM anchoring, arXiv 2312.16145);
                      None: every class not erased; []: none.
    anchor_weight:    weight of the anchor term; uncond_weight: of the unconditional term (All but One).
    concept_sampling: "one" (one erased concept per step) or "all" (each sample draws its concept).
    params:           trainable parameters: esd-x (class embedding / cross-attention), esd-u (the rest), all,
                      lora (adapters on every linear/conv layer, rank `lora_rank`, scale lora_alpha / rank).
    saliency_top_k:   SalUn (arXiv 2310.12508): update only this fraction of the selected weights, the largest
                      |grad| of the erasure loss over `saliency_batches` batches at the start. None: off.
    batch_size:       samples per term per step (x_t from the frozen model's trajectories).
    trajectory_steps, trajectory_scale, bank_size, bank_refresh: DDIM steps and guidance scale of the frozen
                      trajectories x_t comes from, trajectories kept per class, rebuild period in steps (0: never).
    loss_space:       space of the regression (eps as ESD, x0, v, flow); None: the network's parameterisation.
    lr, weight_decay, warmup_steps: AdamW; ema_decay: EMA of the student used for sampling (0: off).
    val_scale, val_steps, val_samples: CFG scale, steps and samples per erased class of `val/erased_rate`.
    model_config:     the teacher's config, filled in automatically, so the erased checkpoint rebuilds even
                      when `model` has moved (its weights are in the checkpoint).
    nonfinite, max_skips: what a NaN/inf loss term or gradient does: "skip" the update or "stop" (train.runtime.nonfinite).
    """

    method_name = "erasure"

    def __init__(self, model: str, concepts: list[int], targets: list[int] | None = None, eta: float = 1.0,
                 t_window: float | None = None, toward_scale: float = 1.0, toward_away: bool = False,
                 anchors: list[int] | None = None, anchor_weight: float = 1.0, uncond_weight: float = 1.0,
                 concept_sampling: str = "one", params: str = "esd-x", lora_rank: int = 1,
                 lora_alpha: float | None = None, saliency_top_k: float | None = None, saliency_batches: int = 4,
                 batch_size: int = 32, trajectory_steps: int = 50, trajectory_scale: float = 2.0,
                 bank_size: int = 128, bank_refresh: int = 0, loss_space: str | None = None, lr: float = 1e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 0, ema_decay: float = 0.0,
                 val_scale: float = 2.0, val_steps: int = 20, val_samples: int = 50,
                 model_config: dict | None = None, nonfinite: str = "skip", max_skips: int = 10):
        super().__init__(nonfinite, max_skips)
        self.save_hyperparameters()
        _check_options(eta, t_window, concept_sampling, params, saliency_top_k, weight_decay, batch_size, loss_space)
        frozen = self._load_frozen(model, model_config)
        self.num_classes = num_classes = frozen.net.num_classes
        self.concepts, self.targets = _check_classes(concepts, targets, num_classes)
        self.anchors = _check_anchors(anchors, self.concepts, num_classes)
        self._make_student(frozen, params, lora_rank, lora_alpha, ema_decay)
        self.num_trainable = sum(p.numel() for p in self.trainable)
        self.saliency = SaliencyMask(self.trainable) if saliency_top_k is not None else None
        self.eta, self.t_window, self.toward_scale, self.toward_away = eta, t_window, toward_scale, toward_away
        self.anchor_weight, self.uncond_weight, self.concept_sampling = anchor_weight, uncond_weight, concept_sampling
        self.saliency_top_k, self.saliency_batches, self.batch_size = saliency_top_k, saliency_batches, batch_size
        self.bank_refresh, self.space = bank_refresh, loss_space or frozen.parameterization
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.val_scale, self.val_steps, self.val_samples = val_scale, val_steps, val_samples
        self._bank_args = (trajectory_steps, trajectory_scale, bank_size)
        self.bank: TrajectoryBank | None = None

    # --- x_t and targets -------------------------------------------------------------------------
    def _bank(self) -> TrajectoryBank:
        """The trajectory bank, rebuilt every `bank_refresh` steps: generation global_step // bank_refresh."""
        if self.bank is None:
            shape = self.sample_shape()
            self.bank = TrajectoryBank(GuidedDenoiser(self.frozen, CFG()), shape, *self._bank_args)
        generation = self.global_step // self.bank_refresh if self.bank_refresh > 0 else 0
        if generation != self.bank.generation:
            self.bank.banks.clear()
            self.bank.generation = generation
        return self.bank

    def _concept_labels(self, n: int, generator=None) -> Tensor:
        """Erased concepts [n]: one concept for the whole step ("one") or one per sample ("all")."""
        k = len(self.concepts)
        if self.concept_sampling == "one":  # the same on every process
            idx = torch.randint(0, k, (1,), generator=generator).expand(n)
        else:
            idx = self.per_sample(lambda m: torch.randint(0, k, (m,), generator=generator), n)
        return torch.tensor(self.concepts)[idx].to(self.device)

    def _groups(self, batch, generator=None) -> list[tuple[str, Tensor, Tensor, Tensor]]:
        """(term, x_t, t, cond) per loss term: from the frozen model's trajectories, or from real images when the
        batch is (images [B, C, H, W], labels [B])."""
        n = self.batch_size
        if isinstance(batch, (list, tuple)):
            x0, labels = batch
            t = self.per_sample(lambda m: self.student.schedule.sample_t(m, generator=generator, device=x0.device),
                                len(labels)).to(x0.dtype)
            eps = self.per_sample(lambda m: torch.randn(m, *x0.shape[1:], generator=generator), len(labels)).to(x0)
            x_all = self.student.schedule.add_noise(x0, eps, t)
            one = self.concept_sampling == "one"
            concepts = self._concept_labels(1, generator) if one else torch.tensor(self.concepts)
            sel = {"erase": torch.isin(labels, concepts.to(labels.device)),
                   "anchor": torch.isin(labels, torch.tensor(self.anchors, dtype=labels.dtype, device=labels.device)),
                   "uncond": torch.ones_like(labels, dtype=torch.bool)}
            conds = {"erase": labels, "anchor": labels, "uncond": torch.full_like(labels, NULL_LABEL)}
            return [(k, x_all[m], t[m], conds[k][m]) for k, m in sel.items() if self._weight(k) > 0 and m.any()]
        pick = self.per_sample(lambda m: torch.randint(0, max(1, len(self.anchors)), (m,), generator=generator), n)
        anchors = torch.tensor(self.anchors or [NULL_LABEL])[pick]
        wanted = {"erase": self._concept_labels(n, generator), "anchor": anchors.to(self.device),
                  "uncond": torch.full((n,), NULL_LABEL, device=self.device)}
        use = [k for k in wanted if self._weight(k) > 0 and (k != "anchor" or self.anchors)]
        return [(k, *self._bank().draw(wanted[k], generator, self.per_sample), wanted[k]) for k in use]

    def _target(self, term: str, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if term != "erase":  # preservation: the frozen prediction for the same condition
            return preservation_target(self.frozen, x_t, t, cond, self.space)
        if self.targets is None:
            if self.t_window is None:
                return esd_target(self.frozen, x_t, t, cond, self.eta, self.space)
            return ant_target(self.frozen, x_t, t, cond, self.eta, self.t_window, self.space)
        lut = torch.full((self.num_classes,), NULL_LABEL, device=cond.device)
        lut[torch.tensor(self.concepts, device=cond.device)] = torch.tensor(self.targets, device=cond.device)
        target = toward_target(self.frozen, x_t, t, lut[cond], self.toward_scale, self.space,
                               source_cond=cond if self.toward_away else None)
        outside = preservation_target(self.frozen, x_t, t, cond, self.space) if self.t_window is not None else target
        return windowed(target, outside, t, self.t_window)

    def losses(self, batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Mean loss per term ('erase', 'anchor', 'uncond') for one batch; one student forward for all terms."""
        groups = self._groups(batch, generator)
        if not groups:
            return {}
        x_t, t = torch.cat([g[1] for g in groups]), torch.cat([g[2] for g in groups])
        pred = self.student(x_t, t, cond_cat([g[3] for g in groups])).read(self.space)
        out, i = {}, 0
        for term, xg, tg, cg in groups:
            target = self._target(term, xg, tg, cg)
            out[term] = regression_loss(pred[i:i + len(xg)], target).mean()
            i += len(xg)
        return out

    # --- training --------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self.saliency is not None and not bool(self.saliency.fitted):
            self._fit_saliency()
        if self.saliency is not None:
            self.saliency.attach()

    def _fit_saliency(self) -> None:
        """SalUn's saliency: |gradient of the erasure loss| summed over `saliency_batches` batches; keep the top-k%."""
        grads = [torch.zeros_like(p) for p in self.trainable]
        data = getattr(self._trainer, "datamodule", None)
        batches = iter(data.train_dataloader()) if data is not None and not isinstance(data, ErasureSteps) else None
        for _ in range(self.saliency_batches):
            batch = next(batches) if batches is not None else torch.zeros(1)
            if isinstance(batch, (list, tuple)):
                batch = [b.to(self.device) for b in batch]
            loss = self.losses(batch).get("erase")
            if loss is None:
                continue
            for g, gp in zip(grads, torch.autograd.grad(loss, self.trainable, allow_unused=True)):
                if gp is not None:
                    g.add_(gp)
        self.saliency.fit(grads, self.saliency_top_k)

    # --- validation ------------------------------------------------------------------------------
    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.val_samples <= 0:
            return
        labels = torch.tensor(self.concepts).repeat_interleave(self.val_samples)
        images, _ = self.generate(labels, self.val_scale, self.val_steps)
        from train.evaluation.classifier import load_digits_classifier
        from train.evaluation.evaluate import classify

        pred = classify(load_digits_classifier(), images)[1].argmax(1)
        self.log("val/erased_rate", (pred == labels).float().mean().item())


# --- helpers ---------------------------------------------------------------------------------------

def _check_classes(concepts, targets, num_classes: int) -> tuple[list[int], list[int] | None]:
    concepts = [int(c) for c in concepts]
    if not concepts or len(set(concepts)) != len(concepts) or not all(0 <= c < num_classes for c in concepts):
        raise ValueError(f"concepts must be distinct classes in 0..{num_classes - 1}, got {concepts}")
    if targets is None:
        return concepts, None
    targets = [int(c) for c in targets]
    if len(targets) != len(concepts) or not all(0 <= c < num_classes for c in targets):
        raise ValueError(f"targets must give one class in 0..{num_classes - 1} per concept ({concepts}), got {targets}")
    if set(targets) & set(concepts):
        raise ValueError(f"targets {targets} must not include an erased concept {concepts}")
    return concepts, targets


def _check_anchors(anchors, concepts: list[int], num_classes: int) -> list[int]:
    if anchors is None:
        return [c for c in range(num_classes) if c not in concepts]
    anchors = [int(a) for a in anchors]
    if set(anchors) & set(concepts) or not all(0 <= a < num_classes for a in anchors):
        raise ValueError(f"anchors must be classes in 0..{num_classes - 1} that are not erased ({concepts}), "
                         f"got {anchors}")
    return anchors


def _check_options(eta, t_window, sampling, params, top_k, weight_decay, batch_size, space) -> None:
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (the target is guided at w = -eta), got {eta}")
    if t_window is not None and not 0 < t_window <= 1:
        raise ValueError(f"t_window must be in (0, 1] (erase at t <= t_window) or null, got {t_window}")
    if sampling not in SAMPLING:
        raise ValueError(f"concept_sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
    if params not in SELECTIONS:
        raise ValueError(f"params must be one of {', '.join(SELECTIONS)}, got {params!r}")
    if top_k is not None and not 0 < top_k <= 1:
        raise ValueError(f"saliency_top_k is a fraction in (0, 1] (or null to disable), got {top_k}")
    if top_k is not None and weight_decay != 0:
        raise ValueError("saliency_top_k needs weight_decay: 0 (AdamW would decay the masked weights)")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if space not in (None, "eps", "x0", "v", "flow"):
        raise ValueError(f"loss_space must be eps, x0, v, flow or null (the network's parameterisation), got {space!r}")


@torch.no_grad()
def erasure_metrics(module: MethodModule, erased: list[int], scale: float = 2.0, probe_scales=(1.0, 3.0, 5.0),
                    steps: int = 50, num_per_class: int = 100, uncond_samples: int = 500,
                    seed: int = 0) -> dict[str, Any]:
    """The erasure table's row for one model, on the digits classifier (DDIM with `steps`, CFG):

    erased_rate:     at `scale`, the fraction of samples requested as an erased class that the classifier assigns
                     to that class (num_per_class per class, every class sampled)
    other_acc:       at `scale`, class accuracy on the other classes' samples
    other_fd:        at `scale`, Frechet distance of the other classes' samples to the real validation digits of
                     the same classes (classifier features)
    uncond_rate:     robustness probe: fraction of `uncond_samples` unconditional samples classified as erased
    erased_rate_at:  robustness probe: {w: erased_rate} at the other guidance scales (erased classes only)
    """
    from data.digits import digits_tensors
    from train.evaluation.classifier import load_digits_classifier
    from train.evaluation.evaluate import classify
    from train.evaluation.metrics import frechet_distance

    clf = load_digits_classifier()
    erased_t = torch.tensor(erased)
    rate = lambda images, labels: (classify(clf, images)[1].argmax(1) == labels).double().mean().item()  # noqa: E731
    real, real_labels = digits_tensors("validation")
    ref = classify(clf, real[~torch.isin(real_labels, erased_t)])[0]
    labels = torch.arange(module.sampling_denoiser().net.num_classes).repeat_interleave(num_per_class)
    images, _ = module.generate(labels, scale, steps, seed=seed)
    feats, logits = classify(clf, images)
    pred, is_erased = logits.argmax(1), torch.isin(labels, erased_t)
    out = {"w": scale, "erased_rate": (pred[is_erased] == labels[is_erased]).double().mean().item(),
           "other_acc": (pred[~is_erased] == labels[~is_erased]).double().mean().item(),
           "other_fd": frechet_distance(feats[~is_erased], ref)}
    u, _ = module.generate(torch.full((uncond_samples,), NULL_LABEL), 1.0, steps, seed=seed + 1)
    out["uncond_rate"] = torch.isin(classify(clf, u)[1].argmax(1), erased_t).double().mean().item()
    probe = erased_t.repeat_interleave(num_per_class)
    out["erased_rate_at"] = {w: rate(module.generate(probe, w, steps, seed=seed + 2)[0], probe) for w in probe_scales}
    return out
