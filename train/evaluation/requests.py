"""What `sample` and `evaluate` ask a model for, and the metrics of the answer, through one path for class labels
and prompts.

A RequestSet is the rows to sample: every class of a class-conditional model (or the classes given by id or name),
class prompts of the text digits model ("a handwritten {word}": one prompt per digit, labelled with the digit), or a
prompt set (a prompt file, prompts on the command line). Labelled rows get the feature-network metrics of the model's
own labelled data (FD, class accuracy, precision/recall; train.evaluation.labelled); any rows get FID against local
reference images (by default a class model's held-out images) and, with prompts, CLIP score, when the user has
those weights locally (train.evaluation.reference); what is missing is said, not downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass
class RequestSet:
    """Rows to sample: `requests` (one per sample), their class `labels` [N] (or None) and `prompts` (or None)."""

    name: str
    requests: list
    labels: Tensor | None = None
    prompts: list[str] | None = None


def prompt_list(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """--prompt values followed by the prompts of --prompts FILE (data.prompts.read_prompts)."""
    out = list(prompts or [])
    if prompts_file:
        from data.prompts import read_prompts

        out += read_prompts(prompts_file)
    return out


def request_sets(module, classes: Sequence = (), prompts: Sequence[str] = (), class_prompts: str | None = None,
                 num_per_class: int = 1, num_per_prompt: int = 1) -> list[RequestSet]:
    """The RequestSets of a command: the given classes (ids or names), the class prompts of a template, the prompts;
    none given: every class of the model (a model whose requests cannot be listed, i.e. prompts, then needs some).
    Every request is checked by the model's conditioner before anything is sampled."""
    for flag, n in (("--num-per-class", num_per_class), ("--num-per-prompt", num_per_prompt)):
        if n <= 0:
            raise ValueError(f"{flag} must be positive, got {n}")
    conditioner, sets = module.conditioner, []
    if not (classes or prompts or class_prompts):
        classes = conditioner.enumerate()
        if classes is None:
            raise ValueError("this model is prompted: give --prompt TEXT (repeatable), --prompts FILE, or --class-prompts "
                             "TEMPLATE (the digits text model)")
    if classes:
        ids = conditioner.parse_all(classes)
        names = [getattr(conditioner, "name", str)(c) for c in ids]
        sets.append(RequestSet(f"classes {', '.join(names)}" if len(ids) < 11 else f"{len(ids)} classes",
                               [c for c in ids for _ in range(num_per_class)],
                               torch.tensor(ids).repeat_interleave(num_per_class)))
    if class_prompts:
        from train.evaluation.digits_text import class_prompts as digit_prompts

        rows, labels = digit_prompts(class_prompts, num_per_class)
        conditioner.parse_all(rows[:1])
        sets.append(RequestSet(class_prompts, rows, labels, rows))
    if prompts:
        conditioner.parse_all(prompts)
        rows = [p for p in prompts for _ in range(num_per_prompt)]
        sets.append(RequestSet(f"{len(prompts)} prompts x {num_per_prompt}", rows, None, rows))
    return sets


@torch.no_grad()
def generate_images(module, requests: Sequence, scale: float | None = None, steps: int | None = None,
                    sampler: str | None = None, guider=None, seed: int = 0, negative: Any = None, eta: float = 0.0,
                    guider_params: dict | None = None, batch_size: int = 64,
                    progress: bool = True, nasa_scale: float | None = None,
                    negtome_scale: float | None = None, encode=None) -> tuple[Tensor, float]:
    """Images [N, C, H, W] in about [-1, 1] for N requests (a latent model's samples decoded by its VAE), and network
    evaluations per sample (nasa_scale, negtome_scale: NASA's negative cross-attention, NegToMe; encode: the requests'
    condition instead of the model's encoding, an attack's; as MethodModule.generate takes them)."""
    samples, nfe = module.generate(list(requests) if not isinstance(requests, Tensor) else requests, scale, steps,
                                   sampler, guider, seed, batch_size=batch_size, progress=progress, negative=negative,
                                   eta=eta, guider_params=guider_params, nasa_scale=nasa_scale,
                                   negtome_scale=negtome_scale, encode=encode)
    return module.samples_to_images(samples), nfe


