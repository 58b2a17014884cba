"""Adversarial-prompt objectives against erased text-to-image models: UnlearnDiffAtk's denoising loss of the erased
network on images of the concept, and Ring-A-Bell's concept vector in the text-embedding space."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from guidance.denoiser import Denoiser
from guidance.schedules import _bcast


def unlearndiffatk_loss(erased: Denoiser, x0: Tensor, cond: Any, t: Tensor, eps: Tensor) -> Tensor:
    """UnlearnDiffAtk's attack loss (Zhang et al. 2024, arXiv 2310.11868: the erased model used as its own diffusion
    classifier; the authors' code, OPTML-Group/Diffusion-MU-Attack src/tasks/classifier_.py `get_loss`, criterion l2):
    mean over the batch and every element of || eps_erased(x_t | c') - eps ||^2 with x_t = alpha(t) x0 + sigma(t) eps,
    minimised over the adversarial prompt c'. The prediction is read as eps whatever the network predicts, so the loss
    is the paper's for eps networks and its eps-space reading for v or flow ones.

    erased: the erased model's Denoiser (frozen; gradients reach `cond` only); x0: [B, C, H, W] images (a latent
    model's latents) of the concept; cond: the attacked condition [B]; t: [B] in [0, 1]; eps: [B, C, H, W] ~ N(0, I).
    Returns a scalar (float32 or wider).
    """
    a, s = erased.schedule.alpha_sigma(_bcast(t, x0))
    x_t = a * x0 + s * eps
    pred = erased(x_t, t, cond).read("eps")
    return (pred - eps.to(pred.dtype)).pow(2).mean()


def concept_vector(with_concept: Tensor, without_concept: Tensor) -> Tensor:
    """Ring-A-Bell's concept vector (Tsai et al. 2024, arXiv 2310.10012, sec. 3.2): the mean over N prompt pairs that
    differ only by the concept of the difference of their text embeddings, c = 1/N sum_i (f(p_i^+) - f(p_i^-)).
    with_concept, without_concept: [N, L, D] text-encoder outputs of the pairs. Returns [L, D]."""
    if with_concept.shape != without_concept.shape or with_concept.ndim != 3:
        raise ValueError(f"the concept vector takes two [N, L, D] embeddings of paired prompts, got "
                         f"{tuple(with_concept.shape)} and {tuple(without_concept.shape)}")
    return (with_concept.float() - without_concept.float()).mean(0)


def ring_a_bell_embedding(prompt_embedding: Tensor, vector: Tensor, strength: float) -> Tensor:
    """Ring-A-Bell's problematic prompt embedding (arXiv 2310.10012, sec. 3.2): f(p) + eta c, the prompt's text
    embedding [B, L, D] moved by `strength` (eta) along the concept vector c [L, D]. Returns [B, L, D]."""
    return (prompt_embedding.float() + float(strength) * vector.to(prompt_embedding.device)).to(prompt_embedding.dtype)


def nearest_tokens(soft: Tensor, vocabulary: Tensor) -> Tensor:
    """Ids [k] of the vocabulary embeddings [V, D] nearest (Euclidean) to the soft token embeddings [k, D]: the hard
    tokens a continuous attack's tokens read as (UnlearnDiffAtk projects its relaxed tokens onto one-hot vocabulary
    rows the same way, by argmax, before evaluating)."""
    return torch.cdist(soft.detach().float(), vocabulary.detach().float()).argmin(1)
