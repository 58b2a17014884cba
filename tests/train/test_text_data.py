"""Text-to-image teacher fine-tuning through the CLI on a tiny SD 1.5 folder: captioned images encoded to
latents once (cached), captions encoded per prompt, the existing teacher's caption dropout on the text condition."""
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
      init_args: {{pretrained: {model}}}
    schedule: {schedule}
    parameterization: {param}
    p_uncond: 0.5
    lr: 0.0001
    warmup_steps: 1
    ema_decay: 0.0
data:
  class_path: train.text_data.EncodedCaptionDataModule
  init_args: {{path: {images}, image_size: 16, batch_size: 2, val_size: 2, cache_dir: {cache}, embedded_guidance: {guidance}}}
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


FAMILIES = {  # net, schedule, parameterization, embedded guidance
    "sd15": ("models.text_unet.TextConditionalUNet", "{class_path: guidance.schedules.VPLinear, init_args: "
             "{num_steps: 1000, beta_start: 0.00085, beta_end: 0.012, scaled: true}}", "eps", "null"),
    "sd3": ("models.text_transformer.SD3Transformer", "{class_path: guidance.schedules.RectifiedFlow, init_args: "
            "{shift: 3.0, logit_normal: true}}", "flow", "null"),
    "flux": ("models.text_transformer.FluxTransformer", "{class_path: guidance.schedules.RectifiedFlow, init_args: "
             "{shift: 1.58, logit_normal: true}}", "flow", "1.0"),
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
    net, schedule, param, guidance = FAMILIES[kind]
    cfg = root / f"{kind}.yaml"
    cfg.write_text(CONFIG.format(model=models[kind], images=images, cache=root / f"cache-{kind}", root=root / kind / "run",
                                 net=net, schedule=schedule, param=param, guidance=guidance))
    main(["fit", "--config", str(cfg)])
    assert (root / kind / "run" / "checkpoints" / "last.ckpt").is_file()
    cached = list((root / f"cache-{kind}").glob("latents-*.safetensors"))
    assert len(cached) == 2  # train and validation latents, each encoded once


def test_batches_are_cached_latents_and_prompt_embeddings(folders):
    from train.text_data import EncodedCaptionDataModule

    root, models, images = folders
    model = models["sd15"]

    dm = EncodedCaptionDataModule(str(images), pretrained=str(model), image_size=16, batch_size=2, val_size=2,
                                  cache_dir=str(root / "cache-sd15"))
    raw_latents, captions = next(iter(dm.train_dataloader()))
    latents, cond = dm.on_after_batch_transfer((raw_latents, captions), 0)
    assert latents.shape == (2, 4, 8, 8) and cond["encoder_hidden_states"].shape == (2, 16, 32)
    for c, h in zip(captions, cond["encoder_hidden_states"]):
        torch.testing.assert_close(h, dm.encoder.encode([c])["encoder_hidden_states"][0], rtol=0, atol=0)
    i = dm.sets["train"].captions.index(captions[0])
    torch.testing.assert_close(dm.sets["train"].latents[i], raw_latents[0], rtol=0, atol=0)


def test_missing_model_path_is_a_clear_error(folders):
    from train.text_data import EncodedCaptionDataModule

    _, _, images = folders
    with pytest.raises(ValueError, match="set data `pretrained:`"):
        EncodedCaptionDataModule(str(images), image_size=16, batch_size=2).setup()
