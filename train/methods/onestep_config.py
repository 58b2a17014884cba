"""OneStepDistillation's argument groups (objective, fake score, discriminator, generator, optimizer, forgetting) and
their checks, each refusal saying what to change (checks against the teacher, guider or data: with their objective)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

from losses.fdiv import DIVERGENCES

OBJECTIVES = ("dmd", "decoupled", "sid")
RATIO_NORMALIZATIONS = ("two_stage", "weight_bins")
RENOISE_SCHEDULES = ("hybrid", "constrained", "full")  # Decoupled DMD sec. 4.3: Decoupled-Hybrid / -Constrained / -Full
FORGET_TARGETS = ("safe", "esd")
FAKE_SCORE_MODES = ("lora", "copy")  # models.fake_score.FAKE_SCORE_MODES
FEATURE_SOURCES = ("fake", "teacher")


@dataclass(frozen=True)
class ObjectiveArgs:
    """The generator's distribution-matching term.

    Args:
        kind: "dmd" (DMD/DMD2 and f-distill), "decoupled" (Decoupled DMD, arXiv 2511.22677: CFG only) or "sid"
            (Score identity Distillation, arXiv 2404.04057, with SiD-LSG's guidance scales, arXiv 2406.01561;
            losses.sid).
        divergence: losses.fdiv name; anything but reverse_kl (= DMD) is f-distill and needs the discriminator's
            density ratio.
        ratio_normalization: f-distill's normalisation of the weights h(r) (default "two_stage"):
            "two_stage": Xu et al.'s (arXiv 2502.15681, and their code): r divided by its running mean in its time
            bin, then h divided by its batch mean (losses.fdiv.two_stage_weights);
            "weight_bins": h divided by its batch mean within each time bin, r as estimated (the earlier option).
        ratio_time_bins: f-distill's time bins of [0, 1] (default 10, the authors' bin_num); 0 with two_stage: no
            per-bin stage (h / its batch mean only, the earlier default).
        ratio_ema_rate: two_stage's EMA rate of the per-bin mean of r (default 0.0, the authors' default: the batch's
            per-bin mean; their ImageNet-64 config uses 0.5).
        t_range: [lo, hi]: re-noising times of the DMD term, uniform.
        ca_t_range: Decoupled DMD's CFG-augmentation times (default t_range).
        dm_t_range: Decoupled DMD's distribution-matching times (default t_range).
        ca_weight: Decoupled DMD's CFG-augmentation weight.
        dm_weight: Decoupled DMD's distribution-matching weight.
        renoise: Decoupled DMD's re-noising schedule (sec. 4.3 of the paper; default "hybrid"): "hybrid" (their
            Decoupled-Hybrid: CA times drawn only cleaner than the generator step's time t_j, within ca_t_range, DM
            times over dm_t_range), "constrained" (both cleaner than t_j) or "full" (both over their fixed ranges,
            the earlier behaviour). For a one-step generator started at t >= the ranges' hi all three agree.
        alpha: SiD's alpha in (f_phi - f_psi) . ((f_phi - x) - alpha (f_phi - f_psi)) (default 1.2, the authors'
            default; SiD-LSG uses 1 on Stable Diffusion).
        lsg_fake_scale: SiD-LSG's kappa_2 = kappa_3: the CFG scale of the fake score f_psi in the generator loss
            (default 1: the conditional fake score, plain SiD). The teacher's kappa_4 is the module's guidance_scale.
        lsg_train_scale: SiD-LSG's kappa_1: the CFG scale of the fake score's own output in its denoising loss
            (default 1). A scale other than 1 needs guider cfg and a fake score that keeps learning the null
            condition (fake_score.p_uncond, default then 0.1 as the authors').
    None fields take their default for the objective; f-distill's and Decoupled DMD's fields are refused elsewhere.
    """

    kind: str = "dmd"
    divergence: str = "reverse_kl"
    ratio_normalization: str | None = None
    ratio_time_bins: int | None = None
    ratio_ema_rate: float | None = None
    t_range: tuple[float, float] = (0.02, 0.98)
    ca_t_range: tuple[float, float] | None = None
    dm_t_range: tuple[float, float] | None = None
    ca_weight: float = 1.0
    dm_weight: float = 1.0
    renoise: str | None = None
    alpha: float = 1.2
    lsg_fake_scale: float | None = None
    lsg_train_scale: float | None = None

    def __post_init__(self):
        check_choice("objective.kind", self.kind, OBJECTIVES)
        check_choice("objective.divergence", self.divergence, tuple(DIVERGENCES))
        for name in ("t_range", "ca_t_range", "dm_t_range"):
            if getattr(self, name) is not None:
                check_range(f"objective.{name}", getattr(self, name))
        self._check_ratio_normalization()
        if self.renoise is not None:
            check_choice("objective.renoise", self.renoise, RENOISE_SCHEDULES)
        if self.kind == "decoupled" and self.divergence != "reverse_kl":
            raise ValueError(f"objective.kind 'decoupled' has no density-ratio weighting; set divergence: reverse_kl "
                             f"or kind: dmd (got divergence {self.divergence!r})")
        if self.kind == "sid" and self.divergence != "reverse_kl":
            raise ValueError(f"objective.kind 'sid' has no density-ratio weighting; set divergence: reverse_kl or "
                             f"kind: dmd (got divergence {self.divergence!r})")
        if self.kind != "sid" and (self.alpha != 1.2 or self.lsg_fake_scale is not None
                                   or self.lsg_train_scale is not None):
            raise ValueError("objective.alpha, lsg_fake_scale and lsg_train_scale are SiD's; set kind: sid or "
                             "remove them")
        if self.kind != "decoupled" and (self.ca_t_range is not None or self.dm_t_range is not None or self.renoise is not None
                                   or (self.ca_weight, self.dm_weight) != (1.0, 1.0)):
            raise ValueError("objective.ca_t_range, dm_t_range, ca_weight, dm_weight and renoise are Decoupled DMD's; "
                             "set kind: decoupled or remove them")

    def _check_ratio_normalization(self) -> None:
        if self.ratio_time_bins is not None and self.ratio_time_bins < 0:
            raise ValueError(f"objective.ratio_time_bins must be >= 0 (0: no per-time-bin stage), got "
                             f"{self.ratio_time_bins}")
        if self.divergence == "reverse_kl":  # DMD: h = 1, nothing to normalise (ratio_time_bins 0 is how it was recorded)
            if self.ratio_time_bins or self.ratio_normalization is not None or self.ratio_ema_rate is not None:
                raise ValueError("objective.ratio_normalization, ratio_time_bins and ratio_ema_rate normalise "
                                 "f-distill's weight h(r), which reverse_kl (DMD) does not have; set ratio_time_bins: 0 "
                                 "or another divergence")
            return
        scheme, bins, rate = self.ratio_scheme()
        check_choice("objective.ratio_normalization", scheme, RATIO_NORMALIZATIONS)
        if not 0 <= rate < 1:
            raise ValueError(f"objective.ratio_ema_rate must be in [0, 1) (0: each bin's mean over the batch), got {rate}")
        if scheme == "weight_bins" and bins == 0:
            raise ValueError("objective.ratio_normalization weight_bins divides h by its per-time-bin mean; give "
                             "ratio_time_bins >= 1, or use two_stage with ratio_time_bins: 0 for the batch mean alone")
        if self.ratio_ema_rate is not None and (scheme != "two_stage" or bins == 0):
            raise ValueError("objective.ratio_ema_rate is the rate of two_stage's per-bin running mean of r; set "
                             "ratio_normalization: two_stage with ratio_time_bins >= 1, or remove it")

    def ratio_scheme(self) -> tuple[str, int, float]:
        """f-distill's (ratio_normalization, ratio_time_bins, ratio_ema_rate) with their defaults filled in."""
        return (self.ratio_normalization or "two_stage", 10 if self.ratio_time_bins is None else int(self.ratio_time_bins),
                0.0 if self.ratio_ema_rate is None else float(self.ratio_ema_rate))

    @property
    def sid_scales(self) -> tuple[float, float]:
        """SiD-LSG's (kappa_2 = kappa_3, kappa_1): the fake score's CFG scales in the generator loss and in its own
        loss, 1.0 when unset."""
        return (1.0 if self.lsg_fake_scale is None else float(self.lsg_fake_scale),
                1.0 if self.lsg_train_scale is None else float(self.lsg_train_scale))

    def times(self, name: str) -> tuple[float, float]:
        """The [lo, hi] of `name` ("t", "ca_t" or "dm_t"), the CA / DM ranges defaulting to t_range."""
        return tuple(getattr(self, f"{name}_range") or self.t_range)

    @property
    def renoise_schedule(self) -> str:
        """Decoupled DMD's re-noising schedule with its default (hybrid)."""
        return self.renoise or "hybrid"


@dataclass(frozen=True)
class FakeScoreArgs:
    """The fake score (models.fake_score.FakeScore) and its updates.

    Args:
        mode: "lora" (adapters on the frozen teacher, which shares their base) or "copy" (a full trainable copy).
        rank: LoRA rank.
        alpha: LoRA alpha (scale alpha / rank; default the rank).
        targets: module-name suffixes the LoRA adapts (default: models.fake_score.DEFAULT_LORA_TARGETS).
        updates: fake-score updates per generator update (two time-scale rule; DMD2: 5 on SDXL, 10 on SD1.5).
        p_uncond: label dropout of the fake-score loss (default 0.1 with PG-SB, else 0).
        lr: AdamW learning rate (default generator.lr).
    """

    mode: str = "lora"
    rank: int = 16
    alpha: float | None = None
    targets: list[str] | None = None
    updates: int = 1
    p_uncond: float | None = None
    lr: float | None = None

    def __post_init__(self):
        check_choice("fake_score.mode", self.mode, FAKE_SCORE_MODES)
        if self.updates < 1:
            raise ValueError(f"fake_score.updates must be >= 1 (fake-score updates per generator update), got "
                             f"{self.updates}")
        if self.p_uncond is not None and not 0 <= self.p_uncond <= 1:
            raise ValueError(f"fake_score.p_uncond must be in [0, 1] (or null: 0.1 with PG-SB, else 0), got "
                             f"{self.p_uncond}")


@dataclass(frozen=True)
class DiscriminatorArgs:
    """The discriminator head (models.discriminator) on bottleneck features; built when gan_weight > 0 or the
    divergence is not reverse_kl (f-distill's density ratio).

    Args:
        gan_weight: weight of the generator's GAN term (DMD2: 3e-3 on SDXL); 0 = none.
        features: "fake" (DMD2: the discriminator loss also trains the fake score) or "teacher" (frozen features).
        layer: the tapped submodule (default: the network's, models.discriminator.default_feature_layer).
        hidden: hidden channels of the head.
        t_range: [lo, hi]: times at which real and fake samples are noised for it (default objective.t_range).
        lr: AdamW learning rate (default fake_score.lr).
    """

    gan_weight: float = 0.0
    features: str = "fake"
    layer: str | None = None
    hidden: int = 64
    t_range: tuple[float, float] | None = None
    lr: float | None = None

    def __post_init__(self):
        check_choice("discriminator.features", self.features, FEATURE_SOURCES)
        if self.gan_weight < 0:
            raise ValueError(f"discriminator.gan_weight must be >= 0 (0: no GAN term), got {self.gan_weight}")
        if self.hidden < 1:
            raise ValueError(f"discriminator.hidden must be >= 1, got {self.hidden}")
        if self.t_range is not None:
            check_range("discriminator.t_range", self.t_range)


@dataclass(frozen=True)
class GeneratorArgs:
    """The k-step generator.

    Args:
        steps: k, the generator's network evaluations per sample.
        times: the k descending times in (0, 1] (default the schedule's k-step grid from t_max; [t] for a one-step
            generator at another initial time).
        lr: AdamW learning rate.
        lora_rank: 0 (default): the generator is a full trainable copy of the teacher; > 0: a copy whose weights stay
            the teacher's, with peft LoRA adapters of this rank trained on `lora_targets` (DMD2's SDXL LoRA
            generator; `export --format lora` then writes diffusers' LoRA file for the original pipeline).
        lora_alpha: LoRA scale numerator (scale lora_alpha / lora_rank; default lora_rank).
        lora_targets: module-name suffixes to adapt (default train.methods.guidance_distillation.LORA_TARGETS).
    """

    steps: int = 1
    times: list[float] | None = None
    lr: float = 1e-4
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"generator.steps must be >= 1, got {self.steps}")
        if self.lora_rank < 0:
            raise ValueError(f"generator.lora_rank must be >= 0 (0: a full trainable copy), got {self.lora_rank}")
        if self.lora_rank == 0 and (self.lora_alpha is not None or self.lora_targets is not None):
            raise ValueError("generator.lora_alpha and lora_targets configure a LoRA generator; set "
                             "generator.lora_rank > 0 or remove them")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"generator.lora_alpha must be positive, got {self.lora_alpha}")
        if self.lora_targets is not None and (isinstance(self.lora_targets, str) or not self.lora_targets):
            raise ValueError(f"generator.lora_targets must be a non-empty list of module names, got "
                             f"{self.lora_targets!r}")
        if self.times is not None:
            if len(self.times) != self.steps:
                raise ValueError(f"generator.times has {len(self.times)} entries but generator.steps is {self.steps}; "
                                 f"give one time per generator step")
            if any(not 0 < t <= 1 for t in self.times) or list(self.times) != sorted(self.times, reverse=True):
                raise ValueError(f"generator.times must be descending times in (0, 1], got {list(self.times)}")


