"""OneStepDistillation's Score Forgetting Distillation (SFD, Chen et al. 2024, arXiv 2409.11219): which requests are
forgotten, their teacher target and their GAN weight, and the check of `forget` against the teacher's conditioner."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from guidance.conditions import cond_device
from losses.erasure import forget_target
from train.methods.onestep_config import ForgetArgs


class ScoreForgetting:
    """Mixin of train.methods.onestep.OneStepDistillation (it provides forget, _guided and MethodModule's conditioner,
    encode and uniform); with forget null none of this runs."""

    def sfd_target(self, x_t: Tensor, t: Tensor, labels: Any, w: Tensor, requests: Any = None) -> Tensor:
        """SFD's D_real of the DMD term, x0 [B, C, H, W], at (x_t [B, C, H, W], t [B]) for the condition `labels` [B]
        of `requests` (default: `labels`, class ids) and scales w [B]: the guided teacher's prediction, except that
        forgotten requests get the guided teacher's target for their safe request (forget.target safe) or ESD's
        target (esd) of the same frozen teacher (losses.erasure.forget_target, SFD sec. 3)."""
        f = self.forget
        concept = self.forgotten_concepts(labels if requests is None else requests)
        erased = torch.tensor([c is not None for c in concept], device=x_t.device)
        safe = None
        if f.target == "safe":
            if f.targets is None:
                safe_requests = self.random_safe_classes(len(concept), x_t.device)[erased]  # drawn every step
            else:
                safe_requests = [f.targets[c] for c in concept if c is not None]
            safe = self.encode(safe_requests, x_t.device) if bool(erased.any()) else None
        return forget_target(self._guided["teacher"], x_t, t, labels, w, erased, 1.0 if f.eta is None else f.eta,
                             safe, space="x0")

    def forgotten_concepts(self, requests: Any) -> list[int | None]:
        """For each request (class ids, names or prompts) the index of the forget.concepts entry it is, or None,
        matched by the conditioner's key (models.conditioning)."""
        conditioner = self.conditioner
        index = {conditioner.key(c): i for i, c in enumerate(self.forget.concepts)}
        return [index.get(conditioner.key(r)) for r in conditioner.parse_all(requests)]

    def random_safe_classes(self, b: int, device) -> Tensor:
        """A safe class [b] per sample, uniform over the classes not erased (SFD's pseudo_label_type "rand", the
        authors' default when no override label is set); drawn for every sample through `per_sample`."""
        erased = set(self.forget.concepts)
        safe = torch.tensor([c for c in self.conditioner.enumerate() if c not in erased], device=device)
        return safe[(self.uniform(b, device) * len(safe)).long().clamp(max=len(safe) - 1)]

    def gan_keep(self, labels: Any, requests: Any = None) -> Tensor | float:
        """Per-sample weight [B] of the generator's GAN term: 0 for forgotten requests (default: `labels`, class
        ids; the discriminator's real branch holds real images of the concept, which would pull the generator back
        to it), else 1."""
        if self.forget is None:
            return 1.0
        concept = self.forgotten_concepts(labels if requests is None else requests)
        return torch.tensor([float(c is None) for c in concept], device=cond_device(labels))


def check_forget(forget: ForgetArgs, guider, conditioner) -> ForgetArgs:
    """`forget` with its concepts and safe targets parsed by the teacher's conditioner (models.conditioning: class ids
    for class names, prompts as given) and checked: distinct concepts, not the null request, a safe request per
    concept that is not itself erased, a safe class left to draw from; the safe-request target against the module's
    guider (guidance.guiders.Guider)."""
    known = conditioner.enumerate()
    what, one = ("prompts", "prompt") if known is None else (f"classes in 0..{len(known) - 1}",
                                                             f"class in 0..{len(known) - 1}")
    null_key = conditioner.key(conditioner.null_request)

    def parse(requests: list, field_name: str, rule: str) -> list:
        try:
            return [conditioner.parse(r) for r in requests]
        except ValueError as e:
            raise ValueError(f"forget.{field_name} must {rule}, got {list(requests)} ({e})") from None

    concepts = parse(forget.concepts, "concepts", f"be distinct {what}")
    keys = [conditioner.key(c) for c in concepts]
    if len(set(keys)) != len(keys) or null_key in keys:
        raise ValueError(f"forget.concepts must be distinct {what} (not the null request "
                         f"{conditioner.null_request!r}), got {concepts}")
    if known is not None and len(concepts) == len(known):
        raise ValueError(f"forget.concepts erases all {len(known)} classes, leaving no safe class; keep at least one")
    targets = forget.targets
    rule = f"give one {one} per erased concept {concepts}, none of them erased (nor the null request)"
    if targets is not None:
        targets = parse(targets, "targets", rule)
        if len(targets) != len(concepts) or any(conditioner.key(r) in keys + [null_key] for r in targets):
            raise ValueError(f"forget.targets must {rule}; got {targets}")
    elif forget.target == "safe" and known is None:
        raise ValueError(f"forget.targets: give one safe prompt per concept {concepts} (SFD's override, e.g. "
                         f"targets: [\"a photo of a dog\"]): a prompt model has no list of requests to draw a safe "
                         f"one from; or set target: esd")
    if forget.target == "safe" and any(b.model == "weak" for b in guider.branches(None)):
        raise ValueError("forget target safe guides the frozen teacher toward the safe requests with the module's "
                         "guider, which cannot need a weak model; use a guider such as 'cfg'")
    return ForgetArgs(concepts, None if forget.eta is None else float(forget.eta), targets, forget.target)
