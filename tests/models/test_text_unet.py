"""The text-conditioned UNet adapter, prompt encoders and VAE on tiny SD 1.5 / SDXL folders loaded with
from_pretrained, checked against the diffusers pipelines' own prompt encoding."""
from __future__ import annotations

import pytest
import torch

from guidance.conditions import cond_cat, cond_index, cond_split
from models.pretrained import schedule_from_pretrained
from models.text_encoders import PromptEncoder
from models.text_unet import TextConditionalUNet
from models.vae import LatentVAE, cached_latents

PROMPTS = ["a cat", "the dog of a cat"]


@pytest.fixture(scope="module")
def sd15(tiny_sd_folder):
    path = tiny_sd_folder("sd15")
    return path, PromptEncoder.from_pretrained(str(path)), TextConditionalUNet(str(path)).eval()


@pytest.fixture(scope="module")
def sdxl(tiny_sd_folder):
    path = tiny_sd_folder("sdxl")
    return path, PromptEncoder.from_pretrained(str(path)), TextConditionalUNet(str(path)).eval()


def test_prompt_encoder_matches_sd_pipeline_and_caches(sd15):
    from diffusers import StableDiffusionPipeline

    path, enc, _ = sd15
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pos, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, ["", "blurry"])
    cond = enc.encode(PROMPTS)
    assert set(cond) == {"encoder_hidden_states"} and cond["encoder_hidden_states"].shape == (2, 16, 32)
    torch.testing.assert_close(cond["encoder_hidden_states"], pos, rtol=0, atol=0)
    torch.testing.assert_close(enc.encode(["", "blurry"])["encoder_hidden_states"], neg, rtol=0, atol=0)
    torch.testing.assert_close(enc.null(2)["encoder_hidden_states"], neg[:1].expand(2, -1, -1), rtol=0, atol=0)

    calls = []
    handle = enc.encoders[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        again = enc.encode(["the dog of a cat", "a cat", "a new prompt", "a new prompt"])
    finally:
        handle.remove()
    assert calls == [1]  # only the one unseen prompt went through the encoder
    torch.testing.assert_close(again["encoder_hidden_states"][:2], cond["encoder_hidden_states"].flip(0), rtol=0, atol=0)


def test_sdxl_prompt_encoder_matches_sdxl_pipeline(sdxl):
    from diffusers import StableDiffusionXLPipeline

    path, enc, _ = sdxl
    pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True)
    cond = enc.encode(PROMPTS)
    torch.testing.assert_close(cond["encoder_hidden_states"], pos, rtol=0, atol=0)  # both encoders' penultimate layers
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=0, atol=0)
    null = enc.null(2)  # force_zeros_for_empty_prompt: the pipeline's negative without a negative prompt
    assert enc.zeros_for_empty
    torch.testing.assert_close(null["encoder_hidden_states"], neg, rtol=0, atol=0)
    torch.testing.assert_close(null["text_embeds"], neg_pooled, rtol=0, atol=0)


def test_prompts_first_encoded_inside_autocast_cache_the_encoders_own_embeddings(sdxl):
    """A bf16-mixed fit encodes its batches inside an autocast region; the shared encoder's per-prompt cache must not
    keep bf16-computed embeddings for every later user of the process (exports compared with diffusers, fp32 runs)."""
    path, _, _ = sdxl
    enc, reference = PromptEncoder.from_pretrained(str(path)), PromptEncoder.from_pretrained(str(path), cache=False)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = enc.encode(["an unseen prompt"])
    want = reference.encode(["an unseen prompt"])
    for key in ("encoder_hidden_states", "text_embeds"):
        assert inside[key].dtype == torch.float32
        torch.testing.assert_close(inside[key], want[key], rtol=0, atol=0)
        torch.testing.assert_close(enc.encode(["an unseen prompt"])[key], want[key], rtol=0, atol=0)


