"""The three methods on tiny text-to-image folders (SD 1.5 UNet, SD3 MMDiT, Flux): fit two steps through the CLI
with the teacher named by its pipeline folder, sample with prompts (and negative prompts), export a full pipeline
folder and generate from it with the diffusers pipeline class alone, in a fresh interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.train.text_fits import FLUX_GUIDANCE, PIPELINES, PROMPTS, card_call

KINDS = ("sd15", "sd3", "flux")


@pytest.fixture(scope="module")
def workspace(t2i_workspace):
    return t2i_workspace


def fitted(ws, method: str, kind: str):
    """The last.ckpt of `method` fitted 2 steps on the tiny `kind` folder (tests/train/text_fits.py, fitted once)."""
    return ws.fitted(method, kind)


def test_a_pipeline_folder_reads_as_a_teacher(workspace):
    from guidance.schedules import RectifiedFlow, VPLinear
    from train.runtime.checkpoint import load_method

    sd15, flux = load_method(workspace.model("sd15"), expect="teacher"), load_method(workspace.model("flux"))
    assert isinstance(sd15.denoiser.schedule, VPLinear) and sd15.denoiser.parameterization == "eps"
    assert sd15.sample_shape() == (4, 8, 8) and sd15.ema is None
    assert isinstance(flux.denoiser.schedule, RectifiedFlow) and flux.sample_shape() == (4, 8, 8)
    # Flux's dynamic shift at its default size (16 px, 16 packed tokens): exp(0.5 + 0.65 (16 - 256) / 3840)
    assert flux.denoiser.schedule.shift == pytest.approx(np.exp(0.5 + 0.65 * (16 - 256) / 3840))


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_distillation_on_text_models(workspace, kind):
    from train.runtime.checkpoint import load_method

    student = load_method(fitted(workspace, "gd", kind))
    latents, nfe = student.generate(PROMPTS, scale=3.0, steps=2)
    assert latents.shape == (2, 4, 8, 8) and nfe == 2 and torch.isfinite(latents).all()
    assert student.samples_to_images(latents).shape == (2, 3, 16, 16)
    # w enters the network (UNet time_embedding or the transformers' time_text_embed): a w-embedding that is no
    # longer zero changes the output with w
    net = student.student.net
    assert net.hooked == ("unet.time_embedding" if kind == "sd15" else "unet.time_text_embed")
    torch.nn.init.normal_(net.w_embedding.linear_2.weight)
    a, _ = student.generate(PROMPTS, scale=1.0, steps=1)
    b, _ = student.generate(PROMPTS, scale=5.0, steps=1)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_distillation_on_prompts(workspace, kind):
    from train.runtime.checkpoint import load_method

    module = load_method(fitted(workspace, "dmd", kind))
    latents, nfe = module.generate(PROMPTS)
    assert latents.shape == (2, 4, 8, 8) and nfe == 1 and torch.isfinite(latents).all()
    lora = [n for n, _ in module.fake_score.named_parameters() if "lora_" in n]
    assert lora  # the fake score is a LoRA on the teacher's network


SFD = {"concepts": ["a cat"], "targets": ["a red car"]}


def test_sfd_forgets_a_prompt_through_the_same_target(workspace):
    """Score Forgetting Distillation on prompts: a batch's request that is a forgotten prompt gets the guided
    teacher's target for its safe prompt (losses.erasure.forget_target), every other request its own; wrong settings
    for a prompt model are refused in one line."""
    from guidance.guided import teacher_target
    from train.methods.onestep import OneStepDistillation
    from train.runtime.checkpoint import load_method

    module = load_method(workspace.fitted("dmd", "sd15", forget=SFD))
    assert module.forget.concepts == ["a cat"] and module.forget.targets == ["a red car"]
    g = torch.Generator().manual_seed(0)
    requests = ["a cat", "the dog", "a cat"]
    x_t, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.3, 0.5, 0.8])
    w = torch.tensor([2.0, 3.0, 4.0])
    got = module.dm_target(x_t, t, module.encode(requests), w, requests)
    guided = module._guided["teacher"]
    want = teacher_target(guided, x_t, t, module.encode(["a red car", "the dog", "a red car"]), w, space="x0")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    own = teacher_target(guided, x_t, t, module.encode(requests), w, space="x0")
    assert (got[0] - own[0]).abs().max() > 1e-4 and torch.equal(got[1], own[1])  # only forgotten rows change
    assert module.gan_keep(module.encode(requests), requests).tolist() == [0.0, 1.0, 0.0]
    teacher = str(workspace.model("sd15"))
    for forget, message in [({"concepts": ["a cat"]}, "give one safe prompt per concept"),
                            ({"concepts": [3], "targets": ["a car"]}, "this is a text-to-image model"),
                            ({"concepts": ["a cat", "a cat"], "targets": ["a", "b"]}, "distinct prompts"),
                            ({"concepts": ["a cat"], "targets": ["a cat"]}, "none of them erased")]:
        with pytest.raises(ValueError, match=message):
            OneStepDistillation(teacher=teacher, forget=forget)


@pytest.mark.parametrize("kind", KINDS)
def test_erasure_trains_cross_attention_only(workspace, kind):
    from train.runtime.checkpoint import load_method

    module = load_method(fitted(workspace, "erase", kind))
    changed = [n for (n, p), q in zip(module.student.net.named_parameters(), module.frozen.net.parameters())
               if not torch.equal(p, q)]
    assert changed
    assert all(".attn2." in n or ".attn.add_" in n or ".attn.to_add_out." in n for n in changed), changed
    latents, nfe = module.generate(["a cat"], scale=3.0, steps=2, negative="the dog")
    assert latents.shape == (1, 4, 8, 8) and nfe == 4


def test_a_text_erasure_config_error_names_the_fix(workspace):
    from train.methods.erasure import ConceptErasure

    with pytest.raises(ValueError, match="params must be one of"):
        ConceptErasure(str(workspace.model("sd15")), {"concepts": ["a cat"]}, params="bogus")
    with pytest.raises(ValueError, match="is not a prompt"):  # a class id asked of a text model
        ConceptErasure(str(workspace.model("sd15")), [3])


PIPELINE_SCRIPT = """
import json, sys, torch
import diffusers
folder, cls, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
pipe = getattr(diffusers, cls).from_pretrained(folder, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
latents = torch.load(args.pop("latents_file"), weights_only=True)
w = args.pop("w_input", None)
if w is not None:  # the model card's hook: the student's w-embedding added to the UNet's time embedding
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from safetensors.torch import load_file
    cfg = json.load(open(folder + "/w_embedding/config.json"))
    emb = TimestepEmbedding(cfg["in_channels"], cfg["time_embed_dim"], out_dim=cfg["out_dim"])
    emb.load_state_dict(load_file(folder + "/w_embedding/diffusion_pytorch_model.safetensors"))
    code = Timesteps(cfg["in_channels"], True, 0)
    pipe.unet.time_embedding.register_forward_hook(
        lambda m, i, out: out + emb(code(torch.full((out.shape[0],), w * cfg["w_scale"])).to(out)))
out = pipe(**args, latents=latents.clone(), output_type="latent").images
image = pipe(**args, latents=latents.clone(), output_type="pil").images[0]
assert image.size == (16, 16), image.size
torch.save(out, args_out := sys.argv[4])
assert "guidedistill" not in sys.modules and "train" not in sys.modules
"""


def run_pipeline(folder, kind, latents, args, tmp_path):
    from models.text_transformer import pack_latents

    lat = tmp_path / "latents.pt"
    torch.save(pack_latents(latents) if kind == "flux" else latents, lat)
    out = tmp_path / "out.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, str(folder), PIPELINES[kind],
                    json.dumps({**args, "latents_file": str(lat)}), str(out)], check=True, env=env, cwd=tmp_path)
    theirs = torch.load(out, weights_only=True)
    if kind == "flux":
        from models.text_transformer import unpack_latents

        theirs = unpack_latents(theirs, 8, 8)
    return theirs


@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_in_the_diffusers_pipeline_and_generates_what_we_sample(workspace, kind, tmp_path):
    """An erased model (CFG with a negative prompt, 4 steps) and a one-step generator, exported as full pipeline
    folders, generate in the family's diffusers pipeline (a fresh interpreter, diffusers only) the latents our
    sampler gives from the same noise."""
    from train.runtime.checkpoint import load_method
    from train.export import export

    flux = kind == "flux"
    erased = load_method(fitted(workspace, "erase", kind))
    folder = export(fitted(workspace, "erase", kind), tmp_path / "erased")
    assert (folder / ("transformer" if kind != "sd15" else "unet")).is_dir() and (folder / "README.md").is_file()
    ours, _ = erased.generate(PROMPTS, scale=4.0, steps=4, negative="a red car", seed=3)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cfg = {"true_cfg_scale": 4.0, "guidance_scale": FLUX_GUIDANCE} if flux else {"guidance_scale": 4.0}
    args = {"prompt": PROMPTS, "negative_prompt": ["a red car"] * 2, "num_inference_steps": 4, **cfg}
    if flux:
        args.update(height=16, width=16)
    if kind == "sd3":  # its pipeline's default grid ends at sigma 1/1000; ours is 1 - i/N (shifted), as the card says
        args["sigmas"] = [1 - i / 4 for i in range(4)]
        del args["num_inference_steps"]
    theirs = run_pipeline(folder, kind, noise, args, tmp_path)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    generator = load_method(fitted(workspace, "dmd", kind))
    folder = export(fitted(workspace, "dmd", kind), tmp_path / "onestep")
    ours, _ = generator.generate(PROMPTS, seed=5)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    z = z * generator.generator.schedule.sigma(generator.generator_times[:1])  # the generator's input sigma(t_0) z
    call = card_call(folder)  # the model card's own pipeline call: Flux with its embedded guidance, CFG off
    assert call["guidance_scale"] == (FLUX_GUIDANCE if flux else 1.0) and "negative_prompt" not in call
    args = {"prompt": PROMPTS, **call, **({"height": 16, "width": 16} if flux else {})}
    theirs = run_pipeline(folder, kind, z, args, tmp_path)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_guidance_distilled_export_samples_with_the_cards_hook(workspace, tmp_path):
    """The SD 1.5 w-student exported as a pipeline folder + w_embedding/: StableDiffusionPipeline without CFG
    (guidance_scale 1, one evaluation per step) and the card's hook reproduce our student at w = 5."""
    from train.runtime.checkpoint import load_method
    from train.export import export

    ckpt = fitted(workspace, "gd", "sd15")
    student = load_method(ckpt)
    torch.nn.init.normal_(student.student.net.w_embedding.linear_2.weight, std=0.1)  # a w-embedding that matters
    torch.save({**torch.load(ckpt, weights_only=True), "state_dict": student.state_dict()}, tmp_path / "w.ckpt")
    folder = export(tmp_path / "w.ckpt", tmp_path / "student")
    assert (folder / "w_embedding" / "config.json").is_file() and "register_forward_hook" in (folder / "README.md").read_text()
    ours, nfe = student.generate(PROMPTS, scale=5.0, steps=4, seed=7)
    assert nfe == 4
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    args = {"prompt": PROMPTS, "num_inference_steps": 4, "guidance_scale": 1.0, "w_input": 5.0}
    theirs = run_pipeline(folder, "sd15", noise, args, tmp_path)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
