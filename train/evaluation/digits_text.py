"""The digits metrics for a text-to-image model of the captioned digits: digits prompted class by class ("a
handwritten seven"), decoded and judged by the digits classifier as class-conditional samples are; the erased
digits of an erasure module and its erasure columns."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten {word}", "the digit {word}", "the number {digit}")
EVAL_TEMPLATE = "a handwritten {word}"


def caption(template: str, label: int) -> str:
    """The prompt of digit `label` in `template` ({word}: its English name, {digit}: the numeral; "{}" = {word})."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit labels are 0..9, got {label}")
    return template.replace("{}", "{word}").format(word=DIGIT_WORDS[int(label)], digit=int(label))


def class_prompts(template: str, num_per_class: int) -> tuple[list[str], Tensor]:
    """(prompts, labels [10 n]): `num_per_class` copies of each digit's prompt, class by class."""
    if "{" not in template:
        raise ValueError(f"a class-prompt template needs {{word}} or {{digit}} (or {{}}) for the digit, got {template!r}")
    if num_per_class <= 0:
        raise ValueError(f"--num-per-class must be positive, got {num_per_class}")
    labels = torch.arange(10).repeat_interleave(num_per_class)
    return [caption(template, int(c)) for c in labels], labels


def to_digits(images: Tensor) -> Tensor:
    """Decoded RGB images [N, 3, 8, 8] in about [-1, 1] -> the digits classifier's input [N, 1, 8, 8] (channel mean,
    clamped to [-1, 1])."""
    if images.shape[-2:] != (8, 8):
        raise ValueError(f"the digits metrics judge 8x8 images, got {tuple(images.shape[-2:])}; they apply to the "
                         f"text digits pipeline only (python -m train digits-pipeline)")
    return images.float().mean(1, keepdim=True).clamp(-1, 1)


@torch.no_grad()
def generate_digits(module, template: str = EVAL_TEMPLATE, num_per_class: int = 100, scale: float | None = None,
                    steps: int | None = None, sampler: str | None = None, guider=None, seed: int = 0,
                    progress: bool = False, negative_prompt: str | None = None,
                    guider_params: dict | None = None) -> tuple[Tensor, Tensor, float]:
    """(digit images [10 n, 1, 8, 8], labels, network evaluations per sample) from a text method module trained
    on the text digits pipeline, prompted class by class with `template`."""
    prompts, labels = class_prompts(template, num_per_class)
    samples, nfe = module.generate(prompts, scale, steps, sampler, guider, seed, progress=progress,
                                   negative=negative_prompt, guider_params=guider_params)
    return to_digits(module.samples_to_images(samples)), labels, nfe


def erased_digits(module) -> list[int]:
    """The digit classes an erasure module removes (train.methods.erasure.ConceptErasure): its erased class ids on a
    class model, or its concepts named by a digit's word ("seven") on a text model; [] for other modules."""
    if not hasattr(module, "erased_requests"):
        return []
    ids = [r for r in module.erased_requests() if isinstance(r, int)]
    return ids or [DIGIT_WORDS.index(n) for n in module.concept_names() if n in DIGIT_WORDS]


def erasure_columns(row: dict, erased: Sequence[int]) -> dict:
    """`erased_rate` (how often an erased digit's samples are still classified as it) and `other_accuracy`
    (class accuracy on the other digits) from a metrics row's per-class accuracy."""
    per_class = row.get("per_class_accuracy") or []
    if not erased or not per_class:
        return {}
    kept = [a for c, a in enumerate(per_class) if c not in erased and a is not None]
    gone = [per_class[c] for c in erased if per_class[c] is not None]
    return {"erased_rate": sum(gone) / len(gone) if gone else None,
            "other_accuracy": sum(kept) / len(kept) if kept else None}
