"""Erasure metrics on the feature network of the model's labelled data (the digits classifier for the text digits'
class prompts): the erased-class rate of a model and the erasure table's row (erased rate, the other classes'
accuracy and FD, robustness probes)."""
from __future__ import annotations

from typing import Any, Sequence

import torch


@torch.no_grad()
def erased_rate(module, classes: Sequence[int], num_per_class: int, scale: float | None = None,
                steps: int | None = None, template: str | None = None, seed: int = 0, data=None) -> float:
    """The fraction of `num_per_class` samples per erased class that the feature network of the model's data
    (`data`, default train.evaluation.labelled.data_of(module)) still assigns to that class (lower is better): a class
    model is asked for the class ids, a text model of the captioned digits for the class prompts of `template`
    ("a handwritten {word}", train.evaluation.digits_text), judged by the digits classifier."""
    from train.evaluation.classifier import feature_network_on, load_feature_network
    from train.evaluation.digits_text import caption, to_digits
    from train.evaluation.evaluate import as_data_images, classify
    from train.evaluation.labelled import check_generates, data_of, labelled_data

    if not classes or num_per_class <= 0:
        raise ValueError(f"erased_rate needs erased classes and num_per_class > 0, got {list(classes)}, {num_per_class}")
    if data is None:
        data = labelled_data(None) if template is not None else data_of(module)
    if template is None:
        check_generates(module, data)
    labels = torch.tensor(list(classes)).repeat_interleave(num_per_class)
    requests = labels if template is None else [caption(template, int(c)) for c in labels]
    samples, _ = module.generate(requests, scale, steps, seed=seed)
    images = as_data_images(module.samples_to_images(samples), data) if template is None else \
        to_digits(module.samples_to_images(samples))
    pred = classify(feature_network_on(load_feature_network(data), module.device), images)[1].argmax(1)
    return (pred == labels).float().mean().item()


@torch.no_grad()
def erasure_metrics(module, erased: Sequence[int] | None = None, scale: float = 2.0, probe_scales=(1.0, 3.0, 5.0),
                    steps: int = 50, num_per_class: int = 100, uncond_samples: int = 500,
                    seed: int = 0) -> dict[str, Any]:
    """The erasure table's row for one class-conditional model (DDIM with `steps`, CFG):

    erased_rate:     at `scale`, the fraction of samples requested as an erased class that the classifier assigns
                     to that class (num_per_class per class, every class sampled)
    other_acc:       at `scale`, class accuracy on the other classes' samples
    other_fd:        at `scale`, Frechet distance of the other classes' samples to the real held-out images of
                     the same classes (feature-network features)
    uncond_rate:     robustness probe: fraction of `uncond_samples` unconditional samples classified as erased
    erased_rate_at:  robustness probe: {w: erased_rate} at the other guidance scales (erased classes only)

    erased: the erased classes (default: the erasure module's erased requests, train.evaluation.digits_text.
    erased_digits). The feature network and the references are those of the model's labelled data
    (train.evaluation.labelled.data_of: its held-out images of the other classes)."""
    from train.evaluation.classifier import feature_network_on, load_feature_network
    from train.evaluation.digits_text import erased_digits
    from train.evaluation.evaluate import classify
    from train.evaluation.labelled import check_generates, data_of
    from train.evaluation.metrics import frechet_distance

    classes = module.conditioner.enumerate()
    if classes is None:
        raise ValueError("erasure_metrics judges class-conditional models; for a text model of the captioned "
                         "digits use erased_rate(module, classes, n, template=...) or `python -m train evaluate "
                         "--class-prompts`")
    erased = list(erased_digits(module) if erased is None else erased)
    if not erased:
        raise ValueError("give the erased classes (erased=[3]): the module names none")
    data = data_of(module)
    check_generates(module, data)  # before anything is sampled
    clf = feature_network_on(load_feature_network(data), module.device)  # on the module's device, as its samples
    erased_t = torch.tensor(erased)
    rate = lambda images, labels: (classify(clf, images)[1].argmax(1) == labels).double().mean().item()  # noqa: E731
    real, real_labels = data.split_tensors("validation")
    ref = classify(clf, real[~torch.isin(real_labels, erased_t)])[0]
    labels = torch.tensor(classes).repeat_interleave(num_per_class)
    images, _ = module.generate(labels, scale, steps, seed=seed)
    feats, logits = classify(clf, images)
    pred, is_erased = logits.argmax(1), torch.isin(labels, erased_t)
    out = {"w": scale, "erased_rate": (pred[is_erased] == labels[is_erased]).double().mean().item(),
           "other_acc": (pred[~is_erased] == labels[~is_erased]).double().mean().item(),
           "other_fd": frechet_distance(feats[~is_erased], ref)}
    null = [module.conditioner.null_request] * uncond_samples
    u, _ = module.generate(null, 1.0, steps, seed=seed + 1)
    out["uncond_rate"] = torch.isin(classify(clf, u)[1].argmax(1), erased_t).double().mean().item()
    probe = erased_t.repeat_interleave(num_per_class)
    out["erased_rate_at"] = {w: rate(module.generate(probe, w, steps, seed=seed + 2)[0], probe) for w in probe_scales}
    return out
