"""UnlearnDiffAtk's soft-token attack on one prompt of an erased text-to-image model: learnable token embeddings
prepended to the prompt, optimised with Adam against the erased network's denoising loss on images of the concept, and
their nearest vocabulary tokens.

Reference: Zhang et al. 2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy To Generate
Unsafe Images ... For Now" (arXiv 2310.11868), and the authors' code OPTML-Group/Diffusion-MU-Attack
(src/attackers/text_grad_.py, src/tasks/classifier_.py). The authors optimise k = 3 prefix tokens (insertion
`prefix_k`, after the start token) as distributions over the vocabulary, sampled one-hot with a straight-through
estimator and projected to the simplex, Adam lr 0.01; their target images are the original model's generations of the
prompt; t runs over 50 timesteps 10, 30, ..., 990 of 1000. Here the k tokens are continuous vectors in the text
encoder's input embedding space (the relaxation without the one-hot projection: a stronger attacker), initialised at
random vocabulary tokens, with t ~ U[0.01, 0.99] and fresh noise each step; their nearest vocabulary tokens are
evaluated too (the hard prompt a discrete attack would read off), as the token ids themselves
(train.evaluation.attack_embeddings.discrete_prompt). The text encoder and the erased network are frozen: gradients
reach the k vectors only.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from guidance.guided import GuidedDenoiser
from guidance.guiders import build_guider
from guidance.samplers import sample
from train.evaluation.attack_config import AttackSettings
from train.evaluation.attack_embeddings import (PromptAttack, clip_text_encoder, discrete_prompt, token_states,
                                                 vocabulary)
from train.evaluation.prompt_attack import nearest_tokens, unlearndiffatk_loss

DEFAULT_SCALE, DEFAULT_STEPS = 2.0, 50  # the guided recipes' defaults (train.methods.sampling), for the target images
T_RANGE = (0.01, 0.99)  # the authors' timesteps 10 .. 990 of 1000


def original_denoiser(module):
    """The model before erasure (an erasure module's `frozen`; any other module's own sampling network)."""
    frozen = getattr(module, "frozen", None)
    return frozen if frozen is not None else module.sampling_denoiser()


@torch.no_grad()
def concept_samples(module, prompt: str, n: int, scale: float | None, steps: int | None, seed: int) -> Tensor:
    """n samples [n, C, h, w] (a latent model's latents: the space the loss is computed in) of `prompt` from the
    ORIGINAL model (CFG at `scale`, DDIM with `steps`): UnlearnDiffAtk's target images."""
    guided = GuidedDenoiser(original_denoiser(module), build_guider("cfg"))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *module.sample_shape(), generator=gen).to(module.device)
    return sample(guided, noise, module.encode([prompt] * n), DEFAULT_SCALE if scale is None else scale,
                  DEFAULT_STEPS if steps is None else steps, generator=gen)


def _condition(module, prompt: str, states: Tensor, n: int) -> Any:
    cond = module.encode([prompt] * n)
    h = cond["encoder_hidden_states"]
    return {**cond, "encoder_hidden_states": states.to(h.dtype).expand(n, *states.shape[-2:])}


def unlearndiffatk(module, prompt: str, settings: AttackSettings, x0: Tensor | None = None, scale: float | None = None,
                   steps: int | None = None) -> PromptAttack:
    """Attack one prompt of a text module: the erased model is `module.sampling_denoiser()`, the target images x0
    [n, C, h, w] (default: settings.images samples of the prompt from the original model, `concept_samples`). With
    settings.steps == 0 nothing is learned and the prompt is the plain one (its states are encode_clip's)."""
    tokenizer, text_encoder = clip_text_encoder(module)
    erased = module.sampling_denoiser()
    with torch.no_grad():
        plain = token_states(tokenizer, text_encoder, [prompt])[0]
    if settings.steps == 0:  # the plain prompt's own condition, bit for bit
        states = module.encode([prompt])["encoder_hidden_states"][0]
        return PromptAttack(prompt, plain.new_zeros(0, plain.shape[-1]), states)
    if x0 is None:
        x0 = concept_samples(module, prompt, settings.images, scale, steps, settings.seed)
    x0 = x0.to(module.device)
    n = len(x0)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    vocab, allowed = vocabulary(tokenizer, text_encoder)
    init = allowed[torch.randint(len(allowed), (settings.tokens,), generator=gen)]
    soft = vocab[init.to(vocab.device)].detach().float().clone().requires_grad_(True)
    probe_t = torch.rand(settings.probe * n, generator=gen) * (T_RANGE[1] - T_RANGE[0]) + T_RANGE[0]
    probe_eps = torch.randn(settings.probe * n, *x0.shape[1:], generator=gen)

    def probe(states: Tensor) -> float:
        with torch.no_grad():
            xs = x0.repeat(settings.probe, 1, 1, 1)
            cond = _condition(module, prompt, states, len(xs))
            return unlearndiffatk_loss(erased, xs, cond, probe_t.to(xs.device), probe_eps.to(xs)).item()

    result = PromptAttack(prompt, soft, plain, loss_plain=probe(plain))
    result.loss_initial = probe(token_states(tokenizer, text_encoder, [prompt], soft.detach())[0])
    opt = torch.optim.Adam([soft], lr=settings.lr)
    with torch.enable_grad():
        for _ in range(settings.steps):
            t = torch.rand(n, generator=gen) * (T_RANGE[1] - T_RANGE[0]) + T_RANGE[0]
            eps = torch.randn(x0.shape, generator=gen)
            states = token_states(tokenizer, text_encoder, [prompt], soft)[0]
            loss = unlearndiffatk_loss(erased, x0, _condition(module, prompt, states, n), t.to(x0.device), eps.to(x0))
            (grad,) = torch.autograd.grad(loss, [soft])  # gradients reach the soft tokens only
            soft.grad = grad
            opt.step()
            result.loss_curve.append(loss.item())
    result.soft = soft.detach()
    with torch.no_grad():
        result.states = token_states(tokenizer, text_encoder, [prompt], result.soft)[0]
    result.loss_attacked = probe(result.states)
    result.nearest_ids = nearest_tokens(result.soft, vocab).tolist()
    result.nearest_words = tokenizer.convert_ids_to_tokens(result.nearest_ids)
    result.nearest_prompt, result.nearest_states, result.nearest_roundtrip = discrete_prompt(
        tokenizer, text_encoder, result.nearest_ids, prompt)
    return result
