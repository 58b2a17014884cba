"""Perturbed-attention guidance (Ahn et al. 2024, arXiv 2403.17377) on the text adapters, against diffusers' own PAG
pipelines loaded from the same tiny folders (StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline,
StableDiffusion3PAGPipeline: same layers, CFG scale and PAG scale, 4 sampling steps), and for Flux (no diffusers PAG
pipeline) the defining property of the perturbed map: an image token's output of a perturbed layer no longer depends on
the other image tokens.

Conventions converted at the edge: diffusers' uncond + g (text - uncond) + s (text - perturbed) is our PAG guider
with w = g, pag_scale = s; the UNet pipelines' DDIM walks our "trailing" grid, SD3's scheduler is given the unshifted
sigmas 1 - i/N (see tests/models/test_text_pipeline.py and test_text_sd3.py).
"""
from __future__ import annotations

import pytest
import torch

from guidance.guiders import build_guider
from models.text_to_image import TextToImage

PROMPTS = ["a cat", "the dog"]
TOL = dict(rtol=1e-4, atol=1e-4)
L_T5 = 32


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_unet_pag_sampling_equals_the_diffusers_pag_pipeline(tiny_sd_folder, kind):
    from diffusers import DDIMScheduler, StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

    path = tiny_sd_folder(kind)
    cls = StableDiffusionXLPAGPipeline if kind == "sdxl" else StableDiffusionPAGPipeline
    pipe = cls.from_pretrained(path, local_files_only=True, pag_applied_layers=["mid"])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    pipe.set_progress_bar_config(disable=True)
    t2i = TextToImage.from_pretrained(str(path))
    assert t2i.net.pag_layers == ["mid"]  # the default: the mid block's self-attention, as the pipelines'
    g, s, x = 5.0, 3.0, _noise(0)
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=g, pag_scale=s, latents=x.clone(),
                  output_type="latent").images
    ours = t2i.generate(PROMPTS, w=g, steps=4, guider=build_guider("pag", pag_scale=s), noise=x, decode=False)
    torch.testing.assert_close(ours, theirs, **TOL)
    cfg_only = t2i.generate(PROMPTS, w=g, steps=4, noise=x, decode=False)
    assert (cfg_only - theirs).abs().max() > 100 * TOL["atol"]  # the PAG term matters at this scale


@pytest.mark.parametrize("use_t5", [True, False], ids=["t5", "no_t5"])
def test_sd3_pag_sampling_equals_the_diffusers_pag_pipeline(tiny_sd_folder, use_t5):
    from diffusers import StableDiffusion3PAGPipeline

    path = tiny_sd_folder("sd3")
    extra = {} if use_t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3PAGPipeline.from_pretrained(path, local_files_only=True, pag_applied_layers=["blocks.0"],
                                                       **extra)
    pipe.set_progress_bar_config(disable=True)
    t2i = TextToImage.from_pretrained(str(path), use_t5=use_t5, max_sequence_length=L_T5)
    t2i.net.pag_layers = ["blocks.0"]  # the tiny transformer has one joint block
    g, s, n, x = 4.0, 2.0, 4, _noise(1)
    sigmas = torch.linspace(1, 0, n + 1)[:-1].tolist()
    theirs = pipe(PROMPTS, negative_prompt=["blurry"] * 2, sigmas=sigmas, guidance_scale=g, pag_scale=s,
                  latents=x.clone(), output_type="latent", max_sequence_length=L_T5).images
    ours = t2i.generate(PROMPTS, w=g, steps=n, sampler="euler", guider=build_guider("pag", pag_scale=s),
                        negative_prompt="blurry", noise=x, decode=False)
    torch.testing.assert_close(ours, theirs, **TOL)
    cfg_only = t2i.generate(PROMPTS, w=g, steps=n, sampler="euler", negative_prompt="blurry", noise=x, decode=False)
    assert (cfg_only - theirs).abs().max() > 100 * TOL["atol"]


