"""The shipped real-model configs (configs/{sd15,sdxl,sd3,flux}/*.yaml) train: each is fitted one step through the
CLI with its model path pointed at the tiny folder of its family and only sizes shrunk (image size, batch, steps,
trajectories); everything else (schedule, guider, precision, LoRA, frozen_dtype, embedded guidance) as shipped."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from train.runtime.checkpoint import load_method
from train.runtime.config import read_yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for fam in ("sd15", "sdxl", "sd3", "flux") for p in (ROOT / "configs" / fam).glob("*.yaml"))
SHRINK = {"image_size": 16, "batch_size": 2, "val_size": 2}


def shrunk(cfg: dict, model: Path, ws, root: Path) -> dict:
    """`cfg` with the model path at `model`, data from the workspace, tiny sizes, one step, no logger."""
    args = cfg["model"]["init_args"]
    if "net" in args:
        args["net"]["init_args"]["pretrained"] = str(model)
    else:
        args["teacher" if "teacher" in args else "model"] = str(model)
    if "trajectory_steps" in args:
        args.update(trajectory_steps=3, bank_size=2, batch_size=1)
    if "fake_score" in args:  # OneStepDistillation
        args["fake_score"]["updates"] = 1
    if args.get("images"):  # text-encoder unlearning: a few uncaptioned images of its one concept
        folder = root.parent / "concept_images"
        folder.mkdir(parents=True, exist_ok=True)
        for image in sorted(ws.images.glob("*.png"))[:4]:
            shutil.copy(image, folder / image.name)
        args["images"] = str(folder)
    data = cfg["data"]["init_args"]
    if cfg["data"]["class_path"].endswith("CaptionedImageDataModule"):
        data.update(path=str(ws.images), cache_dir=str(root / "latents"), val_size=2)
    elif cfg["data"]["class_path"].endswith("PromptDataModule"):
        data["path"] = str(ws.prompts)
    data.update({k: v for k, v in SHRINK.items() if k in data})
    cfg["trainer"].update(max_steps=1, accelerator="cpu", logger=False, default_root_dir=str(root),
                          limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                          accumulate_grad_batches=1, callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                                 "init_args": {"save_last": True, "save_top_k": 0}}])
    return cfg


def test_every_family_ships_the_three_methods():
    names = {(p.parent.name, p.name) for p in CONFIGS}
    for fam in ("sd15", "sdxl", "sd3"):
        assert {(fam, n) for n in ("teacher.yaml", "guidance_distill.yaml", "dmd.yaml", "erase.yaml")} <= names
    assert {("flux", n) for n in ("teacher.yaml", "dmd.yaml", "erase.yaml")} <= names  # FLUX.1-dev: guidance is an input


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_config_fits_one_step_on_the_tiny_folder_of_its_family(path, t2i_workspace, tmp_path):
    from train.cli import main

    cfg = shrunk(read_yaml(path), t2i_workspace.model(path.parent.name), t2i_workspace, tmp_path / "run")
    config = tmp_path / path.name
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.manual_seed(0)
    main(["fit", "--config", str(config)])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 1
    module = load_method(ckpt)
    shipped = read_yaml(path)["model"]["init_args"]
    for key in ("frozen_dtype", "guider", "params", "lora_rank", "parameterization"):
        if key in shipped:
            assert module.hparams[key] == shipped[key], key
    if "fake_score" in shipped:
        assert module.hparams["fake_score"]["rank"] == shipped["fake_score"]["rank"]
