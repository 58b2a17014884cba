"""Tests of train/evaluation: Frechet distance, precision/recall, the cached feature network (the digits classifier and
the network of any other labelled data set), evaluate_samples."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from data.digits import digits_tensors
from train.evaluation import classifier as clf_mod
from train.evaluation.classifier import (cache_path, classifier_accuracy, load_classifier, load_digits_classifier,
                                         recipe_hash, save_classifier, train_digits_classifier)
from train.evaluation.evaluate import evaluate_samples, format_table
from train.evaluation.metrics import (class_accuracy, frechet_distance, frechet_distance_from_stats, knn_radii,
                                      precision_recall)


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def digits():
    return digits_tensors("train"), digits_tensors("validation")


def _with_moments(n: int, mu: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """n samples [n, F] whose empirical mean is exactly mu and unbiased empirical covariance exactly cov."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T   # whiten: cov(z) = I
    return z @ np.linalg.cholesky(cov).T + mu


# ----------------------------------------------------------------------------------------- Frechet distance

def test_fd_of_a_set_with_itself_is_zero():
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_fd_matches_closed_form_for_diagonal_gaussians():
    # ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); diagonal S: sum((sqrt(s1) - sqrt(s2))^2)
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()   # = 6 + 4 + 1 + 0 + 0.5
    assert expected == pytest.approx(11.5)
    assert frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)
    # through the sample path: sets whose empirical moments are exactly those
    a = _with_moments(50, mu1, np.diag(s1), seed=1)
    b = _with_moments(70, mu2, np.diag(s2), seed=2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(expected, rel=1e-5)


def test_fd_matches_scipy_sqrtm_for_full_covariances():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_fd_is_symmetric_and_safe_for_singular_covariances():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(10, 32, generator=g), torch.randn(12, 32, generator=g) + 0.5   # N < F: singular covariances
    d_ab, d_ba = frechet_distance(a, b), frechet_distance(b, a)
    assert np.isfinite(d_ab) and d_ab > 0
    assert d_ab == pytest.approx(d_ba, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fd_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        frechet_distance(torch.zeros(10), torch.zeros(10))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


# ------------------------------------------------------------------------------------ precision and recall

def test_precision_recall_of_identical_sets_is_one():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(5))
    assert precision_recall(x, x.clone()) == (1.0, 1.0)


def test_precision_recall_of_disjoint_far_sets_is_zero():
    g = torch.Generator().manual_seed(6)
    real, fake = torch.randn(100, 8, generator=g), torch.randn(120, 8, generator=g) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_hand_computed():
    # 1-D points embedded in 2-D, k = 1.
    # real {0, 1, 3}: 1-NN radii {1, 1, 2}.  fake {0.3, 0.4, 4.5, 9}: 1-NN radii {0.1, 0.1, 4.1, 4.5}.
    # precision: 0.3 (|0.3-0| <= 1), 0.4, 4.5 (|4.5-3| <= 2) in; 9 out                        -> 3/4
    # recall:    0 out (0.3 > 0.1, 0.4 > 0.1, 4.5 > 4.1, 9 > 4.5); 1 in (|1-4.5| <= 4.1); 3 in -> 2/3
    emb = lambda v: torch.tensor([[p, 0.0] for p in v], dtype=torch.float64)
    real, fake = emb([0, 1, 3]), emb([0.3, 0.4, 4.5, 9])
    assert knn_radii(real, 1).tolist() == pytest.approx([1, 1, 2])
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(3 / 4)
    assert recall == pytest.approx(2 / 3)
    # k = 2 grows the real radii to {3, 2, 3}: 4.5 and 9 -> 9 still out (|9-3| = 6 > 3)
    assert precision_recall(real, fake, k=2)[0] == pytest.approx(3 / 4)


def test_precision_recall_rejects_k_too_large():
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(torch.randn(3, 2), torch.randn(5, 2), k=3)


def test_class_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.75)


# -------------------------------------------------------------------------------------------- classifier

def test_classifier_is_accurate_on_validation(classifier, digits):
    (_, _), (xv, yv) = digits
    assert not classifier.training and not any(p.requires_grad for p in classifier.parameters())
    assert classifier(xv).shape == (300, 10)
    assert classifier.features(xv).shape == (300, clf_mod.FEATURE_DIM)
    assert classifier_accuracy(classifier, xv, yv) >= 0.97


