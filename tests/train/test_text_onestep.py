"""One-step distillation with a discriminator on tiny text-to-image folders (SD 1.5 UNet, SD3 MMDiT, Flux): f-distill
(Jensen-Shannon) + GAN term fit on captioned latents, and the discriminator's logits for a text batch against the head
applied to features read from the diffusers network called directly."""
from __future__ import annotations

import os

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from train.runtime.config import instantiate

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KINDS = ("sd15", "sd3", "flux")
PROMPTS = ["a cat", "the dog", "a red car"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from models.tiny_pipelines import save_tiny_pipeline

    root = tmp_path_factory.mktemp("t2i-onestep")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(PROMPTS[i % 3])
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"models": {k: save_tiny_pipeline(root / k, k) for k in KINDS}, "images": images, "prompts": prompts}


def build(folder, **init_args):
    """The module on `folder`; `init_args` replace top-level arguments and update the groups field by field."""
    args = {"teacher": str(folder), "objective": {"divergence": "jensen_shannon"}, "guidance_scale": 3.0,
            "discriminator": {"gan_weight": 0.1, "hidden": 16}, "fake_score": {"rank": 4}, "generator": {"lr": 1e-3},
            "ema_decay": 0.0, "val_samples": 0}
    for k, v in init_args.items():
        args[k] = {**args[k], **v} if isinstance(v, dict) and isinstance(args.get(k), dict) else v
    return instantiate({"class_path": "train.methods.onestep.OneStepDistillation", "init_args": args})


class Losses(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


@pytest.mark.parametrize("kind", KINDS)
def test_fdistill_js_with_gan_fits_on_text_models(workspace, kind):
    """Two generator steps of JS f-distill + GAN (two fake-score/discriminator updates each) on captioned latents:
    every loss term finite, and the generator, the LoRA fake score and the discriminator head all move."""
    from data.captions import CaptionedImageDataModule

    module = build(workspace["models"][kind], fake_score={"updates": 2})
    assert module.disc_head is not None
    assert module.discriminator_layer == ("unet.mid_block" if kind == "sd15" else "transformer.norm_out:input")
    before = {name: {k: v.detach().clone() for k, v in net.state_dict().items()}
              for name, net in module.trainable_networks().items()}
    data = CaptionedImageDataModule(str(workspace["images"]), image_size=16, batch_size=3, val_size=2)
    losses = Losses()
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[losses])
    trainer.fit(module, data)
    assert trainer.global_step == 2 and len(losses.rows) == 2
    for row in losses.rows:
        assert {"train/dmd", "train/generator_gan", "train/fake_score", "train/discriminator"} <= set(row)
        assert all(np.isfinite(v) for v in row.values()), row
    assert module.nonfinite_guard.skipped == []
    for name, net in module.trainable_networks().items():
        moved = [k for k, v in net.state_dict().items() if not torch.equal(v, before[name][k])]
        if name == "fake_score.net":  # LoRA on the teacher: only the adapters train
            assert moved and all("lora_" in k for k in moved), name
        else:
            assert moved, name


def _direct_features(module, kind, x_t, t, cond):
    """The tapped features computed by calling the diffusers network of the fake score directly (not through our
    adapter), read by a hook, laid on the latent grid by explicit raster indexing."""
    den = module.fake_score
    net = den.net
    x_in, time = x_t, den.schedule.net_time(t)  # input scale 1 for eps and flow parameterisations
    seen = {}
    if kind == "sd15":
        h = net.unet.mid_block.register_forward_hook(lambda m, i, o: seen.update(f=o))
        net.unet(x_in, time, encoder_hidden_states=cond["encoder_hidden_states"])
        h.remove()
        return seen["f"]
    tr = net.transformer
    h = tr.norm_out.register_forward_pre_hook(lambda m, args: seen.update(f=args[0]))
    b, _, hh, ww = x_t.shape
    if kind == "sd3":
        tr(hidden_states=x_in, timestep=time, encoder_hidden_states=cond["encoder_hidden_states"],
           pooled_projections=cond["pooled_projections"])
    else:  # Flux: 2x2 patches packed channel-major, position ids (0, row, col), text ids 0, time in [0, 1]
        packed = torch.stack([x_in[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(b, -1)
                              for i in range(hh // 2) for j in range(ww // 2)], 1)
        img_ids = torch.tensor([[0.0, i, j] for i in range(hh // 2) for j in range(ww // 2)])
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3)
        tr(hidden_states=packed, timestep=time / 1000, guidance=cond["guidance"],
           pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
           txt_ids=txt_ids, img_ids=img_ids)
    h.remove()
    tokens, gh, gw = seen["f"], hh // 2, ww // 2  # patch size 2 in both networks
    grid = torch.empty(b, tokens.shape[-1], gh, gw)
    for i in range(gh):
        for j in range(gw):
            grid[:, :, i, j] = tokens[:, i * gw + j]
    return grid


@pytest.mark.parametrize("kind", KINDS)
def test_discriminator_logits_for_a_text_batch_equal_the_head_on_the_networks_features(workspace, kind):
    """module._disc_logits (FeatureTap through our adapter, aborted after the tap) = the head applied to the features
    a hook reads from the diffusers network called directly, for a text batch with the fake score's LoRA moved."""
    module = build(workspace["models"][kind]).eval()
    with torch.no_grad():
        for name, p in module.fake_score.net.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # the fake score differs from the teacher
    cond = module.teacher.net.conditioner.encode(PROMPTS)
    if kind == "flux":
        cond["guidance"] = torch.full((3,), 2.0)
    x_t, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        ours = module._disc_logits(x_t, t, cond)
        feats = _direct_features(module, kind, x_t, t, cond)
        reference = module.disc_head(feats, t)
    assert ours.shape == (3,) and feats.shape[1] == module.disc_head.norm.num_channels
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the features depend on the text: another prompt gives other logits
        other = module._disc_logits(x_t, t, module.teacher.net.conditioner.encode(["the red dog"] * 3)
                                    | ({"guidance": cond["guidance"]} if kind == "flux" else {}))
    assert not torch.allclose(ours, other)


def test_a_discriminator_on_prompt_only_data_says_what_to_use(workspace):
    from data.prompts import PromptDataModule

    module = build(workspace["models"]["sd15"])
    with pytest.raises(ValueError, match="CaptionedImageDataModule"):
        module.check_data(PromptDataModule(str(workspace["prompts"]), batch_size=2))
    dmd = build(workspace["models"]["sd15"], discriminator={"gan_weight": 0.0}, objective={"divergence": "reverse_kl"})
    dmd.check_data(PromptDataModule(str(workspace["prompts"]), batch_size=2))  # DMD alone needs no real latents


def test_a_layer_that_does_not_exist_names_the_default(workspace):
    with pytest.raises(ValueError, match="transformer.norm_out:input"):
        build(workspace["models"]["sd3"], discriminator={"layer": "unet.mid_block"})