@dataclass(frozen=True)
class OptimizerArgs:
    """AdamW with warm-up (train.runtime.optim), the same for the generator, fake score and discriminator.

    Args:
        betas: AdamW betas.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps of each network's optimizer.
        grad_clip: max gradient norm per network (null: no clipping).
    """

    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 10.0

    def __post_init__(self):
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class ForgetArgs:
    """Score Forgetting Distillation (SFD, Chen et al. 2024, arXiv 2409.11219): for samples of `concepts` the DMD
    term's teacher target is replaced, so the generator comes out erased; their GAN term is off.

    Args:
        concepts: what the generator must not draw: classes (ids or names) of a class-conditional teacher, prompts
            of a text-to-image one; a batch's request is forgotten when it is one of them (the conditioner's key).
        target: "safe" (SFD's score override: the guided teacher's target for a safe request instead of the
            forgotten one, losses.erasure.forget_target) or "esd" (ESD's negative-guidance target, the teacher guided
            at w = -eta). Default: "esd" when eta is given without targets (how earlier runs recorded ESD), else
            "safe" (an eta recorded beside targets by earlier runs is dropped: it was unused there too).
        targets: the safe request of each concept (one per concept, like the authors' label_to_override: a class,
            or a prompt such as "a photo of a dog" for "a photo of a cat"); null with target safe (class labels
            only): a safe class drawn uniformly per sample among the classes not erased (the authors'
            pseudo_label_type "rand").
        eta: ESD's strength (target esd only; default 1.0).
    SFD is data-free: the generator needs only the requests (labels or prompts), e.g. data.digits.DigitsDataModule
    with images: false or data.prompts.PromptDataModule, and no discriminator on real images of the concept.
    """

    concepts: list[int | str] = field(default_factory=list)
    eta: float | None = None
    targets: list[int | str] | None = None
    target: str | None = None

    def __post_init__(self):
        if not self.concepts:
            raise ValueError("forget.concepts is empty; list the classes or prompts to erase, or set forget: null for "
                             "plain distillation")
        if self.eta is not None and self.eta < 0:
            raise ValueError(f"forget.eta must be >= 0 (the erased target is the teacher guided at w = -eta), "
                             f"got {self.eta}")
        target = self.target
        if target is None:  # resolved once, so the recorded config names it
            target = "esd" if self.eta is not None and self.targets is None else "safe"
            object.__setattr__(self, "target", target)
            if target == "safe":  # earlier configs recorded eta beside targets, which then left it unused
                object.__setattr__(self, "eta", None)
        check_choice("forget.target", target, FORGET_TARGETS)
        if target == "esd" and self.targets is not None:
            raise ValueError("forget.targets are the safe classes of target safe; remove them or set target: safe")
        if target == "safe" and self.eta is not None:
            raise ValueError("forget.eta is ESD's strength; remove it or set target: esd")
        if target == "esd" and self.eta is None:
            object.__setattr__(self, "eta", 1.0)


