"""The method modules the speed and memory benchmarks train: the digits configs' settings on a network of a
chosen size, built from a teacher config with random weights (no checkpoint; cost does not depend on weights).

    module, data = build("dmd_lora", "digits")
"""
from __future__ import annotations

from typing import Any

# ClassConditionalUNet sizes (1-channel 8x8 digits) and the batch every method of that size trains with:
# "tiny" is the test suite's teacher, "digits" configs/digits/teacher.yaml, "wide" the digits UNet 4x wider.
NETS: dict[str, dict[str, Any]] = {
    "tiny": {"block_out_channels": [16, 32], "attention_levels": [False, True], "norm_num_groups": 8, "batch": 16},
    "digits": {"block_out_channels": [32, 64, 64], "attention_levels": [False, True, True], "norm_num_groups": 32,
               "batch": 128},
    "wide": {"block_out_channels": [128, 256, 256], "attention_levels": [False, True, True], "norm_num_groups": 32,
             "batch": 32},
}

# name -> (label, class path, init args beyond the teacher reference). Settings follow configs/digits/*.yaml;
# EMA as there (the `ema` switch of `build` turns it off everywhere).
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "plain": ("plain fine-tuning (denoising loss, AdamW)", "train.methods.teacher.TeacherPretraining",
              {"parameterization": "v", "warmup_steps": 0, "ema_decay": 0.0}),
    "teacher": ("teacher pretraining (label dropout, EMA)", "train.methods.teacher.TeacherPretraining",
                {"parameterization": "v", "p_uncond": 0.1, "warmup_steps": 0, "ema_decay": 0.999}),
    "guidance_distillation": ("guidance distillation (CFG teacher, w-student)",
                              "train.methods.guidance_distillation.GuidanceDistillation",
                              {"w_min": 1.0, "w_max": 6.0, "warmup_steps": 0, "ema_decay": 0.995}),
    "dmd_lora": ("one-step DMD, LoRA r32 fake score, 4 fake updates", "train.methods.onestep.OneStepDistillation",
                 {"fake_score": {"mode": "lora", "rank": 32, "updates": 4}, "ema_decay": 0.99}),
    "dmd_lora8": ("one-step DMD, LoRA r8 fake score, 4 fake updates", "train.methods.onestep.OneStepDistillation",
                  {"fake_score": {"mode": "lora", "rank": 8, "updates": 4}, "ema_decay": 0.99}),
    "dmd_lora_bf16": ("one-step DMD, LoRA r32 fake score on a bfloat16 frozen base, 4 fake updates",
                      "train.methods.onestep.OneStepDistillation",
                      {"fake_score": {"mode": "lora", "rank": 32, "updates": 4}, "ema_decay": 0.99,
                       "frozen_dtype": "bfloat16"}),
    "dmd_lora8_bf16": ("one-step DMD, LoRA r8 fake score on a bfloat16 frozen base, 4 fake updates",
                       "train.methods.onestep.OneStepDistillation",
                       {"fake_score": {"mode": "lora", "rank": 8, "updates": 4}, "ema_decay": 0.99,
                        "frozen_dtype": "bfloat16"}),
    "dmd_copy": ("one-step DMD, full-copy fake score, 4 fake updates", "train.methods.onestep.OneStepDistillation",
                 {"fake_score": {"mode": "copy", "updates": 4}, "ema_decay": 0.99}),
    "fdistill_js": ("f-distill JS + GAN, LoRA r32 fake score", "train.methods.onestep.OneStepDistillation",
                    {"fake_score": {"mode": "lora", "rank": 32, "updates": 4},
                     "objective": {"divergence": "jensen_shannon"}, "discriminator": {"gan_weight": 0.05},
                     "ema_decay": 0.99}),
    "erasure": ("concept erasure (ESD-u, one digit)", "train.methods.erasure.ConceptErasure",
                {"concepts": [3], "params": "esd-u", "trajectory_steps": 20, "bank_size": 64, "val_samples": 0,
                 "ema_decay": 0.0}),
}
TEACHER_ARG = {"train.methods.guidance_distillation.GuidanceDistillation": "teacher", "train.methods.onestep.OneStepDistillation":
               "teacher", "train.methods.erasure.ConceptErasure": "model"}


def net_config(net: str) -> dict[str, Any]:
    spec = NETS[net]
    return {"class_path": "models.adapters.ClassConditionalUNet",
            "init_args": {"num_classes": 10, "sample_size": 8, "in_channels": 1, "layers_per_block": 1,
                          **{k: v for k, v in spec.items() if k != "batch"}}}


def teacher_config(net: str) -> dict[str, Any]:
    """A teacher's stored config (the form distillation modules record), without EMA: the frozen network."""
    return {"_class_path": "train.methods.teacher.TeacherPretraining", "net": net_config(net),
            "schedule": {"class_path": "guidance.schedules.VPCosine", "init_args": {"num_steps": 1000}},
            "parameterization": "v", "ema_decay": 0.0}


def build(method: str, net: str, ema: bool = True, batch: int | None = None):
    """(module, datamodule) of `method` (a METHODS key) on network size `net` (a NETS key).

    The frozen teacher is rebuilt from `teacher_config(net)` with random weights: the modules build it from
    the recorded config when the checkpoint path does not exist. Erasure draws `batch // 3` samples per term
    (erased concept, anchors, unconditional), so its student sees about `batch` samples per step, as the others."""
    from data.digits import DigitsDataModule
    from train.runtime.config import instantiate
    from data.steps import ErasureSteps

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    batch = batch or NETS[net]["batch"]
    _, class_path, args = METHODS[method]
    args = dict(args)
    if not ema:
        args["ema_decay"] = 0.0
    if class_path == "train.methods.teacher.TeacherPretraining":
        args["net"] = net_config(net)
    else:
        key = TEACHER_ARG[class_path]
        args[key] = f"(bench: random {net} teacher)"  # not a file: the module rebuilds the teacher from the config
        args[f"{key}_config"] = teacher_config(net)
    data = DigitsDataModule(batch_size=batch)
    if class_path == "train.methods.erasure.ConceptErasure":
        args["batch_size"] = max(1, batch // 3)
        data = ErasureSteps(steps_per_epoch=1000)
    return instantiate({"class_path": class_path, "init_args": args}), data


def prebuild_banks(module) -> None:
    """Erasure: sample every class's (and the null class's) trajectory bank now, so that no measured training
    step pays for building one (the module builds them lazily, the first time a class is drawn)."""
    from train.methods.erasure import ConceptErasure

    if isinstance(module, ConceptErasure) and module.x_t_source == "frozen_bank":
        bank = module._bank()
        for request in [module.conditioner.null_request, *(module.conditioner.enumerate() or [])]:
            bank.build(request, module.device)
