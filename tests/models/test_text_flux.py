"""Flux (FLUX.1-dev layout: CLIP pooled + T5 tokens, packed 2x2 latent tokens, guidance embedding, dynamic shift)
against diffusers' FluxPipeline loaded from the same tiny folder.

Conventions converted at the edge: the pipeline's guidance_scale is the network's guidance INPUT (our
cond["guidance"], one evaluation per step with the "conditional" guider); its true_cfg_scale with a negative
prompt is our CFG w. The pipeline takes and returns packed latents [B, (h/2)(w/2), 4C]; ours are [B, C, h, w].
Its default sigma grid linspace(1, 1/N, N), shifted by exp(mu), equals RectifiedFlow(shift=exp(mu)).sampling_times.
"""
from __future__ import annotations

import pytest
import torch

from guidance.guided import GuidedDenoiser
from guidance.guiders import build_guider
from models.pretrained import flux_shift, schedule_from_pretrained
from models.text_to_image import TextToImage
from models.text_transformer import pack_latents, unpack_latents

PROMPTS = ["a cat", "the dog"]
L_T5, SIZE = 24, 16
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def flux(tiny_sd_folder):
    from diffusers import FluxPipeline

    path = tiny_sd_folder("flux")
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, TextToImage.from_pretrained(str(path), max_sequence_length=L_T5, resolution=(SIZE, SIZE)), path


def _run(pipe, x, **kw):
    packed = pack_latents(x)
    out = pipe(PROMPTS, height=SIZE, width=SIZE, latents=packed.clone(), output_type="latent",
               max_sequence_length=L_T5, **kw).images
    return unpack_latents(out, x.shape[-2], x.shape[-1])


def test_packing_prompts_and_schedule(flux):
    pipe, t2i, path = flux
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(pack_latents(x), pipe._pack_latents(x, 2, 4, 8, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(pack_latents(x), 8, 8), x, rtol=0, atol=0)
    pos, pooled, _ = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=L_T5)
    cond = t2i.encoder.encode(PROMPTS)
    torch.testing.assert_close(cond["encoder_hidden_states"], pos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)
    assert t2i.parameterization == "flow" and t2i.schedule.shift == pytest.approx(flux_shift(path, 16))
    with pytest.raises(ValueError, match="dynamic shifting"):
        schedule_from_pretrained(path)
    with pytest.raises(ValueError, match="guidance-distilled"):
        t2i.net(x, torch.full((2,), 500.0), cond)


def test_one_step_with_embedded_guidance_equals_the_pipeline(flux):
    pipe, t2i, _ = flux
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = _run(pipe, x, num_inference_steps=1, guidance_scale=3.5)
    cond = {**t2i.encoder.encode(PROMPTS), "guidance": torch.full((2,), 3.5)}
    guided = GuidedDenoiser(t2i.denoiser(), build_guider("conditional"))
    ours = guided(x, torch.ones(2), cond, 1.0).x0
    assert guided.nfe == 1  # the guidance is an input, not a second branch
    torch.testing.assert_close(ours, theirs, **TOL)
    other = guided(x, torch.ones(2), {**cond, "guidance": torch.full((2,), 1.0)}, 1.0).x0
    assert (other - theirs).abs().max() > 100 * TOL["atol"]


@pytest.mark.parametrize("true_cfg", [None, 2.5])
def test_sampling_equals_the_pipeline(flux, true_cfg):
    pipe, t2i, _ = flux
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    if true_cfg is None:
        theirs = _run(pipe, x, num_inference_steps=4, guidance_scale=3.5)
        ours = t2i.generate(PROMPTS, steps=4, guider="conditional", sampler="euler", noise=x, decode=False,
                            embedded_guidance=3.5)
    else:  # true CFG on top of the embedded guidance, with a negative prompt
        theirs = _run(pipe, x, num_inference_steps=4, guidance_scale=3.5, true_cfg_scale=true_cfg,
                      negative_prompt=["blurry"] * 2)
        ours = t2i.generate(PROMPTS, w=true_cfg, steps=4, guider="cfg", sampler="euler", negative_prompt="blurry",
                            noise=x, decode=False, embedded_guidance=3.5)
    torch.testing.assert_close(ours, theirs, **TOL)
    images = t2i.vae.decode(ours)
    assert images.shape == (2, 3, SIZE, SIZE) and torch.isfinite(images).all()