def set_data(module, rs: RequestSet):
    """The labelled data whose feature network judges a RequestSet: the model's own (train.evaluation.labelled.data_of)
    for class requests, the digits for the text digits' class prompts, None for prompts (no labels)."""
    from train.evaluation.labelled import data_of, labelled_data

    if rs.labels is None:
        return None
    return labelled_data(None) if rs.prompts is not None else data_of(module)


def check_set(module, rs: RequestSet):
    """set_data, with the model's image shape checked against its feature network before anything is sampled."""
    from train.evaluation.labelled import check_generates

    data = set_data(module, rs)
    if data is not None and rs.prompts is None:
        check_generates(module, data)
    return data


def evaluate_set(module, rs: RequestSet, scales: Sequence[float | None] = (None,), steps: int | None = None,
                 sampler: str | None = None, guider: str | None = None, guider_params: dict | None = None,
                 seed: int = 0, negative: Any = None, eta: float = 0.0, fid_weights: str | None = None,
                 fid_reference: str | None = None, clip_model: str | None = None) -> tuple[list[dict], list[str]]:
    """(rows, missing): one metrics row per scale (None: the recipe's own) for the samples of `rs`, and a sentence for
    each reference metric that could not be computed for lack of local weights or reference images.

    Labelled rows get the feature-network metrics of their data (check_set: shapes checked first); FID with
    fid_weights compares with fid_reference, or without one with the data's held-out images (class requests)."""
    from train.evaluation.evaluate import evaluate_samples, sampling_columns
    from train.evaluation.reference import reference_metrics

    data = check_set(module, rs)
    if fid_weights is not None and fid_reference is None and data is not None and rs.prompts is None:
        held_out = data.split_tensors("validation")[0]
        fid_reference = held_out.expand(-1, 3, -1, -1) if held_out.shape[1] == 1 else held_out
    rows, missing = [], []
    wants_reference = rs.labels is None or any(v is not None for v in (fid_weights, fid_reference, clip_model))
    for w in scales:
        images, nfe = generate_images(module, rs.requests, w, steps, sampler, guider, seed, negative, eta,
                                      guider_params)
        row = {"requests": rs.name, **sampling_columns(module, w, steps, sampler, guider, guider_params),
               "eta": eta, "nfe_per_sample": nfe}
        if rs.labels is not None:
            row.update(evaluate_samples(images, rs.labels, nfe_per_sample=nfe, data=data))
        if wants_reference:
            m = reference_metrics(images, rs.prompts, fid_weights=fid_weights, fid_reference=fid_reference,
                                  clip_model=clip_model)
            missing = list(m.pop("missing", []))
            row.update(m)
        rows.append(row)
    return rows, missing


def evaluate_checkpoint(module, scales: Sequence[float | None] = (None,), steps: int | None = None,
                        sampler: str | None = None, guider: str | None = None, seed: int = 0, num_per_class: int = 100,
                        guider_params: dict | None = None) -> list[dict]:
    """Metrics rows (one per scale) of every class of a class-conditional model."""
    rs = request_sets(module, num_per_class=num_per_class)[0]
    return evaluate_set(module, rs, scales, steps, sampler, guider, guider_params, seed)[0]


def evaluate_class_prompts(module, template: str, scales: Sequence[float | None] = (None,), steps: int | None = None,
                           sampler: str | None = None, guider: str | None = None, seed: int = 0,
                           num_per_class: int = 100, guider_params: dict | None = None,
                           negative: Any = None) -> list[dict]:
    """Metrics rows (one per scale) of the digits text model prompted class by class with `template`."""
    rs = request_sets(module, class_prompts=template, num_per_class=num_per_class)[0]
    return evaluate_set(module, rs, scales, steps, sampler, guider, guider_params, seed, negative)[0]
