"""tests/train/ds_run.py for methods on a tiny text-to-image folder: the same runner (options, trainer, recorded losses
and weights) with `build` extended by text one-step distillation and text concept erasure.

--teacher is the pipeline folder (models.tiny_pipelines); one-step distillation reads captioned images from images/
beside it (PNG + caption .txt pairs, written by the test).

    python tests/train/ds_run_text.py --method text_onestep --teacher DIR/sd15 --stage 2 --devices 2 --batch 3 --root R
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_run  # noqa: E402
from train.runtime.config import instantiate  # noqa: E402

CONCEPTS = {"concepts": [{"name": "cat", "prompts": ["a cat", "the cat"]}, {"name": "car", "prompts": ["a red car"],
                                                                           "alternative": "a car"}],
            "anchors": ["the dog", "a dog of the car"]}


def build(method: str, teacher: str, batch: int, nan_at: int = -1, frozen_dtype: str = "float32"):
    """(module, datamodule) of a tiny text run of `method`; `batch` samples per process."""
    from data.steps import ErasureSteps
    from data.captions import CaptionedImageDataModule

    if method == "text_onestep":  # generator, LoRA fake score and discriminator (f-distill JS + GAN): three engines
        module = instantiate({"class_path": "train.methods.onestep.OneStepDistillation",
                              "init_args": {"teacher": teacher, "objective": {"divergence": "jensen_shannon"},
                                            "discriminator": {"gan_weight": 0.1, "hidden": 16},
                                            "guidance_scale": 3.0, "fake_score": {"updates": 2, "rank": 4},
                                            "ema_decay": 0.9, "val_samples": 0, "frozen_dtype": frozen_dtype}})
        images = Path(teacher).parent / "images"
        return module, CaptionedImageDataModule(str(images), image_size=16, batch_size=batch, val_size=2)
    if method == "text_erasure":  # ESD-x with anchors and the null prompt, x_t from the student's own trajectories
        module = instantiate({"class_path": "train.methods.erasure.ConceptErasure",
                              "init_args": {"model": teacher, "concepts": CONCEPTS, "params": "esd-x",
                                            "uncond_weight": 1.0, "batch_size": batch, "trajectory_steps": 3,
                                            "lr": 1e-2}})
        return module, ErasureSteps(steps_per_epoch=10)
    return ds_run.build(method, teacher, batch, nan_at, frozen_dtype)


if __name__ == "__main__":
    ds_run.build = build  # ds_run.main builds its module through this module-level function
    ds_run.main()
