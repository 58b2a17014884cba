"""`evaluate_samples`: the one evaluation every method reports (FD, accuracy, precision/recall, class histogram) in the
feature space of the network trained on the model's own labelled data set."""
from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from train.evaluation.classifier import FeatureNetwork, check_trained_on, feature_network_on, load_feature_network
from train.evaluation.labelled import LabelledData, labelled_data
from train.evaluation.metrics import class_accuracy, frechet_distance, precision_recall

# Reference features per feature network and split, computed once per process (the references never change).
_REFERENCE: weakref.WeakKeyDictionary[FeatureNetwork, dict[str, Tensor]] = weakref.WeakKeyDictionary()


@torch.inference_mode()
def classify(classifier: FeatureNetwork, images: Tensor, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(features [N, F], logits [N, K]) on CPU for images [N, C, S, S], clamped to [-1, 1] first."""
    device = next(classifier.parameters()).device
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].detach().to(device, torch.float32).clamp(-1.0, 1.0)
        f = classifier.features(x)
        feats.append(f.cpu())
        logits.append(classifier.head(f).cpu())
    return torch.cat(feats), torch.cat(logits)


def reference_features(classifier: FeatureNetwork, split: str = "validation", data: LabelledData | None = None) -> Tensor:
    """Features [N, F] of the real images of `split` ('train' or 'validation') of `data` (default: the digits),
    memoised per feature network."""
    per_split = _REFERENCE.setdefault(classifier, {})
    if split not in per_split:
        per_split[split] = classify(classifier, (data or labelled_data(None)).split_tensors(split)[0])[0]
    return per_split[split]


def as_data_images(images: Tensor, data: LabelledData) -> Tensor:
    """Samples [N, C, S, S] checked against the data's image shape; for the digits, RGB [N, 3, 8, 8] (a latent
    model's decoded samples) is read as grey (its channel mean)."""
    c, s, _ = data.shape
    if data.is_digits and images.ndim == 4 and tuple(images.shape[1:]) == (3, 8, 8):
        images = images.float().mean(1, keepdim=True)
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
        extra = " (or RGB [N, 3, 8, 8])" if data.is_digits else ""
        raise ValueError(f"images must be [N, {c}, {s}, {s}]{extra} in [-1, 1] (the evaluation network of {data.name} "
                         f"takes {c}x{s}x{s} images), got shape {tuple(images.shape)}")
    return images


def evaluate_samples(images: Tensor, labels: Tensor | None = None, reference_split: str = "validation",
                     classifier: FeatureNetwork | None = None, k: int = 3,
                     nfe_per_sample: float | None = None, data: LabelledData | None = None,
                     device: torch.device | str | None = None) -> dict[str, Any]:
    """Score generated (or real) images against the real images of `reference_split` of their data set.

    images:          [N, C, S, S] in data space [-1, 1] (clamped before classification), N >= k + 1 and >= 2; for
                     the digits RGB images [N, 3, 8, 8] are read as gray (their channel mean).
    labels:          [N] int classes the samples were requested for, or None for unconditional samples.
    reference_split: real images that give the reference features (digits 'validation': 300, 30 per class).
    classifier:      feature network; default `load_feature_network(data)` (trained once, cached). One trained on
                     another data set is refused.
    k:               neighbourhood size of precision/recall (Kynkaanniemi et al. 2019 use 3).
    nfe_per_sample:  network evaluations per sample of the sampler (e.g. GuidedDenoiser.nfe), passed through.
    data:            the labelled data set the samples are judged against (train.evaluation.labelled; default the
                     embedded digits).
    device:          where the feature network runs (the sampling module's device; None: where it is, the CPU).

    Returns a dict:
        fd                 Frechet distance between feature-network features of samples and references (lower is better)
        accuracy           fraction classified as their requested label (None when labels is None)
        per_class_accuracy list of K: accuracy among samples requested for class c (None if none were)
        class_histogram    list of K: fraction of all samples the feature network assigns to class c
                           (for concept erasure, the erased class's entry is the erased-class rate)
        precision, recall  improved precision/recall in feature space (Kynkaanniemi et al. 2019)
        num_samples        N
        nfe_per_sample     as given (None when not given)
    """
    data = data if data is not None else labelled_data(None)
    images = as_data_images(images, data)
    metrics = LabelledMetrics(len(images), labels, reference_split, classifier, k, data, device=device)
    metrics.update(torch.arange(len(images)), images)
    return metrics.compute(nfe_per_sample)


class LabelledMetrics:
    """evaluate_samples of n images added batch by batch (`update`, in any order), in memory bounded by a batch: the
    feature network's features [n, F] and logits [n, K] of every image are kept (a few numbers each), the images are
    not. Arguments as evaluate_samples; `compute` gives its dict. erased: the classes an erasure model removes
    (train.evaluation.digits_text.erased_digits); with labels, `compute` adds the erasure columns: `erased_rate` (their
    samples still classified as them), `other_accuracy` and `other_fd` (the other classes' samples against the
    held-out images of those classes: the preservation measure of train.evaluation.erasure.erasure_metrics).
    device: where the feature network runs (classifier.feature_network_on: a copy there; None: where it is)."""

    def __init__(self, n: int, labels: Tensor | None = None, reference_split: str = "validation",
                 classifier: FeatureNetwork | None = None, k: int = 3, data: LabelledData | None = None,
                 erased: Sequence[int] = (), device: torch.device | str | None = None):
        self.data = data if data is not None else labelled_data(None)
        if labels is not None and labels.shape != (n,):
            raise ValueError(f"labels must be [N] = [{n}] or None, got shape {tuple(labels.shape)}")
        classifier = classifier if classifier is not None else load_feature_network(self.data)
        check_trained_on(classifier, self.data)
        self.classifier = feature_network_on(classifier, device)
        self.n, self.labels, self.reference_split, self.k = n, labels, reference_split, k
        self.erased = [int(c) for c in erased]
        self.feats = self.logits = None
        self.seen = 0

    def update(self, index: Tensor, images: Tensor) -> None:
        """Add images [B, C, S, S] in [-1, 1] (as evaluate_samples takes them), the samples `index` [B] of the n."""
        feats, logits = classify(self.classifier, as_data_images(images, self.data))
        if self.feats is None:
            self.feats = feats.new_empty(self.n, feats.shape[1])
            self.logits = logits.new_empty(self.n, logits.shape[1])
        self.feats[index], self.logits[index] = feats, logits
        self.seen += len(index)

    def compute(self, nfe_per_sample: float | None = None) -> dict[str, Any]:
        """evaluate_samples' dict for the n images added."""
        if self.seen != self.n:
            raise RuntimeError(f"{self.seen} images were added to metrics of {self.n}")
        num_classes, feats, logits, labels = self.data.num_classes, self.feats, self.logits, self.labels
        ref = reference_features(self.classifier, self.reference_split, self.data)
        precision, recall = precision_recall(ref, feats, k=self.k)
        pred = logits.argmax(dim=1)
        histogram = (torch.bincount(pred, minlength=num_classes).double() / len(pred)).tolist()
        accuracy, per_class = None, [None] * num_classes
        if labels is not None:
            labels = labels.detach().cpu().long()
            accuracy = class_accuracy(logits, labels)
            for c in range(num_classes):
                mask = labels == c
                if mask.any():
                    per_class[c] = (pred[mask] == c).double().mean().item()
        out = {
            "fd": frechet_distance(feats, ref),
            "accuracy": accuracy,
            "per_class_accuracy": per_class,
            "class_histogram": histogram,
            "precision": precision,
            "recall": recall,
            "num_samples": self.n,
            "nfe_per_sample": nfe_per_sample,
        }
        if self.erased and labels is not None:
            out.update(self._erasure_columns(feats, pred, labels, ref))
        return out

    def _erasure_columns(self, feats: Tensor, pred: Tensor, labels: Tensor, ref: Tensor) -> dict[str, Any]:
        erased = torch.tensor(self.erased)
        gone, kept = torch.isin(labels, erased), ~torch.isin(labels, erased)
        ref_kept = ~torch.isin(self.data.split_tensors(self.reference_split)[1].long().cpu(), erased)
        return {"erased_rate": (pred[gone] == labels[gone]).double().mean().item() if gone.any() else None,
                "other_accuracy": (pred[kept] == labels[kept]).double().mean().item() if kept.any() else None,
                "other_fd": frechet_distance(feats[kept], ref[ref_kept]) if kept.sum() >= 2 else None}


def feature_network_report(data: LabelledData) -> dict:
    """What `evaluate` reports about the feature network of `data`: the data, its held-out accuracy, the cache file."""
    from train.evaluation.classifier import cache_path, recipe_for

    net = load_feature_network(data)
    return {"data": data.name, "classes": data.class_names, "heldout_accuracy": net.heldout_accuracy,
            "heldout_images": len(data.split_tensors("validation")[1]),
            "weights": str(cache_path(None, recipe_for(data), data.digest))}


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
