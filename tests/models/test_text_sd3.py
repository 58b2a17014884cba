"""SD3 (MMDiT transformer, CLIP-L + CLIP-G + T5 or no T5, rectified flow with shift, VAE shift factor) against
diffusers' StableDiffusion3Pipeline loaded from the same tiny folder.

Conventions converted at the edge: diffusers' noise_pred = uncond + g (text - uncond) is our CFG with w = g.
Our flow samplers walk t_i = shift(1 - i/N) (RectifiedFlow.sampling_times) to 0; the pipeline is given the
unshifted sigmas 1 - i/N, which its scheduler shifts the same way (its default grid ends at sigma 1/1000).
"""
from __future__ import annotations

import pytest
import torch

from guidance.guided import GuidedDenoiser
from guidance.guiders import build_guider
from guidance.schedules import RectifiedFlow
from models.text_encoders import PromptEncoder
from models.text_to_image import TextToImage

PROMPTS = ["a cat", "the dog"]
L_T5 = 32
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no_t5"])
def sd3(request, tiny_sd_folder):
    from diffusers import StableDiffusion3Pipeline

    path, use_t5 = tiny_sd_folder("sd3"), request.param
    extra = {} if use_t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe, TextToImage.from_pretrained(str(path), use_t5=use_t5, max_sequence_length=L_T5), use_t5


def test_prompt_encoding_matches_the_pipeline(sd3):
    pipe, t2i, use_t5 = sd3
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True, max_sequence_length=L_T5)
    cond, null = t2i.encoder.encode(PROMPTS), t2i.net.null_cond(t2i.encoder.encode(PROMPTS))
    assert cond["encoder_hidden_states"].shape == (2, 16 + L_T5, 48)  # CLIP tokens, then T5 tokens
    for ours, theirs in ((cond["encoder_hidden_states"], pos), (cond["pooled_projections"], pooled),
                         (null["encoder_hidden_states"], neg), (null["pooled_projections"], neg_pooled)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert bool(cond["encoder_hidden_states"][:, 16:].any()) == use_t5  # no T5: zeros in its place
    assert isinstance(t2i.schedule, RectifiedFlow) and t2i.schedule.shift == 3.0 and t2i.parameterization == "flow"
    assert t2i.vae.shift_factor == pytest.approx(0.0609) and t2i.vae.scaling_factor == pytest.approx(1.5305)


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_one_step_cfg_equals_the_pipeline(sd3, negative):
    pipe, t2i, _ = sd3
    g = 4.0
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = pipe(PROMPTS, negative_prompt=None if negative is None else [negative] * 2, num_inference_steps=1,
                  guidance_scale=g, latents=x.clone(), output_type="latent", max_sequence_length=L_T5).images
    cond, neg = t2i.conditions(PROMPTS, negative_prompt=negative)
    ours = GuidedDenoiser(t2i.denoiser(), build_guider("cfg", space="flow"))(x, torch.ones(2), cond, g, neg_cond=neg).x0
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_flow_sampling_equals_the_pipeline(sd3, sampler):
    pipe, t2i, _ = sd3
    g, n = 5.0, 4
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigmas = torch.linspace(1, 0, n + 1)[:-1].tolist()  # unshifted; the pipeline's scheduler applies shift 3
    theirs = pipe(PROMPTS, negative_prompt=["blurry"] * 2, sigmas=sigmas, guidance_scale=g, latents=x.clone(),
                  output_type="latent", max_sequence_length=L_T5).images
    ours = t2i.generate(PROMPTS, w=g, steps=n, sampler=sampler, negative_prompt="blurry", noise=x, decode=False)
    torch.testing.assert_close(ours, theirs, **TOL)
    wrong = t2i.generate(PROMPTS, w=g - 0.5, steps=n, sampler=sampler, negative_prompt="blurry", noise=x, decode=False)
    assert (wrong - theirs).abs().max() > 100 * TOL["atol"]
    images = t2i.vae.decode(ours)  # latents / scaling + shift, as the pipeline decodes
    expected = pipe.vae.decode(theirs / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    torch.testing.assert_close(images, expected, **TOL)


def test_sd3_adapter_null_drop_and_layout(sd3):
    _, t2i, _ = sd3
    net = t2i.net
    assert all(k.startswith("transformer.") for k in net.state_dict())
    cond = t2i.encoder.encode(["a cat"] * 200)
    null = net.null_cond(cond)
    dropped = net.drop_cond(cond, 0.5, torch.Generator().manual_seed(0))
    for k in ("encoder_hidden_states", "pooled_projections"):
        is_null = (dropped[k] == null[k]).flatten(1).all(1)
        assert bool(((dropped[k] == cond[k]).flatten(1).all(1) ^ is_null).all())
    assert 0.35 < is_null.float().mean().item() < 0.65
    with pytest.raises(ValueError, match="without T5 needs t5_dim"):
        PromptEncoder("sd3", [None] * 3, [t2i.encoder.encoders[0], t2i.encoder.encoders[1], None])