def test_training_is_deterministic(classifier):
    again = train_digits_classifier()
    a, b = classifier.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "two trainings with the same recipe gave different weights"


def test_cache_is_reused(classifier, cache_dir, monkeypatch):
    path = cache_path(cache_dir)
    assert path.exists() and recipe_hash() in path.name
    assert load_digits_classifier(cache_dir) is classifier   # in-process memo
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("load_digits_classifier retrained although a valid cache file exists")

    monkeypatch.setattr(clf_mod, "train_digits_classifier", no_training)
    monkeypatch.setattr(clf_mod, "_MEMO", {})
    loaded = load_digits_classifier()   # default dir = $GUIDEDISTILL_CACHE = cache_dir
    assert loaded is not classifier
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in classifier.state_dict().items())
    assert path.stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]   # atomic write left nothing behind


def _garbage(raw: bytes) -> bytes:
    return b"not a safetensors file" * 10


def _flip_last_byte(raw: bytes) -> bytes:   # a tensor byte: the header still parses, the digest does not match
    return raw[:-1] + bytes([raw[-1] ^ 0xFF])


def _truncate(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


@pytest.mark.parametrize("corrupt", [_garbage, _flip_last_byte, _truncate])
def test_corrupt_cache_is_retrained(classifier, cache_dir, tmp_path, monkeypatch, corrupt):
    path = cache_path(tmp_path)
    shutil.copy(cache_path(cache_dir), path)
    path.write_bytes(corrupt(path.read_bytes()))
    calls = []

    def fake_training(recipe=clf_mod.RECIPE):   # stands in for the (tested above) real training
        calls.append(recipe)
        model = clf_mod.DigitsClassifier(**recipe["arch"])
        model.load_state_dict(classifier.state_dict())
        return model

    monkeypatch.setattr(clf_mod, "train_digits_classifier", fake_training)
    with pytest.warns(RuntimeWarning, match="retraining"):
        model = load_digits_classifier(tmp_path)
    assert len(calls) == 1
    assert not model.training
    reloaded = load_classifier(path)   # the rewritten cache is valid again
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in classifier.state_dict().items())


def test_changing_the_recipe_changes_the_cache_file(tmp_path):
    changed = dict(clf_mod.RECIPE, epochs=clf_mod.RECIPE["epochs"] + 1)
    assert cache_path(tmp_path, changed) != cache_path(tmp_path)


def test_cache_from_another_recipe_is_rejected(classifier, tmp_path):
    path = tmp_path / "w.safetensors"
    save_classifier(classifier, path, recipe=dict(clf_mod.RECIPE, epochs=1))
    with pytest.raises(ValueError, match="different recipe"):
        load_classifier(path)


# -------------------------------------------------------------------------------------- evaluate_samples

def test_evaluate_real_validation_digits(classifier, digits):
    (_, _), (xv, yv) = digits
    r = evaluate_samples(xv, yv, classifier=classifier)
    assert set(r) >= {"fd", "accuracy", "precision", "recall", "num_samples", "per_class_accuracy", "class_histogram"}
    assert r["num_samples"] == 300
    assert r["accuracy"] >= 0.97
    assert r["fd"] == pytest.approx(0.0, abs=1e-6)   # the reference set itself
    assert (r["precision"], r["recall"]) == (1.0, 1.0)
    assert len(r["per_class_accuracy"]) == 10 and min(r["per_class_accuracy"]) >= 0.8
    assert sum(r["class_histogram"]) == pytest.approx(1.0)
    assert r["class_histogram"] == pytest.approx([0.1] * 10, abs=0.02)   # 30 per class


