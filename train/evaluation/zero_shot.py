"""Concept accuracy of generated images by zero-shot CLIP from a local CLIP folder (object, style, identity erasure).

Each image is classified among the concept names, each written into a text template ("a photo of {}"), by CLIP's
zero-shot rule (Radford et al. 2021, arXiv 2103.00020, Sec. 3.1.2): p(k | x) = softmax_k(s cos(E_I(x), E_T(t_k))),
s the model's learned logit scale (100 for the released models); the prediction is the argmax. Erasure papers report
the accuracy on prompts of the erased concept (lower is better) and of the others (kept): MACE (Lu et al. 2024,
arXiv 2403.06135; Shilin-LU/MACE metrics/evaluate_clip_accuracy.py, "a photo of the {object}") for objects, UCE
(Gandikota et al. 2024, arXiv 2308.14761; eval-scripts/CLIP_classify.py, the argmax of logits_per_image) for
attributes.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

DEFAULT_TEMPLATE = "a photo of {}"
CONCEPTS_HELP = ("pass --concepts NAME [NAME ...] (the erased concept and the others to tell it from) and --clip-model "
                 "FOLDER")


def concept_texts(concepts: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Each concept written into `template` at "{}" (or "{concept}")."""
    if "{}" not in template and "{concept}" not in template:
        raise ValueError(f"a concept template needs {{}} where the concept goes (e.g. 'a painting in the style "
                         f"of {{}}'), got {template!r}")
    names = [str(c).strip() for c in concepts]
    if len(names) < 2 or len(set(n.lower() for n in names)) != len(names) or not all(names):
        raise ValueError(f"--concepts needs at least two distinct concept names to classify among, got "
                         f"{list(concepts)}")
    return [template.replace("{concept}", "{}").format(n) for n in names]


@torch.no_grad()
def concept_embeddings(clip, processor, concepts: Sequence[str], template: str = DEFAULT_TEMPLATE,
                       device: str | torch.device = "cpu") -> Tensor:
    """Unit CLIP text embeddings [K, D] of the K concepts written into `template` (concept_texts); clip, processor:
    train.evaluation.clip.load_clip's."""
    from train.evaluation.clip import clip_embedding

    tokens = processor(text=concept_texts(concepts, template), return_tensors="pt", padding=True, truncation=True)
    e_t = clip_embedding(clip.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                attention_mask=tokens["attention_mask"].to(device)))
    return e_t / e_t.norm(dim=-1, keepdim=True)


@torch.no_grad()
def concept_probs(images: Tensor, clip, processor, e_t: Tensor, batch_size: int = 32) -> Tensor:
    """p(concept | image) [N, K] (float32, CPU): softmax over the concepts of the logit scale times the cosine
    between each image's CLIP embedding and the unit text embeddings e_t [K, D] (concept_embeddings; Radford et al.
    2021, Sec. 3.1.2). images: float [N, 3, H, W] in [-1, 1], quantised to 8 bits as saved PNGs."""
    from train.evaluation.clip import clip_embedding, pil_images

    probs = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=pil_images(images[start:start + batch_size]), return_tensors="pt")["pixel_values"]
        e_i = clip_embedding(clip.get_image_features(pixel_values=pixels.to(e_t.device)))
        e_i = e_i / e_i.norm(dim=-1, keepdim=True)
        probs.append((clip.logit_scale.exp() * e_i @ e_t.T).softmax(-1).float().cpu())  # Radford et al. Sec. 3.1.2
    return torch.cat(probs)


def zero_shot_probs(images: Tensor, concepts: Sequence[str], model: str | os.PathLike,
                    template: str = DEFAULT_TEMPLATE, batch_size: int = 32,
                    device: str | torch.device | None = None) -> Tensor:
    """p(concept | image) [N, K] by zero-shot CLIP: softmax over the K concept texts of the logit scale times the
    cosine between image and text embeddings (Radford et al. 2021, Sec. 3.1.2).

    images: float [N, 3, H, W] in [-1, 1] (decoded samples, quantised to 8 bits as saved PNGs; gray [N, 1, H, W] read
    as RGB); concepts: K names; model: a local CLIPModel + CLIPProcessor folder (train.evaluation.clip.load_clip).
    """
    from train.evaluation.clip import load_clip
    from train.evaluation.images import check_images

    if images.ndim == 4 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    check_images(images)
    concept_texts(concepts, template)
    clip, processor = load_clip(model)
    device = torch.device(device) if device is not None else images.device
    clip.to(device)
    return concept_probs(images, clip, processor, concept_embeddings(clip, processor, concepts, template, device),
                         batch_size)


def concept_accuracy(probs: Tensor, concepts: Sequence[str], labels: Tensor | None = None,
                     erased: Sequence[str] = ()) -> dict:
    """The concept metrics of zero-shot probabilities probs [N, K] over `concepts`.

    Returns {"concept_histogram": {name: fraction of images predicted as it}} and, with labels [N] (the index of
    the concept each image was prompted for), "concept_accuracy" (fraction predicted as their own concept),
    "per_concept_accuracy" {name: accuracy among its images (None if none)} and, when some of the concepts are
    `erased` (names, case-insensitive), "erased_concept_accuracy" (mean over the erased concepts: lower is better)
    and "other_concept_accuracy" (mean over the others: kept)."""
    names = [str(c) for c in concepts]
    pred = probs.argmax(-1)
    out: dict = {"concept_histogram": {n: (pred == k).float().mean().item() for k, n in enumerate(names)}}
    if labels is None:
        return out
    labels = labels.detach().cpu().long()
    if labels.shape != pred.shape:
        raise ValueError(f"labels must be [N] = [{len(pred)}], got shape {tuple(labels.shape)}")
    per = {n: (pred[labels == k] == k).float().mean().item() if (labels == k).any() else None
           for k, n in enumerate(names)}
    out.update(concept_accuracy=(pred == labels).float().mean().item(), per_concept_accuracy=per)
    gone = {e.lower() for e in erased}
    if gone & {n.lower() for n in names}:
        def mean(values):
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None

        out["erased_concept_accuracy"] = mean(a for n, a in per.items() if n.lower() in gone)
        out["other_concept_accuracy"] = mean(a for n, a in per.items() if n.lower() not in gone)
    return out
