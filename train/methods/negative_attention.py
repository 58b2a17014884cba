"""Negative guidance for models sampled without an unconditional branch (guidance-distilled w-input students, one- or
few-step generators): their recipe run with NASA's cross-attention processors (a negative prompt,
models.nasa_attention) or NegToMe's self-attention processors (away from a reference sample, models.negtome_attention)."""
from __future__ import annotations

from torch import nn

from models.nasa_attention import check_alpha, cross_attention_modules, negative_away_attention
from models.negtome_attention import THRESHOLD, WINDOW, check_negtome, negative_token_merging, self_attention_modules
from train.methods.sampling import Recipe, Settings

NASA_RECIPES = ("w_input", "generator", "consistency")  # one evaluation per step, no unconditional branch


class NASASampling(Recipe):
    """`inner` (a WInputSampling or GeneratorSampling recipe) with its network's cross-attention layers running
    Negative-Away Steer Attention (Nguyen et al. 2024, SNOOPI, arXiv 2412.02687) against the negative condition:
    each step is still ONE network evaluation, called with the positive condition while the swapped processors hold
    the negative prompt's text tokens, so that every cross-attention layer returns Attn(Q, K+, V+) - alpha Attn(Q, K-, V-).

    network: the module whose cross-attention layers are swapped (the recipe's sampling network).
    alpha:   NASA's scale (>= 0; 0: the negative prompt has no effect).
    """

    def __init__(self, inner: Recipe, network: nn.Module, alpha: float):
        self.inner, self.network, self.alpha = inner, network, check_alpha(alpha)
        self.name = inner.name

    def resolve(self, scale=None, steps=None, sampler=None, guider=None, guider_params=None, eta=0.0,
                negative: bool = False) -> Settings:
        if not negative:
            raise ValueError("--nasa-scale steers away from a negative prompt: give one with --negative-prompt")
        return self.inner.resolve(scale, steps, sampler, guider, guider_params, eta, negative=False)

    def run(self, noise, cond, neg, s: Settings, generator, progress=False):
        """Samples [B, C, H, W] and network evaluations per sample; cond, neg: text conditions of B prompts each."""
        with negative_away_attention(self.network, neg["encoder_hidden_states"], self.alpha):
            return self.inner.run(noise, cond, None, s, generator, progress)

    def describe(self) -> dict:
        return {**self.inner.describe(), "nasa_scale": self.alpha}


def nasa_recipe(recipe: Recipe, network: nn.Module, alpha: float) -> NASASampling:
    """`recipe` with NASA at scale alpha, or a ValueError saying why it cannot apply: a recipe with an unconditional
    branch (its negative prompt goes to CFG), a network without cross-attention (class labels, SD3/Flux joint
    attention), a UNet that projects its text tokens before cross-attention."""
    check_alpha(alpha)
    if recipe.name not in NASA_RECIPES:
        raise ValueError(f"--nasa-scale is for models sampled with one evaluation per step and no unconditional branch "
                         f"(a w-input student, a consistency model or a one-/few-step generator), not recipe "
                         f"{recipe.name!r}; give its negative prompt with --negative-prompt alone"
                         + (" (CFG's negative branch)" if recipe.name == "cfg" else ""))
    conditioner = getattr(network, "conditioner", None)
    if type(conditioner).__name__ == "ClassConditioner":
        raise ValueError("--nasa-scale needs cross-attention to a text prompt; this class-label model has none (its "
                         "class enters through a class embedding)")
    if not cross_attention_modules(network):
        raise ValueError(f"--nasa-scale needs cross-attention layers; {type(network).__name__} has none (SD3/Flux "
                         f"attend to text through joint attention, which NASA does not define)")
    if any(getattr(m, "encoder_hid_proj", None) is not None for m in network.modules()):
        raise ValueError("--nasa-scale: this UNet projects its text tokens (encoder_hid_proj) before cross-attention, "
                         "which NASA's negative tokens would bypass")
    return NASASampling(recipe, network, alpha)


class NegToMeSampling(Recipe):
    """`inner` (a WInputSampling or GeneratorSampling recipe) with its network's self-attention layers running Negative
    Token Merging (Singh et al. 2024, arXiv 2412.01339) in the authors' diversity mode: in every batch the first sample
    is the reference and each token of the others is pushed away from its best-matching reference token
    (models.negtome_attention.negative_token_merge) while the network time is in `window`. Still one network
    evaluation per step; the first sample of each batch is exactly what the model gives without NegToMe.

    alpha: NegToMe's scale (>= 0; the authors' 0.9). threshold: the cosine above which a token is pushed (0.65).
    """

    def __init__(self, inner: Recipe, network: nn.Module, alpha: float, threshold: float = THRESHOLD,
                 window: tuple[float, float] = WINDOW):
        check_negtome(alpha, threshold, window)
        self.inner, self.network, self.alpha, self.threshold, self.window = inner, network, alpha, threshold, window
        self.name = inner.name

    def resolve(self, scale=None, steps=None, sampler=None, guider=None, guider_params=None, eta=0.0,
                negative: bool = False) -> Settings:
        return self.inner.resolve(scale, steps, sampler, guider, guider_params, eta, negative)

    def run(self, noise, cond, neg, s: Settings, generator, progress=False):
        """Samples [B, C, H, W] (sample 0 the reference of the others) and network evaluations per sample."""
        with negative_token_merging(self.network, self.alpha, self.threshold, self.window):
            return self.inner.run(noise, cond, neg, s, generator, progress)

    def describe(self) -> dict:
        return {**self.inner.describe(), "negtome_scale": self.alpha}


def negtome_recipe(recipe: Recipe, network: nn.Module, alpha: float) -> NegToMeSampling:
    """`recipe` with NegToMe at scale alpha (the authors' threshold and time window), or a ValueError saying why it
    cannot apply: a recipe whose batches mix CFG branches, a network without UNet self-attention (SD3/Flux)."""
    if recipe.name not in NASA_RECIPES:
        raise ValueError(f"--negtome-scale is for models sampled with one evaluation per step and no unconditional "
                         f"branch (a w-input student, a consistency model or a one-/few-step generator), not recipe "
                         f"{recipe.name!r}")
    if not self_attention_modules(network):
        raise ValueError(f"--negtome-scale needs UNet self-attention layers; {type(network).__name__} has none "
                         f"(SD3/Flux joint attention is not implemented here)")
    return NegToMeSampling(recipe, network, alpha)
