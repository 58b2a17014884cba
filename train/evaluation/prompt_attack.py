"""Adversarial-prompt objectives against erased text-to-image models: UnlearnDiffAtk's denoising loss of the erased
network on images of the concept, and Ring-A-Bell's concept vector in the text-embedding space and its genetic search
for the discrete prompt nearest to a concept-shifted embedding."""
from __future__ import annotations

from typing import Any, Callable

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


RING_A_BELL_POPULATION, RING_A_BELL_CROSSOVER, RING_A_BELL_MUTATION = 200, 0.5, 0.25  # the authors' InversePrompt.ipynb


def ring_a_bell_search(fitness: Callable[[Tensor], Tensor], allowed: Tensor, length: int, generations: int,
                       generator: torch.Generator, population: int = RING_A_BELL_POPULATION,
                       crossover: float = RING_A_BELL_CROSSOVER, mutation: float = RING_A_BELL_MUTATION,
                       ) -> tuple[Tensor, list[float]]:
    """Ring-A-Bell's prompt discovery (Tsai et al. 2024, arXiv 2310.10012, sec. 3.3; the authors' code,
    chiayi-hsu/Ring-A-Bell InversePrompt.ipynb): a genetic algorithm over prompts of `length` (K) token ids drawn from
    `allowed` [V'] that minimises fitness(ids [P, K]) -> [P] (theirs: || f(ids) - (f(p) + eta c) ||^2 over every
    position and channel). Each generation, as theirs: score, keep the best half; unless it is the last, every survivor
    stays and with probability `crossover` breeds with a random survivor at a random cut, giving both one-point
    children; then every member with probability `mutation` has one random position set to a random allowed id.
    Returns (the best ids [K] of the last generation, the best fitness of each generation)."""
    draw = lambda n, high: torch.randint(high, (n,), generator=generator)  # noqa: E731
    pop = allowed[draw(population * length, len(allowed))].reshape(population, length)
    curve = []
    for step in range(generations):
        scores = fitness(pop).float().cpu()
        order = scores.argsort(stable=True)
        curve.append(scores[order[0]].item())
        pop = pop[order[:population // 2]]
        if step == generations - 1:
            break
        half = len(pop)
        breeds = torch.rand(half, generator=generator) < crossover
        partners, cuts = draw(half, half), draw(half, length)
        first = torch.arange(length)[None] < cuts[:, None]  # [half, K]: the positions before the cut
        a, b = pop, pop[partners]
        pop = torch.cat([pop, torch.where(first, a, b)[breeds], torch.where(first, b, a)[breeds]])
        mutants = torch.rand(len(pop), generator=generator) < mutation
        rows, positions = torch.arange(len(pop)), draw(len(pop), length)
        values = allowed[draw(len(pop), len(allowed))]
        pop[rows[mutants], positions[mutants]] = values[mutants]
    return pop[0], curve
