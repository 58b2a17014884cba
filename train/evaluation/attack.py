"""`evaluate --attack`: the erased-class rate of a RequestSet's prompts attacked by UnlearnDiffAtk (arXiv 2310.11868,
train.evaluation.unlearndiffatk) or Ring-A-Bell (arXiv 2310.10012, train.evaluation.ring_a_bell), before and after,
judged by the evaluation classifier, and the check, before anything is sampled, of what an attack can run on.

Imports point one way: prompt_attack (the objectives and the genetic search, tensors only), attack_config
(AttackSettings) and attack_embeddings (the text-encoder side both attacks share) below each method's procedure, and
all of them below this driver. The names the CLI and the tests import from here stay importable here.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from train.evaluation.attack_config import AttackSettings
from train.evaluation.attack_embeddings import attacked_encode, clip_text_encoder
from train.evaluation.attack_embeddings import discrete_prompt, token_states  # noqa: F401 (re-export)
from train.evaluation.ring_a_bell import ring_a_bell_attacks, ring_a_bell_vector
from train.evaluation.unlearndiffatk import unlearndiffatk


def attacked_prompts(module, rs, concepts: Sequence = ()) -> tuple[list[str], list[int]]:
    """(prompts to attack, their digit classes) of a RequestSet: for the text digits' class prompts, the prompts of the
    concept digits (ids or words; default the module's erased digits, train.evaluation.digits_text.erased_digits); for
    a prompt set, every prompt (classes [])."""
    from train.evaluation.digits_text import DIGIT_WORDS, erased_digits

    if rs.prompts is None:
        raise ValueError("--attack optimises prompts: give --class-prompts TEMPLATE (the text digits) or --prompt TEXT")
    if rs.labels is None:
        if concepts:
            raise ValueError("--attack-concept names the digits attacked among --class-prompts; with --prompt every "
                             "prompt is attacked, so leave --attack-concept out")
        return list(dict.fromkeys(rs.prompts)), []
    classes = []
    for c in concepts or erased_digits(module):
        c = str(c).strip().lower()
        if c not in DIGIT_WORDS and not (c.isdigit() and int(c) < 10):
            raise ValueError(f"--attack-concept {c!r} is not a digit: give 0..9 or its word (seven)")
        classes.append(DIGIT_WORDS.index(c) if c in DIGIT_WORDS else int(c))
    if not classes:
        raise ValueError("this model erases no digit: name the attacked digit with --attack-concept (e.g. 7 or seven)")
    classes = list(dict.fromkeys(classes))
    labels = rs.labels.tolist()
    return list(dict.fromkeys(p for p, c in zip(rs.prompts, labels) if c in classes)), classes


def check_attack(module, settings: AttackSettings, sets: Sequence = (), concepts: Sequence = ()) -> None:
    """Refuse, before anything is sampled, what the attack cannot run on (class models, non-CLIP encoders, models that
    do not sample through a guided sampler over one denoiser) and RequestSets it cannot attack (no prompts, concept
    digits that are not digits; for Ring-A-Bell, prompts without the pairs of a concept vector)."""
    clip_text_encoder(module)
    if module.recipe().name != "cfg":
        raise ValueError(f"--attack {settings.method} needs a guided (CFG-sampled) model whose network takes the "
                         f"prompt alone; this one samples with the {module.recipe().name!r} recipe")
    for rs in sets:
        _, classes = attacked_prompts(module, rs, concepts)
        if settings.method == "ringabell":
            ring_a_bell_vector(module, rs, classes, settings.concept_pairs)


def evaluate_attack(module, rs, settings: AttackSettings, concepts: Sequence = (), scales: Sequence = (None,),
                    steps: int | None = None, sampler: str | None = None, guider: str | None = None,
                    guider_params: dict | None = None, seed: int = 0, negative: Any = None,
                    eta: float = 0.0) -> tuple[list[dict], dict, Tensor]:
    """(rows, report, images): per scale, the erased rate of the attacked prompts' samples after the attack
    (`erased_rate_attacked`; the plain evaluation's row has the rate before: UnlearnDiffAtk's soft tokens, Ring-A-Bell's
    concept-shifted embedding) and with the attack's discrete prompt as token ids (`erased_rate_nearest_words`:
    UnlearnDiffAtk's learned tokens' nearest vocabulary tokens inserted into the prompt, Ring-A-Bell's searched prompt),
    for labelled class prompts (None for prompt sets); the attack's report (settings, per prompt: loss or fitness
    curve, nearest ids, words, decoded text and whether it round-trips); the attacked rows' images at the first scale.
    Every row is sampled with the plain evaluation's noise and batches, so with 0 UnlearnDiffAtk steps or Ring-A-Bell
    strength 0 the attacked samples are the plain ones."""
    from train.evaluation.digits_text import erasure_columns
    from train.evaluation.evaluate import evaluate_samples
    from train.evaluation.requests import generate_images, set_data

    prompts, classes = attacked_prompts(module, rs, concepts)
    module.eval()
    w0 = scales[0] if scales else None
    if settings.method == "ringabell":  # extra: the method's own report fields
        attacks, extra = ring_a_bell_attacks(module, rs, prompts, classes, settings)
    else:
        attacks, extra = {p: unlearndiffatk(module, p, settings, scale=w0, steps=steps) for p in prompts}, {}
    data = set_data(module, rs)
    attacked = {p: a.states for p, a in attacks.items()}
    hard = {p: a.nearest_states for p, a in attacks.items() if a.nearest_states is not None}
    rows = []
    for w in scales:
        row = {"requests": rs.name, "w": w, "attack": settings.method}
        images = {}
        images["attacked"], _ = generate_images(module, rs.requests, w, steps, sampler, guider, seed, negative, eta,
                                                guider_params, progress=False, encode=attacked_encode(module, attacked))
        if hard:
            images["nearest_words"], _ = generate_images(module, rs.requests, w, steps, sampler, guider, seed, negative,
                                                         eta, guider_params, progress=False,
                                                         encode=attacked_encode(module, hard))
        for name, x in images.items():
            rate = None
            if rs.labels is not None:
                rate = erasure_columns(evaluate_samples(x, rs.labels, data=data, device=module.device),
                                       classes).get("erased_rate")
            row[f"erased_rate_{name}"] = rate
        rows.append(row)
    report = {**settings.report(), **extra, "classes": classes, "prompts": [a.report() for a in attacks.values()]}
    grid = before_after(module, prompts, attacked, hard, w0, steps, sampler, guider, seed, negative, eta, guider_params)
    return rows, report, grid


GRID_PER_PROMPT = 16


def before_after(module, prompts: Sequence[str], attacked: dict, hard: dict, scale=None, steps=None, sampler=None,
                 guider=None, seed: int = 0, negative: Any = None, eta: float = 0.0, guider_params=None,
                 per_prompt: int = GRID_PER_PROMPT) -> Tensor:
    """The attack's grid [rows x per_prompt images]: for each attacked prompt, a row of its plain samples, a row under
    the attack (soft tokens / shifted embedding) and, where there is one, a row under its discrete prompt, all from
    the same noise, so a column shows one draw before and after."""
    from train.evaluation.requests import generate_images

    requests = [p for p in prompts for _ in range(per_prompt)]
    encodes = [None, attacked_encode(module, attacked)] + ([attacked_encode(module, hard)] if hard else [])
    runs = [generate_images(module, requests, scale, steps, sampler, guider, seed, negative, eta, guider_params,
                            progress=False, encode=e)[0] for e in encodes]
    return torch.cat([run[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts)) for run in runs])
