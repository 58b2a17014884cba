"""Ring-A-Bell against the prompts of an erased text-to-image model: the concept vector of prompt pairs through the
model's own text encoder, each prompt's concept-shifted embedding, the discrete prompt a genetic search finds nearest
to it, and the report's fields.

Reference: Tsai et al. 2024, "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?" (arXiv
2310.10012), the authors' code chiayi-hsu/Ring-A-Bell (Get_Concept_Vector.ipynb, InversePrompt.ipynb). Model-agnostic:
it never runs the erased network. The concept vector c is the mean text-embedding difference of prompt pairs with and
without the concept (their nudity and violence pairs; for the text digits' class prompts, the concept digit's prompt
against each other digit's in the same template); the attacked prompt's target is its embedding moved along c,
f(p) + eta c (theirs: eta = 3 for nudity, `cof = 3`; 5.5 for violence, their
data/InvPrompt/Violence/Violence_eta_5.5_K_77.csv), and the problematic prompt is the K-token prompt a genetic
algorithm finds nearest to that target (theirs: K = 16, population 200, 3000 generations). Both are evaluated: the
target embedding itself (the continuous relaxation, the `attacked` rate) and the discrete prompt as its token ids (the
authors' attack, the `nearest_words` rate).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from train.evaluation.attack_config import AttackSettings
from train.evaluation.attack_embeddings import (PromptAttack, clip_text_encoder, discrete_prompt, token_states,
                                                 vocabulary)
from train.evaluation.prompt_attack import concept_vector, ring_a_bell_embedding, ring_a_bell_search


def ring_a_bell_vector(module, rs, classes: Sequence[int], pairs: Sequence[tuple[str, str]] = ()) -> tuple[Tensor, int]:
    """(Ring-A-Bell's concept vector c [L, D], the number of prompt pairs it averages; arXiv 2310.10012 sec. 3.2,
    prompt_attack.concept_vector) through the model's own text encoder: from `pairs` (with, without the concept) when
    given, else from the class prompts of a RequestSet, each prompt of the concept classes paired with each prompt of
    the other classes (the same template with another digit: c = mean f(concept's) - mean f(others'))."""
    if not pairs:
        if rs.labels is None:
            raise ValueError("--attack ringabell on --prompt/--prompts needs the concept's prompt pairs: add "
                             "--attack-pairs FILE (lines 'prompt with the concept<TAB>the same prompt without it')")
        labels = rs.labels.tolist()
        concept = list(dict.fromkeys(p for p, c in zip(rs.prompts, labels) if c in classes))
        others = list(dict.fromkeys(p for p, c in zip(rs.prompts, labels) if c not in classes))
        if not others:
            raise ValueError("--attack ringabell pairs the concept digits' prompts with the other digits'; this set "
                             "has no other digit: sample more classes or give --attack-pairs FILE")
        pairs = [(a, b) for a in concept for b in others]
    with torch.no_grad():
        with_concept = module.encode([a for a, _ in pairs])["encoder_hidden_states"]
        without = module.encode([b for _, b in pairs])["encoder_hidden_states"]
    return concept_vector(with_concept, without), len(pairs)


def ring_a_bell(module, prompt: str, vector: Tensor, settings: AttackSettings) -> PromptAttack:
    """Ring-A-Bell against one prompt of a text module (arXiv 2310.10012 sec. 3.2-3.3; the authors'
    InversePrompt.ipynb):
    the attacked states are the prompt's embedding moved along the concept vector [L, D], f(p) + eta c
    (prompt_attack.ring_a_bell_embedding; eta = 0: the prompt's own condition, bit for bit), and with settings.steps
    generations the genetic search (prompt_attack.ring_a_bell_search) finds the K-token prompt whose embedding is
    nearest to it in squared distance over every position and channel, evaluated as its ids (discrete_prompt) with the
    tokenizer's padding after the end token (theirs: SD 1.4's, the end token)."""
    tokenizer, text_encoder = clip_text_encoder(module)
    with torch.no_grad():
        plain = module.encode([prompt])["encoder_hidden_states"]
    states = ring_a_bell_embedding(plain, vector, settings.strength)[0]
    result = PromptAttack(prompt, plain.new_zeros(0, plain.shape[-1]), states, objective="fitness")
    if settings.steps == 0:
        return result
    vocab, allowed = vocabulary(tokenizer, text_encoder)
    target = states.float()

    def fitness(ids: Tensor) -> Tensor:  # [P, K] -> [P]: || f(ids) - (f(p) + eta c) ||^2, the authors' `fitness`
        found = token_states(tokenizer, text_encoder, [""] * len(ids), vocab[ids.to(vocab.device)])
        return (found.float() - target).pow(2).sum((1, 2))

    gen = torch.Generator().manual_seed(settings.seed + 1)
    with torch.no_grad():
        ids, result.loss_curve = ring_a_bell_search(fitness, allowed, settings.tokens, settings.steps, gen)
        result.loss_plain = (plain[0].float() - target).pow(2).sum().item()
        result.loss_attacked = fitness(ids[None]).item()
    result.loss_initial = result.loss_curve[0]
    result.nearest_ids = ids.tolist()
    result.nearest_words = tokenizer.convert_ids_to_tokens(result.nearest_ids)
    result.nearest_prompt, result.nearest_states, result.nearest_roundtrip = discrete_prompt(
        tokenizer, text_encoder, result.nearest_ids)
    return result


def ring_a_bell_attacks(module, rs, prompts: Sequence[str], classes: Sequence[int],
                        settings: AttackSettings) -> tuple[dict[str, PromptAttack], dict]:
    """Ring-A-Bell against each of `prompts` of a RequestSet with one concept vector (ring_a_bell_vector: from
    settings.concept_pairs, else the set's class prompts of the concept `classes` against the others'): ({prompt: its
    PromptAttack}, the report's fields: the number of concept pairs and the concept vector's norm)."""
    vector, pairs = ring_a_bell_vector(module, rs, classes, settings.concept_pairs)
    fields = {"concept_pairs": pairs, "concept_vector_norm": vector.norm().item()}
    return {p: ring_a_bell(module, p, vector, settings) for p in prompts}, fields