def test_adapter_calls_the_unet_with_the_text_condition(sd15):
    _, enc, net = sd15
    assert not any(k.startswith("null") for k in net.state_dict())  # state dict = the diffusers UNet's
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    cond = enc.encode(PROMPTS)
    direct = net.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    torch.testing.assert_close(net(x, t, cond), direct, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="'pag' perturbation only"):  # PAG: tests/models/test_text_pag.py
        net(x, t, cond, perturb="sag")


def test_null_and_drop_cond(sd15):
    _, enc, net = sd15
    cond = enc.encode(["a cat"] * 400)
    null = net.null_cond(cond)
    torch.testing.assert_close(null["encoder_hidden_states"], enc.null(400)["encoder_hidden_states"], rtol=0, atol=0)
    assert net.drop_cond(cond, 0.0) is cond
    dropped = net.drop_cond(cond, 0.25, torch.Generator().manual_seed(0))["encoder_hidden_states"]
    is_null = (dropped == null["encoder_hidden_states"]).flatten(1).all(1)
    is_cond = (dropped == cond["encoder_hidden_states"]).flatten(1).all(1)
    assert bool((is_null ^ is_cond).all())
    assert 0.18 < is_null.float().mean().item() < 0.32


def test_text_conditions_batch_through_cond_helpers(sdxl):
    _, enc, net = sdxl
    a, b = enc.encode(PROMPTS), net.null_cond(enc.encode(PROMPTS))
    both = cond_cat([a, b])
    assert both["encoder_hidden_states"].shape[0] == 4 and both["text_embeds"].shape[0] == 4
    back = cond_split(both, [2, 2])
    torch.testing.assert_close(back[1]["text_embeds"], b["text_embeds"], rtol=0, atol=0)
    torch.testing.assert_close(cond_index(both, slice(0, 2))["encoder_hidden_states"], a["encoder_hidden_states"])


def test_sdxl_adapter_adds_the_pipeline_time_ids(sdxl):
    _, enc, net = sdxl
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 3.0])
    cond = enc.encode(PROMPTS)
    ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).expand(2, 6)  # 8x8 latents, VAE factor 2: 16x16 images
    added = {"text_embeds": cond["text_embeds"], "time_ids": ids}
    direct = net.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
    torch.testing.assert_close(net(x, t, cond), direct, rtol=0, atol=0)
    other = net(x, t, {**cond, "time_ids": ids * 2})  # explicit time_ids are used as given
    assert not torch.allclose(other, direct)
    null = net.null_cond({**cond, "time_ids": ids})
    assert torch.equal(null["time_ids"], ids) and not null["text_embeds"].any()


def test_schedule_and_vae_from_the_folder(sd15, tmp_path):
    from diffusers import DDIMScheduler

    path, _, _ = sd15
    schedule, param = schedule_from_pretrained(path)
    assert param == "eps" and schedule.scaled and schedule.num_steps == 1000
    ref = DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True).alphas_cumprod.double()
    i = torch.tensor([0, 249, 500, 999])
    a = schedule.alpha(i.double() / 999)
    torch.testing.assert_close(a**2, ref[i], rtol=2e-6, atol=0)  # diffusers builds its betas in float32

    vae = LatentVAE.from_pretrained(str(path))
    assert vae.scale_factor == 2 and vae.scaling_factor == pytest.approx(0.18215)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    z = vae.encode(images)
    assert z.shape == (3, 4, 8, 8)
    torch.testing.assert_close(z, vae.vae.encode(images).latent_dist.mean * 0.18215)
    torch.testing.assert_close(vae.decode(z), vae.vae.decode(z / 0.18215).sample)

    cache = tmp_path / "latents.safetensors"
    first = cached_latents(vae, images, cache, batch_size=2)
    torch.testing.assert_close(first, z)
    calls = []
    handle = vae.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        torch.testing.assert_close(cached_latents(vae, images, cache), z)
    finally:
        handle.remove()
    assert not calls  # read back, not re-encoded


def test_missing_folder_and_wrong_layout_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextConditionalUNet(str(tmp_path / "nowhere"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="no unet/ folder"):
        TextConditionalUNet(str(tmp_path / "flat"))
