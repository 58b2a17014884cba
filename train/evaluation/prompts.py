"""Sampling and evaluation of text-to-image methods from prompts: the `sample` / `evaluate` commands' text path.

Two kinds of evaluation, side by side in one table:
- class prompts (a template such as "a handwritten {word}" over the ten digits): the text digits model
  (train.digits_pipeline) is judged by the embedded digits metrics (FD, accuracy, precision, recall), as the
  class-conditional models are;
- a prompt set (a file of prompts, e.g. COCO captions): FID against local reference images and CLIP score, when
  the user has the Inception / CLIP weights locally (train.evaluation.reference); what is missing is said, not
  downloaded.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def is_text_model(module) -> bool:
    """True for a method module whose network is text-conditioned (no class labels)."""
    net = module.sampling_denoiser().net
    return getattr(net, "num_classes", None) is None and hasattr(getattr(net, "base", net), "null_cond")


def prompt_list(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """--prompt values followed by the prompts of --prompts FILE (data.prompts.read_prompts)."""
    out = list(prompts or [])
    if prompts_file:
        from data.prompts import read_prompts

        out += read_prompts(prompts_file)
    return out


@torch.no_grad()
def generate_images(module, prompts: Sequence[str], scale: float, steps: int, sampler: str = "ddim", guider="cfg",
                    seed: int = 0, negative_prompt: str | None = None, batch_size: int = 64, progress: bool = True,
                    **guider_params) -> tuple[Tensor, float]:
    """Decoded images [N, 3, H, W] in about [-1, 1] for N prompts, and network evaluations per sample."""
    latents, nfe = module.generate(list(prompts), scale, steps, sampler, guider, seed, batch_size=batch_size,
                                   progress=progress, negative_prompt=negative_prompt, **guider_params)
    return module.decode_latents(latents), nfe


def evaluate_class_prompts(module, template: str, scales: Sequence[float], steps: int = 50, sampler: str = "ddim",
                           guider: str = "cfg", seed: int = 0, num_per_class: int = 100,
                           guider_params: dict | None = None, negative_prompt: str | None = None) -> list[dict]:
    """Digits-metrics rows (one per scale) for a text model of the captioned digits, prompted with `template`."""
    from train.evaluation.evaluate import evaluate_samples
    from train.evaluation.digits_text import generate_digits

    rows = []
    for w in scales:
        images, labels, nfe = generate_digits(module, template, num_per_class, w, steps, sampler, guider, seed,
                                              progress=True, negative_prompt=negative_prompt, **(guider_params or {}))
        m = evaluate_samples(images, labels, nfe_per_sample=nfe)
        rows.append({"prompts": template, "guider": guider, "w": w, "sampler": sampler, "steps": steps, **m})
    return rows


def evaluate_prompt_set(module, prompts: Sequence[str], scales: Sequence[float], steps: int = 50,
                        sampler: str = "ddim", guider: str = "cfg", seed: int = 0, num_per_prompt: int = 1,
                        guider_params: dict | None = None, negative_prompt: str | None = None,
                        fid_weights: str | None = None, fid_reference: str | None = None,
                        clip_model: str | None = None) -> tuple[list[dict], list[str]]:
    """(rows, missing): FID / CLIP score rows (one per scale) for samples of a prompt set, and a sentence for each
    metric that could not be computed for lack of local weights or reference images."""
    from train.evaluation.reference import text_metrics

    rows, missing = [], []
    expanded = [p for p in prompts for _ in range(num_per_prompt)]
    for w in scales:
        images, nfe = generate_images(module, expanded, w, steps, sampler, guider, seed, negative_prompt,
                                      **(guider_params or {}))
        m = text_metrics(images, expanded, fid_weights=fid_weights, fid_reference=fid_reference, clip_model=clip_model)
        missing = list(m.pop("missing", []))
        rows.append({"prompts": f"{len(prompts)} prompts x {num_per_prompt}", "guider": guider, "w": w,
                     "sampler": sampler, "steps": steps, "nfe_per_sample": nfe, **m})
    return rows, missing