@pytest.fixture(scope="module")
def flux(tiny_sd_folder):
    return TextToImage.from_pretrained(str(tiny_sd_folder("flux")), max_sequence_length=16)


@pytest.mark.parametrize("name", ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"])
def test_flux_perturbed_attention_makes_image_tokens_ignore_each_other(flux, name):
    """Ahn et al.'s identity map on the image-image block, at the layer: with the layer's inputs from a real forward,
    changing image token 0's input leaves the perturbed layer's output for every other image token unchanged, while
    the text still matters; without the perturbation every image token changes. A single block's sequence is
    [text, image] with no separate text input."""
    from models.pag_attention import perturbed_self_attention

    net, layer = flux.net, name.rsplit(".", 1)[0]
    cond = {**flux.encoder.encode(PROMPTS), "guidance": torch.full((2,), 3.5)}
    text = cond["encoder_hidden_states"].shape[1]
    attn, seen = net.transformer.get_submodule(name), {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        net(_noise(2), torch.full((2,), 700.0), cond)
    handle.remove()
    single = "encoder_hidden_states" not in seen
    first = text if single else 0  # where the image tokens start in hidden_states

    def image_out(perturb: bool, token0: float = 0.0, text_shift: float = 0.0):
        kw = {k: v for k, v in seen.items()}
        hs = kw["hidden_states"].clone()
        hs[:, first] += token0
        if single:
            hs[:, :text] += text_shift
        else:
            kw["encoder_hidden_states"] = kw["encoder_hidden_states"] + text_shift
        kw["hidden_states"] = hs
        with torch.no_grad(), perturbed_self_attention(net.transformer, [layer] if perturb else [], text):
            out = attn(**kw)
        return (out[0] if isinstance(out, tuple) else out)[:, first:]

    for perturb in (True, False):
        a, b = image_out(perturb), image_out(perturb, token0=1.0)
        others = (a[:, 1:] - b[:, 1:]).abs().max()
        assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3
        assert (others < 1e-6) if perturb else (others > 1e-4), (perturb, float(others))
    assert (image_out(True) - image_out(True, text_shift=1.0)).abs().max() > 1e-3  # image still attends to the text
    x, t = _noise(2), torch.full((2,), 700.0)
    net.pag_layers = [layer]
    with torch.no_grad():
        plain, perturbed = net(x, t, cond), net(x, t, cond, perturb="pag")
    assert torch.isfinite(perturbed).all() and (plain - perturbed).abs().max() > 1e-4
    assert all(type(m.processor).__name__ == "FluxAttnProcessor"  # restored after the perturbed pass
               for n, m in net.transformer.named_modules() if n.endswith(".attn"))


def test_flux_pag_guided_sampling_runs_three_branches(flux):
    flux.net.pag_layers = ["blocks.0"]  # double and single block 0
    guider = build_guider("pag", pag_scale=2.0)
    a = flux.generate(PROMPTS, w=3.0, steps=2, sampler="euler", guider=guider, noise=_noise(3), decode=False)
    b = flux.generate(PROMPTS, w=3.0, steps=2, sampler="euler", noise=_noise(3), decode=False)
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4


def test_a_perturbed_branch_differs_and_bad_layers_say_what_exists(tiny_sd_folder):
    t2i = TextToImage.from_pretrained(str(tiny_sd_folder("sd15")))
    cond = t2i.encoder.encode(PROMPTS)
    x, t = _noise(4), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        plain, perturbed = t2i.net(x, t, cond), t2i.net(x, t, cond, perturb="pag")
        assert torch.equal(t2i.net(x, t, cond), plain)  # the processors are restored
    assert (plain - perturbed).abs().max() > 1e-4
    t2i.net.pag_layers = ["down_blocks.9"]
    with pytest.raises(ValueError, match=r"matches no self-attention layer.*down_blocks\.1\.attentions\.0"):
        t2i.net(x, t, cond, perturb="pag")
