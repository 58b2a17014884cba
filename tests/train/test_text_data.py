"""Text-to-image teacher fine-tuning through the CLI on a tiny SD 1.5 folder: captioned images encoded to
latents once by the model's own VAE (cached), raw captions in the batches, encoded by the method (its network's
conditioner), the existing teacher's caption dropout on the text condition."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = """
seed_everything: 0
model:
  class_path: train.methods.teacher.TeacherPretraining
  init_args:
    net:
      class_path: {net}
      init_args: {{pretrained: {model}{net_extra}}}
    schedule: {schedule}
    parameterization: {param}
    p_uncond: 0.5
    lr: 0.0001
    warmup_steps: 1
    ema_decay: 0.0
data:
  class_path: data.captions.CaptionedImageDataModule
  init_args: {{path: {images}, image_size: 16, batch_size: 2, val_size: 2, cache_dir: {cache}}}
trainer:
  max_steps: 3
  accelerator: cpu
  default_root_dir: {root}
  limit_val_batches: 1
  check_val_every_n_epoch: null
  val_check_interval: 3
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, save_top_k: 0}}
"""


FAMILIES = {  # net, schedule, parameterization, more net init args (Flux-dev: its embedded guidance)
    "sd15": ("models.text_unet.TextConditionalUNet", "{class_path: guidance.schedules.VPLinear, init_args: "
             "{num_steps: 1000, beta_start: 0.00085, beta_end: 0.012, scaled: true}}", "eps", ""),
    "sd3": ("models.text_transformer.SD3Transformer", "{class_path: guidance.schedules.RectifiedFlow, init_args: "
            "{shift: 3.0, logit_normal: true}}", "flow", ""),
    "flux": ("models.text_transformer.FluxTransformer", "{class_path: guidance.schedules.RectifiedFlow, init_args: "
             "{shift: 1.58, logit_normal: true}}", "flow", ", embedded_guidance: 1.0"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from models.tiny_pipelines import save_tiny_pipeline

    root = tmp_path_factory.mktemp("t2i")
    model = {kind: save_tiny_pipeline(root / kind, kind) for kind in FAMILIES}
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(["a cat", "the dog", "a red car"][i % 3])
    return root, model, images


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_teacher_fine_tunes_a_text_model_from_one_config(folders, kind):
    from train.cli import main

    root, models, images = folders
    net, schedule, param, net_extra = FAMILIES[kind]
    cfg = root / f"{kind}.yaml"
    cfg.write_text(CONFIG.format(model=models[kind], images=images, cache=root / f"cache-{kind}", root=root / kind / "run",
                                 net=net, schedule=schedule, param=param, net_extra=net_extra))
    main(["fit", "--config", str(cfg)])
    assert (root / kind / "run" / "checkpoints" / "last.ckpt").is_file()
    cached = list((root / f"cache-{kind}").glob("latents-*.safetensors"))
    assert len(cached) == 2  # train and validation latents, each encoded once


def test_batches_are_the_models_cached_latents_and_raw_captions(folders):
    """A latent model's data module yields its VAE's latents of the images (encoded once, cached) with the raw
    captions; the method encodes the captions with its network's conditioner."""
    from types import SimpleNamespace

    from data.captions import CaptionedImageDataModule
    from train.runtime.checkpoint import load_method

    root, models, images = folders
    module = load_method(models["sd15"])  # a pipeline folder reads as a teacher
    dm = CaptionedImageDataModule(str(images), image_size=16, batch_size=2, val_size=2, cache_dir=str(root / "c15"))
    dm.trainer = SimpleNamespace(lightning_module=module)
    latents, captions = next(iter(dm.train_dataloader()))
    assert latents.shape == (2, 4, 8, 8) and all(isinstance(c, str) for c in captions)
    pixels = CaptionedImageDataModule(str(images), image_size=16, batch_size=2, val_size=2)
    pixels.setup()
    train_images = torch.stack([pixels.sets["train"][j][0] for j in range(len(pixels.sets["train"]))])
    torch.testing.assert_close(dm.sets["train"].samples, module.images_to_samples(train_images), rtol=0, atol=0)
    assert len(list((root / "c15").glob("latents-*.safetensors"))) == 2  # train and validation, each encoded once
    cond = module.encode(captions)
    assert cond["encoder_hidden_states"].shape == (2, 16, 32)
    for c, h in zip(captions, cond["encoder_hidden_states"]):
        torch.testing.assert_close(h, module.conditioner.encoder.encode([c])["encoder_hidden_states"][0], rtol=0, atol=0)


def test_a_pixel_model_gets_the_images_and_raw_captions(folders):
    from data.captions import CaptionedImageDataModule

    _, _, images = folders
    dm = CaptionedImageDataModule(str(images), image_size=16, batch_size=2, val_size=2)
    x, captions = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
