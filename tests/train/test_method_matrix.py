"""Every method through the CLI on both kinds of condition: the shipped digits configs (class labels, the tiny teacher)
and the tiny SD 1.5 folder (prompts), plus SD3 and Flux where the method applies. Each is fitted two steps with
`python -m train fit`, reloads from its checkpoint and samples finite images with its own recipe."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from train.cli import main
from train.runtime.checkpoint import load_method
from train.runtime.config import read_yaml

ROOT = Path(__file__).resolve().parents[2]
TRAINER = {"max_steps": 2, "accelerator": "cpu", "logger": False, "limit_val_batches": 0, "enable_progress_bar": False,
           "enable_model_summary": False, "check_val_every_n_epoch": None, "val_check_interval": 2,
           "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"save_last": True, "save_top_k": 0}}]}

# method -> (shipped digits config, model init_args overrides beyond the model path and sizes)
DIGITS = {
    "guidance_distillation": ("guidance_distill.yaml", {}),
    "progressive": ("progressive.yaml", {"start_steps": 4, "end_steps": 1, "steps_per_round": 1}),
    "consistency": ("lcm.yaml", {"solver_steps": 8}),
    "dmd": ("dmd.yaml", {}),
    "fdistill_js": ("fdistill_js.yaml", {}),
    "sfd": ("sfd.yaml", {}),
    "sid": ("sid.yaml", {}),
    "esd": ("erase_one.yaml", {}),
    "toward": ("erase_toward.yaml", {}),
    "ant": ("erase_one.yaml", {"ant_steps": 1}),
    "salun": ("erase_one.yaml", {"saliency_top_k": 0.5, "saliency_batches": 1}),
}
SMALL = {"batch_size": 4, "trajectory_steps": 3, "bank_size": 2, "val_samples": 0, "steps_per_epoch": 4}


def _shrink(model: dict, data: dict, tiny_teacher: Path, student: Path | None, overrides: dict) -> None:
    args = model["init_args"]
    for key in ("teacher", "model"):
        if key in args:
            args[key] = str(tiny_teacher)
    if "student" in args:
        args["student"] = str(student)
    if "fake_score" in args:
        args["fake_score"] = {**args["fake_score"], "updates": 1, "rank": 4}
    if "discriminator" in args:
        args["discriminator"] = {**args["discriminator"], "hidden": 16}
    args.update({k: v for k, v in SMALL.items() if k in args})
    args.update(overrides)
    data["init_args"] = {**(data.get("init_args") or {}),
                         **{k: v for k, v in SMALL.items() if k in (data.get("init_args") or {})}}


def _fit(config: dict, root: Path) -> Path:
    path = root.with_suffix(".yaml")
    path.write_text(yaml.safe_dump({"seed_everything": 0, "model": config["model"], "data": config["data"],
                                    "trainer": {**TRAINER, "default_root_dir": str(root)}}, sort_keys=False))
    main(["fit", "--config", str(path)])
    return root / "checkpoints" / "last.ckpt"


def _samples_finite(ckpt: Path, requests, steps: int = 2) -> None:
    module = load_method(ckpt)
    assert torch.load(ckpt, weights_only=True)["global_step"] == steps
    x, nfe = module.generate(requests, seed=0, steps=2 if module.recipe().name == "cfg" else None)
    assert torch.isfinite(x).all() and nfe >= 1


@pytest.fixture(scope="module")
def digits_student(tiny_teacher_ckpt, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("matrix-digits")
    cfg = read_yaml(ROOT / "configs" / "digits" / "guidance_distill.yaml")
    _shrink(cfg["model"], cfg["data"], tiny_teacher_ckpt, None, {})
    return _fit(cfg, root / "stage1")


@pytest.mark.parametrize("method", sorted(DIGITS))
def test_every_method_fits_through_the_cli_on_the_digits(method, tiny_teacher_ckpt, digits_student, tmp_path):
    name, overrides = DIGITS[method]
    cfg = read_yaml(ROOT / "configs" / "digits" / name)
    _shrink(cfg["model"], cfg["data"], tiny_teacher_ckpt, digits_student, overrides)
    _samples_finite(_fit(cfg, tmp_path / method), torch.arange(10))


# method -> (TextWorkspace method, model overrides, the kinds it is fitted on)
TEXT = {
    "teacher": ("teacher", {}, ("sd15", "sd3", "flux")),
    "guidance_distillation": ("gd", {}, ("sd15", "sd3", "flux")),
    "guidance_distillation_data_free": ("gd_prompts", {}, ("sd15",)),
    "progressive": ("pd", {}, ("sd15", "sd3")),
    "consistency": ("lcm", {}, ("sd15",)),
    "dmd": ("dmd", {}, ("sd15", "sd3", "flux")),
    "sfd": ("dmd", {"forget": {"concepts": ["a cat"], "targets": ["a red car"]}}, ("sd15",)),
    "sid": ("dmd", {"objective": {"kind": "sid", "alpha": 1.0, "lsg_fake_scale": 2.0, "lsg_train_scale": 2.0}},
            ("sd15",)),
    "fdistill_js": ("fdistill", {}, ("sd15", "sd3", "flux")),
    "esd": ("erase", {}, ("sd15", "sd3", "flux")),
    "toward": ("erase", {"concepts": {"concepts": [{"name": "car", "prompts": ["a red car"], "alternative": "a car"}]}},
               ("sd15",)),
    "ant": ("erase", {"ant_steps": 1}, ("sd15",)),
    "salun": ("erase", {"saliency_top_k": 0.5, "saliency_batches": 1}, ("sd15",)),
    "uce": ("uce", {}, ("sd15", "sdxl", "sd3", "flux")),
}


@pytest.mark.parametrize(("method", "kind"), [(m, k) for m, (_, _, kinds) in sorted(TEXT.items()) for k in kinds])
def test_every_method_fits_through_the_cli_on_text_models(method, kind, t2i_workspace):
    fit, overrides, _ = TEXT[method]
    steps = t2i_workspace.config(fit, kind, **overrides).get("trainer", {}).get("max_steps", 2)  # UCE: its one edit
    _samples_finite(t2i_workspace.fitted(fit, kind, **overrides), ["a cat", "the dog"], steps)