def as_group(cls: type, value: Any) -> Any:
    """`value` as the argument group `cls`: an instance (what jsonargparse passes), a dict of its fields, or None
    (its defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}; its fields are "
                             f"{', '.join(f.name for f in fields(cls))}")
        return cls(**value)
    raise TypeError(f"expected a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def check_combinations(objective: ObjectiveArgs, guider: str, forget: ForgetArgs | None) -> None:
    """Settings that contradict each other across groups (before any network is built)."""
    if objective.kind == "decoupled" and guider != "cfg":
        raise ValueError(f"objective.kind 'decoupled' splits the CFG rule into CA and DM terms; set guider: cfg "
                         f"(got {guider!r})")
    if forget is not None and (objective.kind != "dmd" or objective.divergence != "reverse_kl"):
        raise ValueError(f"forget replaces the teacher target of the DMD term; set objective.kind: dmd and "
                         f"objective.divergence: reverse_kl (got {objective.kind!r}, {objective.divergence!r}: their "
                         f"CFG split and density ratio come from the unerased teacher and real data)")


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_range(name: str, value, lo: float = 0.0, hi: float = 1.0) -> tuple[float, float]:
    """Validate a [lo, hi] pair (times in [0, 1] unless told otherwise)."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair [lo, hi], got {value!r}") from None
    if not lo <= a <= b <= hi:
        raise ValueError(f"{name} must satisfy {lo} <= lo <= hi <= {hi}, got [{a}, {b}]")
    return a, b


def check_pg_sb_range(value) -> tuple[float, float] | None:
    """PG-SB's [lo, hi] of guidance scales, or None."""
    return check_range("pg_sb_range", value, lo=-math.inf, hi=math.inf) if value else None