def test_erasure_columns_judge_the_erased_and_the_other_classes_apart(classifier, digits):
    """With the classes an erasure model removes, the metrics add erased_rate (their samples still classified as
    them), other_accuracy and other_fd (the other classes' samples against the held-out images of those classes)."""
    from train.evaluation.evaluate import LabelledMetrics, classify

    (xt, yt), (xv, yv) = digits
    images, labels = xt[:400], yt[:400].clone()
    labels[labels == 3] = 5  # the 3s are "asked for as 5": class 5's samples are partly drawn as another digit
    metrics = LabelledMetrics(len(images), labels, classifier=classifier, erased=[5, 8])
    for part in torch.arange(len(images)).split(64):
        metrics.update(part, images[part])
    row = metrics.compute()
    feats, logits = classify(classifier, images)
    pred = logits.argmax(1)
    gone, kept = torch.isin(labels, torch.tensor([5, 8])), ~torch.isin(labels, torch.tensor([5, 8]))
    ref = classify(classifier, xv[~torch.isin(yv, torch.tensor([5, 8]))])[0]
    assert row["erased_rate"] == pytest.approx((pred[gone] == labels[gone]).double().mean().item(), abs=1e-12)
    assert row["other_accuracy"] == pytest.approx((pred[kept] == labels[kept]).double().mean().item(), abs=1e-12)
    assert row["other_fd"] == pytest.approx(frechet_distance(feats[kept], ref), rel=1e-6)
    assert row["erased_rate"] < 0.8 < row["other_accuracy"]  # the relabelled 3s are not 5s
    assert row["other_fd"] != pytest.approx(row["fd"], rel=1e-3)
    plain = LabelledMetrics(len(images), labels, classifier=classifier)
    plain.update(torch.arange(len(images)), images)
    assert not {"erased_rate", "other_accuracy", "other_fd"} & set(plain.compute())


def test_fd_separates_real_digits_from_noise_and_blur(classifier, digits):
    # Measured with the default recipe: train vs validation ~1.3, blurred train ~130, N(0, 1) noise ~150.
    (xt, yt), _ = digits
    g = torch.Generator().manual_seed(0)
    real = evaluate_samples(xt, yt, classifier=classifier)
    noise = evaluate_samples(torch.randn(1500, 1, 8, 8, generator=g), None, classifier=classifier)
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])[None, None] / 16
    blurred = evaluate_samples(F.conv2d(F.pad(xt, (1, 1, 1, 1), mode="replicate"), kernel), yt, classifier=classifier)
    assert real["accuracy"] >= 0.97
    assert real["fd"] < 5.0
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    assert noise["fd"] > 20 * real["fd"] and blurred["fd"] > 20 * real["fd"]
    assert noise["accuracy"] is None and noise["per_class_accuracy"] == [None] * 10
    assert noise["precision"] < 0.5 and noise["recall"] < 0.1


def test_class_histogram_and_per_class_accuracy(classifier, digits):
    (xt, yt), _ = digits
    threes = xt[yt == 3]
    r = evaluate_samples(threes, torch.full((len(threes),), 3), classifier=classifier)
    assert r["class_histogram"][3] >= 0.95
    assert r["per_class_accuracy"][3] == pytest.approx(r["accuracy"])
    assert r["per_class_accuracy"][:3] == [None] * 3
    assert r["recall"] < 0.3   # one class covers little of the real manifold


def test_samples_are_clamped_before_classification(classifier, digits):
    _, (xv, yv) = digits
    loud = xv * 3.0
    assert evaluate_samples(loud, yv, classifier=classifier) == evaluate_samples(loud.clamp(-1, 1), yv, classifier=classifier)


def test_default_classifier_comes_from_the_cache(classifier, digits):
    _, (xv, yv) = digits
    assert evaluate_samples(xv[:20], yv[:20], nfe_per_sample=4)["nfe_per_sample"] == 4


def test_evaluate_rejects_bad_shapes(classifier):
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        evaluate_samples(torch.zeros(10, 64), classifier=classifier)
    with pytest.raises(ValueError, match="labels"):
        evaluate_samples(torch.zeros(10, 1, 8, 8), torch.zeros(9, dtype=torch.long), classifier=classifier)


def test_format_table():
    rows = [{"method": "teacher", "fd": 1.23456, "accuracy": 0.9, "nfe": 50},
            {"method": "student|1", "fd": 12345.6, "accuracy": None}]
    assert format_table(rows, ["method", "fd", "accuracy", "nfe"]) == (
        "| method | fd | accuracy | nfe |\n"
        "|---|---|---|---|\n"
        "| teacher | 1.235 | 0.9 | 50 |\n"
        "| student\\|1 | 1.235e+04 | - | - |")
    assert format_table(rows[:1]).splitlines()[0] == "| method | fd | accuracy | nfe |"


