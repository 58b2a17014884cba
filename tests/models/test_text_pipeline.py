"""Guided prediction and sampling with prompts and negative prompts against diffusers' own Stable Diffusion
pipelines loaded from the same tiny folders.

Conventions converted at the edge: diffusers' noise_pred = uncond + g (text - uncond) is our CFG with w = g.
Our DDIM walks the "trailing" grid (999, 749, 499, 249 for 4 steps) and ends at clean data, so the
pipelines' DDIM scheduler is re-configured with timestep_spacing="trailing" and set_alpha_to_one=True
(the saved folders keep the real SD config: leading spacing, steps_offset 1).
"""
from __future__ import annotations

import pytest
import torch

from guidance.guided import GuidedDenoiser
from guidance.guiders import build_guider
from models.text_to_image import TextToImage

PROMPTS = ["a cat", "the dog"]
TOL = dict(rtol=1e-4, atol=1e-4)


def _pipeline(path, kind):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(path, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["sd15", "sdxl", "sd2"])
def model(request, tiny_sd_folder):
    kind = request.param
    path = tiny_sd_folder(kind)
    return kind, _pipeline(path, kind), TextToImage.from_pretrained(str(path))


def _latents(seed=0, b=2):
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("negative", [None, ["blurry", "a cat"]])
def test_one_step_cfg_equals_the_pipeline(model, negative):
    """One DDIM step from t = 999 to clean data returns the guided x0 prediction: ours from GuidedDenoiser
    (cond and negative/null batched into one forward) against the pipeline's output latents."""
    kind, pipe, t2i = model
    g, x = 5.0, _latents()
    theirs = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=1, guidance_scale=g, latents=x.clone(),
                  output_type="latent").images
    cond, neg = t2i.conditions(PROMPTS, negative_prompt=negative)
    guided = GuidedDenoiser(t2i.denoiser(), build_guider("cfg"))
    ours = guided(x, torch.ones(2), cond, g, neg_cond=neg).x0
    assert guided.nfe == 2
    torch.testing.assert_close(ours, theirs, **TOL)
    if kind == "sd2":
        assert t2i.parameterization == "v"


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_ddim_sampling_equals_the_pipeline(model, negative):
    kind, pipe, t2i = model
    g, x = 7.5, _latents(1)
    theirs = pipe(PROMPTS, negative_prompt=None if negative is None else [negative] * 2, num_inference_steps=4,
                  guidance_scale=g, latents=x.clone(), output_type="latent").images
    ours = t2i.generate(PROMPTS, w=g, steps=4, negative_prompt=negative, noise=x, decode=False)
    torch.testing.assert_close(ours, theirs, **TOL)
    if kind == "sd15":  # decoding: the pipeline's VAE decode of the same latents
        images = t2i.generate(PROMPTS, w=g, steps=4, negative_prompt=negative, noise=x)
        expected = pipe.vae.decode(theirs / pipe.vae.config.scaling_factor).sample
        assert images.shape == (2, 3, 16, 16)
        torch.testing.assert_close(images, expected, **TOL)


def test_perp_neg_with_several_negative_prompts(tiny_sd_folder):
    """Perp-Neg with two negative prompts, checked against the rule written out on the network's own eps
    (Armandpour et al. 2023: e = e_null + w (e_pos - sum_i w_i e_i_perp)), and reducing to CFG when the
    negative weights are 0."""
    t2i = TextToImage.from_pretrained(str(tiny_sd_folder("sd15")), with_vae=False)
    x, t, w = _latents(2), torch.tensor([0.7, 0.3]), 4.0
    negs = ["blurry", ["a dog", "a cat"]]
    cond, neg = t2i.conditions(PROMPTS, negatives=negs)
    den = t2i.denoiser()
    guided = GuidedDenoiser(den, build_guider("perp_neg", neg_weights=[1.0, 0.5]))
    ours = guided(x, t, cond, w, neg_cond=neg).eps
    assert guided.nfe == 4  # cond, null and two negatives, batched into one forward
    e_c, e_0 = den(x, t, cond).eps, den(x, t, t2i.net.null_cond(cond)).eps
    pos = e_c - e_0
    step = pos.clone()
    for w_i, n in zip([1.0, 0.5], neg):
        d = den(x, t, n).eps - e_0
        dot = (d * pos).flatten(1).sum(1) / (pos * pos).flatten(1).sum(1)
        step = step - w_i * (d - dot[:, None, None, None] * pos)
    torch.testing.assert_close(ours, e_0 + w * step, rtol=1e-4, atol=1e-5)
    zero = GuidedDenoiser(den, build_guider("perp_neg", neg_weights=[0.0, 0.0]))(x, t, cond, w, neg_cond=neg).eps
    torch.testing.assert_close(zero, e_0 + w * pos, rtol=1e-4, atol=1e-5)
    images = t2i.generate(PROMPTS, w=w, steps=2, guider=build_guider("perp_neg", neg_weights=[1.0, 0.5]),
                          negatives=negs, noise=x)
    assert images.shape == x.shape and torch.isfinite(images).all()


def test_negative_prompt_options_are_checked(tiny_sd_folder):
    t2i = TextToImage.from_pretrained(str(tiny_sd_folder("sd15")), with_vae=False)
    with pytest.raises(ValueError, match="not both"):
        t2i.conditions(PROMPTS, negative_prompt="x", negatives=["y"])
    with pytest.raises(ValueError, match="one entry per prompt"):
        t2i.conditions(PROMPTS, negative_prompt=["x", "y", "z"])
