"""Sample-quality metrics in a feature space: Frechet distance, k-NN precision/recall, class accuracy."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _as_float64(x: ArrayLike) -> Tensor:
    """[N, F] features (tensor or array, any float dtype, any device) -> float64 CPU tensor."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {tuple(t.shape)}")
    return t


def gaussian_stats(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] (float64) of features [N, F] (N >= 2)."""
    x = _as_float64(feats).numpy()
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _clip_eigenvalues(vals: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues [F] of a PSD matrix that are round-off (negative, or below F * eps * the largest);
    their square roots would otherwise add ~sqrt(eps) errors for singular covariances (N <= F)."""
    tol = max(vals.max(initial=0.0), 0.0) * len(vals) * np.finfo(np.float64).eps
    return np.where(vals > tol, vals, 0.0)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix [F, F] by eigen-decomposition."""
    vals, vecs = np.linalg.eigh((s + s.T) / 2)
    return (vecs * np.sqrt(_clip_eigenvalues(vals))) @ vecs.T


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2); mu [F], sigma [F, F].

    Dowson & Landau (1982), the FID formula of Heusel et al. 2017 (arXiv 1706.08500):
        d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
    tr((S1 S2)^(1/2)) is computed as tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the two matrices are similar, and the
    second is symmetric PSD, so its eigenvalues are real and non-negative (no complex sqrtm, no blow-up for
    singular covariances).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(_clip_eigenvalues(eig)).sum()
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(d2, 0.0)  # >= 0 exactly; only round-off can make it negative


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Frechet distance (FD; "FID" with Inception features, Heusel et al. 2017, arXiv 1706.08500) between
    Gaussians fitted to two feature sets feats_a [N, F] and feats_b [M, F] (N, M >= 2), in float64.

    Symmetric; 0 for a set with itself. Like FID it is biased upward for small N: compare values
    computed with the same sample counts.
    """
    mu1, s1 = gaussian_stats(feats_a)
    mu2, s2 = gaussian_stats(feats_b)
    return frechet_distance_from_stats(mu1, s1, mu2, s2)


def _pairwise_dist(a: Tensor, b: Tensor, chunk: int = 2048) -> Tensor:
    """Euclidean distances [N, M] between rows of a [N, F] and b [M, F] (float64, exact per pair)."""
    return torch.cat([torch.cdist(a[i:i + chunk], b, compute_mode="donot_use_mm_for_euclid_dist")
                      for i in range(0, len(a), chunk)])


def knn_radii(feats: Tensor, k: int) -> Tensor:
    """Distance from each row of feats [N, F] to its k-th nearest other row -> [N] (float64).

    Kynkaanniemi et al. 2019 (arXiv 1904.06991), Sec. 2: the radius of the hypersphere around each
    sample whose union estimates the manifold. Index k of the sorted row skips the point itself (index 0).
    """
    if not 1 <= k < len(feats):
        raise ValueError(f"k must be in [1, {len(feats) - 1}] for {len(feats)} samples, got {k}")
    radii = [torch.kthvalue(_pairwise_dist(feats[i:i + 2048], feats), k + 1, dim=1).values
             for i in range(0, len(feats), 2048)]
    return torch.cat(radii)


def _coverage(manifold: Tensor, radii: Tensor, queries: Tensor, chunk: int = 2048) -> float:
    """Fraction of queries [Q, F] inside the union of balls B(manifold_i [M, F], radii_i [M]) (Eq. 1 averaged as in Eq. 2)."""
    inside = [(_pairwise_dist(queries[i:i + chunk], manifold) <= radii[None]).any(dim=1)
              for i in range(0, len(queries), chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real_feats: ArrayLike, fake_feats: ArrayLike, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, arXiv 1904.06991, Eq. 1-2).

    real_feats [N, F], fake_feats [M, F]. Each set's manifold is the union of balls around its samples,
    with radius the distance to the k-th nearest neighbour in the same set (k=3 as in the paper).
        precision = fraction of fake samples inside the real manifold (fidelity),
        recall    = fraction of real samples inside the fake manifold (coverage / diversity).
    A point on a ball's boundary counts as inside. Returns (precision, recall) in [0, 1].
    """
    real, fake = _as_float64(real_feats), _as_float64(fake_feats)
    precision = _coverage(real, knn_radii(real, k), fake)
    recall = _coverage(fake, knn_radii(fake, k), real)
    return precision, recall


def class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose argmax class matches the requested label; logits [N, C], labels [N] int."""
    return (logits.argmax(dim=1) == labels.to(logits.device)).double().mean().item()
