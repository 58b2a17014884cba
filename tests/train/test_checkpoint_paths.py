"""Checkpoints whose configs hold relative paths (a pipeline folder `pretrained: runs/demo/text/pipeline`, as the demo
writes them) load from any directory: the directory a run was trained in is recorded and its relative paths are
resolved there (or, for older checkpoints, under the checkpoint's ancestors); what cannot be found is one line."""
from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from tests.train.text_fits import TRAINER
from train.cli import main
from train.runtime.checkpoint import CHECKPOINT_KEY, CheckpointError, load_method, resolve_relative_paths


def test_only_missing_relative_paths_under_path_keys_are_resolved(tmp_path, monkeypatch):
    (tmp_path / "run" / "pipe").mkdir(parents=True)
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "local").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    cfg = {"net": {"init_args": {"pretrained": "pipe", "prompt": "pipe"}}, "teacher": "local", "model": "/abs/x",
           "student": "nowhere", "concepts": ["pipe"], "teacher_config": {"model": "pipe"}}
    out = resolve_relative_paths(cfg, [tmp_path / "run"])
    assert out["net"]["init_args"] == {"pretrained": str(tmp_path / "run" / "pipe"), "prompt": "pipe"}
    assert out["teacher"] == "local" and out["model"] == "/abs/x" and out["student"] == "nowhere"
    assert out["concepts"] == ["pipe"] and out["teacher_config"] == {"model": str(tmp_path / "run" / "pipe")}


def test_a_text_checkpoint_with_a_relative_pipeline_loads_from_another_directory(t2i_workspace, tmp_path, monkeypatch):
    from train.runtime.checkpoint import pipeline_teacher_config

    train_dir = tmp_path / "train_here"
    shutil.copytree(t2i_workspace.model("sd15"), train_dir / "models" / "sd15")
    monkeypatch.chdir(train_dir)
    teacher = pipeline_teacher_config("models/sd15")
    teacher["net"]["init_args"]["pretrained"] = "models/sd15"  # relative, as a user writes it
    cfg = {"seed_everything": 0,
           "model": {"class_path": teacher.pop("_class_path"), "init_args": {
               **teacher, "p_uncond": 0.1, "lr": 1e-4, "warmup_steps": 1, "val_samples": 0}},
           "data": {"class_path": "data.captions.CaptionedImageDataModule", "init_args": {
               "path": str(t2i_workspace.images), "image_size": 16, "batch_size": 2, "val_size": 2}},
           "trainer": {**TRAINER, "max_steps": 1, "default_root_dir": "runs/teacher"}}
    (train_dir / "teacher.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    main(["fit", "--config", "teacher.yaml"])
    ckpt = train_dir / "runs" / "teacher" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)[CHECKPOINT_KEY]["cwd"] == str(train_dir)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    module = load_method(ckpt)
    assert module.sampling_denoiser().net.pretrained == str(train_dir / "models" / "sd15")
    x, _ = module.generate(["a cat"], steps=2)
    assert torch.isfinite(x).all()

    shutil.rmtree(train_dir / "models")  # the folder is gone: one line naming it and where it was looked for
    with pytest.raises(CheckpointError, match=r"models/sd15' does not exist.*read from .*train_here"):
        load_method(ckpt)
