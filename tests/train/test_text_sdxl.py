"""The methods on a tiny SDXL folder (two CLIP encoders, the pooled text_embeds and the micro-conditioning time_ids
as added conditions): guidance distillation, one-step DMD and erasure fitted through the CLI, and their exports
loaded by StableDiffusionXLPipeline, which generates the latents our sampler gives from the same noise."""
from __future__ import annotations

import diffusers
import pytest
import torch

from tests.train.text_fits import PROMPTS, pipeline_latents, randomised
from train.runtime.checkpoint import load_method
from train.export import export

TOL = dict(rtol=1e-4, atol=1e-4)


def sdxl_pipeline(folder):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_sdxl_folder_reads_as_a_teacher_with_added_conditions(t2i_workspace):
    teacher = load_method(t2i_workspace.model("sdxl"), expect="teacher")
    net = teacher.denoiser.net
    assert net.sdxl and net.vae_scale_factor == 2 and teacher.sample_shape() == (4, 8, 8)
    # the null condition is zeros (force_zeros_for_empty_prompt), of the pooled embedding too
    null = net.null_cond({"encoder_hidden_states": torch.ones(2, 16, 64), "text_embeds": torch.ones(2, 24)})
    assert not null["encoder_hidden_states"].any() and not null["text_embeds"].any()
    # the default time_ids are diffusers' (H, W, 0, 0, H, W) in pixels: 8 latent pixels of a 2x VAE
    x = torch.zeros(3, 4, 8, 8)
    assert net._time_ids(x).tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 3


def test_guidance_distillation_on_sdxl(t2i_workspace):
    student = load_method(t2i_workspace.fitted("gd", "sdxl"))
    latents, nfe = student.generate(PROMPTS, scale=3.0, steps=2)
    assert latents.shape == (2, 4, 8, 8) and nfe == 2 and torch.isfinite(latents).all()
    assert student.samples_to_images(latents).shape == (2, 3, 16, 16)
    net = student.student.net
    assert net.hooked == "unet.time_embedding" and net.base.sdxl
    torch.nn.init.normal_(net.w_embedding.linear_2.weight)  # w enters: a non-zero w-embedding changes the output
    a, _ = student.generate(PROMPTS, scale=1.0, steps=1)
    b, _ = student.generate(PROMPTS, scale=5.0, steps=1)
    assert (a - b).abs().max() > 1e-3


def test_one_step_distillation_on_sdxl(t2i_workspace):
    module = load_method(t2i_workspace.fitted("dmd", "sdxl"))
    latents, nfe = module.generate(PROMPTS)
    assert latents.shape == (2, 4, 8, 8) and nfe == 1 and torch.isfinite(latents).all()
    assert [n for n, _ in module.fake_score.named_parameters() if "lora_" in n]


def test_erasure_on_sdxl_trains_cross_attention_only(t2i_workspace):
    module = load_method(t2i_workspace.fitted("erase", "sdxl"))
    changed = [n for (n, p), q in zip(module.student.net.named_parameters(), module.frozen.net.parameters())
               if not torch.equal(p, q)]
    assert changed and all(".attn2." in n for n in changed), changed
    latents, nfe = module.generate(["a cat"], scale=3.0, steps=2, negative="the dog")
    assert latents.shape == (1, 4, 8, 8) and nfe == 4


def test_sdxl_exports_load_in_the_sdxl_pipeline_and_generate_what_we_sample(t2i_workspace, tmp_path):
    """The erased model (CFG with a negative prompt) and the one-step generator as full pipeline folders."""
    erased = load_method(t2i_workspace.fitted("erase", "sdxl"))
    pipe = sdxl_pipeline(export(t2i_workspace.fitted("erase", "sdxl"), tmp_path / "erased"))
    ours, _ = erased.generate(PROMPTS, scale=4.0, steps=4, negative="a red car", seed=3)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    args = {"prompt": PROMPTS, "negative_prompt": ["a red car"] * 2, "num_inference_steps": 4, "guidance_scale": 4.0}
    torch.testing.assert_close(ours, pipeline_latents(pipe, "sdxl", noise, args), **TOL)
    image = pipe(**args, latents=noise.clone()).images[0]
    assert image.size == (16, 16)

    generator = load_method(t2i_workspace.fitted("dmd", "sdxl"))
    pipe = sdxl_pipeline(export(t2i_workspace.fitted("dmd", "sdxl"), tmp_path / "onestep"))
    ours, _ = generator.generate(PROMPTS, seed=5)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    z = z * generator.generator.schedule.sigma(generator.generator_times[:1])  # the generator's input sigma(t_0) z
    args = {"prompt": PROMPTS, "num_inference_steps": 1, "guidance_scale": 1.0}
    torch.testing.assert_close(ours, pipeline_latents(pipe, "sdxl", z, args), **TOL)


def test_a_guidance_distilled_sdxl_export_samples_with_the_cards_hook(t2i_workspace, tmp_path):
    ckpt = randomised(t2i_workspace.fitted("gd", "sdxl"), tmp_path / "w.ckpt", "w_embedding.linear_2")
    folder = export(ckpt, tmp_path / "student")
    pipe = sdxl_pipeline(folder)
    card = (folder / "README.md").read_text()
    hook = card.split("```python\n", 1)[1].split("\n```", 1)[0].split("from_pretrained(\"EXPORT\")\n", 1)[1]
    exec(hook.rsplit("image =", 1)[0].replace("EXPORT", str(folder)), {"pipe": pipe})  # the card's w hook, w = 5
    ours, nfe = load_method(ckpt).generate(PROMPTS, scale=5.0, steps=4, seed=7)  # 4 | 1000: diffusers' grid is ours
    assert nfe == 4
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    theirs = pipeline_latents(pipe, "sdxl", noise, {"prompt": PROMPTS, "num_inference_steps": 4, "guidance_scale": 1.0})
    torch.testing.assert_close(ours, theirs, **TOL)
