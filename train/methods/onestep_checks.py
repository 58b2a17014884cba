"""Validation of OneStepDistillation's settings (train.methods.onestep), each refusal saying what to change."""
from __future__ import annotations

OBJECTIVES = ("dmd", "decoupled")


def check_options(objective, guider, fake_updates, generator_steps, generator_times, features) -> None:
    """The objective, guider, update counts, generator times and discriminator feature source."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "decoupled" and guider != "cfg":
        raise ValueError(f"objective 'decoupled' splits the CFG rule into CA and DM terms; set guider: cfg (got {guider!r})")
    if fake_updates < 1:
        raise ValueError(f"fake_updates must be >= 1 (fake-score updates per generator update), got {fake_updates}")
    if generator_steps < 1:
        raise ValueError(f"generator_steps must be >= 1, got {generator_steps}")
    if generator_times is not None:
        if len(generator_times) != generator_steps:
            raise ValueError(f"generator_times has {len(generator_times)} entries but generator_steps is "
                             f"{generator_steps}; give one time per generator step")
        if any(not 0 < t <= 1 for t in generator_times) or list(generator_times) != sorted(generator_times, reverse=True):
            raise ValueError(f"generator_times must be descending times in (0, 1], got {list(generator_times)}")
    if features not in ("fake", "teacher"):
        raise ValueError(f"discriminator_features must be 'fake' or 'teacher', got {features!r}")


def check_erase(concepts, eta, targets, objective, divergence, guider, teacher) -> tuple[list | None, list | None]:
    """Validated (erase_concepts, erase_targets) of Score Forgetting Distillation; (None, None) when off."""
    if concepts is None:
        if targets is not None:
            raise ValueError("erase_targets needs erase_concepts (the classes to draw as the targets instead)")
        return None, None
    num_classes = getattr(teacher.net, "num_classes", None)
    if num_classes is None:
        raise ValueError("erase_concepts erases classes of a class-conditional teacher; this teacher takes no labels")
    concepts = [int(c) for c in concepts]
    if not concepts or len(set(concepts)) != len(concepts) or not all(0 <= c < num_classes for c in concepts):
        raise ValueError(f"erase_concepts must be distinct classes in 0..{num_classes - 1}, got {concepts}")
    if eta < 0:
        raise ValueError(f"erase_eta must be >= 0 (the erased target is the teacher guided at w = -erase_eta), got {eta}")
    if objective != "dmd" or divergence != "reverse_kl":
        raise ValueError(f"erase_concepts replaces the teacher target of the DMD term; set objective: dmd and "
                         f"divergence: reverse_kl (got {objective!r}, {divergence!r}: their CFG split and density "
                         f"ratio come from the unerased teacher and real data)")
    if targets is not None:
        targets = [int(c) for c in targets]
        if len(targets) != len(concepts) or not all(0 <= c < num_classes for c in targets) or set(targets) & set(concepts):
            raise ValueError(f"erase_targets must give one class in 0..{num_classes - 1} per erased concept "
                             f"{concepts}, none of them erased; got {targets}")
        if any(b.model == "weak" for b in guider.branches(None)):
            raise ValueError("erase_targets guides the frozen teacher toward the target classes with the module's "
                             "guider, which cannot need a weak model; use a guider such as 'cfg'")
    return concepts, targets


def check_range(name: str, value, lo: float = 0.0, hi: float = 1.0) -> tuple[float, float]:
    """Validate a [lo, hi] pair (times in [0, 1] unless told otherwise)."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair [lo, hi], got {value!r}") from None
    if not lo <= a <= b <= hi:
        raise ValueError(f"{name} must satisfy {lo} <= lo <= hi <= {hi}, got [{a}, {b}]")
    return a, b


def check_real_data(datamodule) -> None:
    """The discriminator (GAN term, f-divergences other than reverse KL) needs real samples for its real branch; a
    prompt-only data module (`has_images = False`, e.g. data.prompts.PromptDataModule) has none."""
    if getattr(datamodule, "has_images", True) is False:
        raise ValueError(f"the GAN term and f-divergences other than reverse_kl train a discriminator on real images "
                         f"or latents, but {type(datamodule).__name__} gives prompts only; use captioned images "
                         f"(data.captions.CaptionedImageDataModule), or set gan_weight: 0 and divergence: reverse_kl")