# ------------------------------------------------------------------------- the feature network of any data set

def test_the_digits_network_is_the_feature_network_at_1x8x8():
    digits = clf_mod.FeatureNetwork(**clf_mod.RECIPE["arch"])
    assert clf_mod.DigitsClassifier is clf_mod.FeatureNetwork and digits.image_shape == (1, 8, 8)
    assert [k for k in digits.state_dict()] == ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias",
                                                "body.5.weight", "body.5.bias", "body.9.weight", "body.9.bias",
                                                "head.1.weight", "head.1.bias"]   # the original digits classifier's
    assert clf_mod.recipe_for(type("D", (), {"is_digits": True})()) is clf_mod.RECIPE


@pytest.mark.parametrize("channels, size, pooled", [(3, 16, 4), (1, 28, 4), (3, 32, 4), (1, 12, 3)])
def test_the_feature_network_takes_any_image_size(channels, size, pooled):
    recipe = clf_mod.image_recipe(channels, size, 5)
    net = clf_mod.FeatureNetwork(**recipe["arch"])
    x = torch.rand(2, channels, size, size) * 2 - 1
    assert net.features(x).shape == (2, clf_mod.FEATURE_DIM) and net(x).shape == (2, 5)
    assert net.body[-1].in_features == 64 * pooled ** 2   # S // 4, average-pooled to 4x4 above 4
    assert recipe["fill"] == "edge" and recipe["shift"] == max(1, size // 8)


def test_the_edge_fill_shifts_each_channel_with_its_own_border():
    # constant channels stay constant under an edge-filled shift; the digits' -1 fill brings in -1 pixels
    x = torch.tensor([0.5, -0.25, 0.75])[None, :, None, None].expand(4, 3, 6, 6).contiguous()
    plain = {"shift": 2, "contrast": [1.0, 1.0], "noise_std_max": 0.0}
    edge = clf_mod._augment(x, dict(plain, fill="edge"), torch.Generator().manual_seed(0))
    assert edge.shape == x.shape and torch.equal(edge, x)
    minus = clf_mod._augment(x, plain, torch.Generator().manual_seed(0))
    assert (minus == -1).any() and torch.equal(minus[minus != -1], x[minus != -1])


def _two_class_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 3, 8, 8]: class 0 dark with a bright left half, class 1 dark with a bright right half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.full((n, 3, 8, 8), -0.8) + 0.1 * torch.randn(n, 3, 8, 8, generator=g)
    x[labels == 0, :, :, :4] += 1.5
    x[labels == 1, :, :, 4:] += 1.5
    return x.clamp(-1, 1), labels


def test_training_on_another_data_set_is_deterministic_and_learns():
    recipe = dict(clf_mod.image_recipe(3, 8, 2), min_steps=40, max_steps=40)
    (xt, yt), (xv, yv) = _two_class_images(48, 0), _two_class_images(40, 1)
    a, b = (clf_mod.train_feature_network(xt, yt, recipe) for _ in range(2))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert clf_mod.classifier_accuracy(a, xv, yv) == 1.0


def test_another_data_sets_cache_file_and_weights_are_refused(classifier, tmp_path):
    path = cache_path(tmp_path, clf_mod.RECIPE, "f" * 64)
    assert path != cache_path(tmp_path) and path.name.endswith(f"-{'f' * 16}.safetensors")
    save_classifier(classifier, path)   # the digits network, filed under another data set's digest
    with pytest.raises(ValueError, match=r"trained on another data set \(the embedded digits"):
        load_classifier(path, data_digest="f" * 64)
    assert load_classifier(path).heldout_accuracy == classifier.heldout_accuracy > 0.97

    class Other:   # a LabelledData of another data set with the digits' shapes
        is_digits, shape, num_classes, class_names, digest, name = False, (1, 8, 8), 10, list("0123456789"), "e" * 64, "other"

    _, (xv, yv) = digits_tensors("train"), digits_tensors("validation")
    with pytest.raises(ValueError, match="trained on the embedded digits .* not on other"):
        evaluate_samples(xv, yv, classifier=classifier, data=Other())
