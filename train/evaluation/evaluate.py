"""`evaluate_samples`: the one evaluation every method reports (FD, accuracy, precision/recall, class histogram)."""
from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from train.evaluation.classifier import NUM_CLASSES, DigitsClassifier, load_digits_classifier
from train.evaluation.metrics import class_accuracy, frechet_distance, precision_recall

# Reference features per classifier and split, computed once per process (the references never change).
_REFERENCE: weakref.WeakKeyDictionary[DigitsClassifier, dict[str, Tensor]] = weakref.WeakKeyDictionary()


@torch.inference_mode()
def classify(classifier: DigitsClassifier, images: Tensor, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(features [N, F], logits [N, 10]) on CPU for images [N, 1, 8, 8], clamped to [-1, 1] first."""
    device = next(classifier.parameters()).device
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].detach().to(device, torch.float32).clamp(-1.0, 1.0)
        f = classifier.features(x)
        feats.append(f.cpu())
        logits.append(classifier.head(f).cpu())
    return torch.cat(feats), torch.cat(logits)


def reference_features(classifier: DigitsClassifier, split: str = "validation") -> Tensor:
    """Features [N, F] of the real digits of `split` ('train' or 'validation'), memoised per classifier."""
    per_split = _REFERENCE.setdefault(classifier, {})
    if split not in per_split:
        from data.digits import digits_tensors

        per_split[split] = classify(classifier, digits_tensors(split)[0])[0]
    return per_split[split]


def evaluate_samples(images: Tensor, labels: Tensor | None = None, reference_split: str = "validation",
                     classifier: DigitsClassifier | None = None, k: int = 3,
                     nfe_per_sample: float | None = None) -> dict[str, Any]:
    """Score generated (or real) digits against the real digits of `reference_split`.

    images:          [N, 1, 8, 8] in data space [-1, 1] (clamped before classification), N >= k + 1 and >= 2; RGB
                     images [N, 3, 8, 8] are read as gray (their channel mean).
    labels:          [N] int classes the samples were requested for, or None for unconditional samples.
    reference_split: real digits that give the reference features ('validation': 300, 30 per class).
    classifier:      feature extractor; default `load_digits_classifier()` (trained once, cached).
    k:               neighbourhood size of precision/recall (Kynkaanniemi et al. 2019 use 3).
    nfe_per_sample:  network evaluations per sample of the sampler (e.g. GuidedDenoiser.nfe), passed through.

    Returns a dict:
        fd                 Frechet distance between classifier features of samples and references (lower is better)
        accuracy           fraction classified as their requested label (None when labels is None)
        per_class_accuracy list of 10: accuracy among samples requested for class c (None if none were)
        class_histogram    list of 10: fraction of all samples the classifier assigns to class c
                           (for concept erasure, the erased class's entry is the erased-class rate)
        precision, recall  improved precision/recall in feature space (Kynkaanniemi et al. 2019)
        num_samples        N
        nfe_per_sample     as given (None when not given)
    """
    if images.ndim == 4 and tuple(images.shape[1:]) == (3, 8, 8):  # RGB (a latent model's decoded samples): gray
        images = images.float().mean(1, keepdim=True)
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"images must be [N, 1, 8, 8] (or RGB [N, 3, 8, 8]) in [-1, 1], got shape {tuple(images.shape)}")
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f"labels must be [N] = [{len(images)}] or None, got shape {tuple(labels.shape)}")
    classifier = classifier if classifier is not None else load_digits_classifier()
    feats, logits = classify(classifier, images)
    ref = reference_features(classifier, reference_split)
    precision, recall = precision_recall(ref, feats, k=k)
    pred = logits.argmax(dim=1)
    histogram = (torch.bincount(pred, minlength=NUM_CLASSES).double() / len(pred)).tolist()
    accuracy, per_class = None, [None] * NUM_CLASSES
    if labels is not None:
        labels = labels.detach().cpu().long()
        accuracy = class_accuracy(logits, labels)
        for c in range(NUM_CLASSES):
            mask = labels == c
            if mask.any():
                per_class[c] = (pred[mask] == c).double().mean().item()
    return {
        "fd": frechet_distance(feats, ref),
        "accuracy": accuracy,
        "per_class_accuracy": per_class,
        "class_histogram": histogram,
        "precision": precision,
        "recall": recall,
        "num_samples": len(images),
        "nfe_per_sample": nfe_per_sample,
    }


def sampling_columns(module, scale=None, steps=None, sampler=None, guider=None, guider_params=None) -> dict:
    """The guider, w, sampler and steps a method's recipe samples with for these requests (its defaults filled in;
    a w the recipe does not take, e.g. a PG-SB generator's, is None)."""
    s = module.recipe().resolve(scale, steps, sampler, guider, guider_params)
    return {"guider": s.guider if isinstance(s.guider, str) else s.guider.name, "w": s.scale, "sampler": s.sampler,
            "steps": s.steps}


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    if isinstance(v, (list, tuple)):
        return " ".join(_cell(x) for x in v)
    return str(v).replace("|", "\\|")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Markdown table of `rows` (dicts such as evaluate_samples results plus a 'method' key).

    columns: keys to show, in order (default: the first row's keys). Floats print with 4 significant
    digits, missing or None values as '-', lists space-separated.
    """
    if columns is None:
        columns = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
