"""Shared by the text-to-image method tests: tiny pipeline folders (built once per session, per kind), captioned
images and prompts, and the methods fitted two steps through the CLI on them (once per method, kind and settings);
plus the diffusers pipeline calls that reproduce our samplers in-process."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

PROMPTS = ["a cat", "the dog"]
FLUX_GUIDANCE = 3.5  # the embedded guidance of a Flux-dev folder's conditioner (FluxPipeline's guidance_scale)
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline"}
TRAINER = {"max_steps": 2, "accelerator": "cpu", "limit_val_batches": 1, "check_val_every_n_epoch": None,
           "val_check_interval": 2, "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
           "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"save_last": True, "save_top_k": 0}}]}
CONCEPTS = {"concepts": [{"name": "cat", "prompts": ["a cat", "the cat"]},
                         {"name": "car", "prompts": ["a red car"], "alternative": "a car"}], "anchors": ["the dog"]}


class TextWorkspace:
    """A temporary root with tiny pipeline folders (`model(kind)`), captioned 16 px images, a prompt file, and the
    last.ckpt of each method fitted on each kind (`fitted(method, kind, **model_overrides)`)."""

    def __init__(self, root: Path):
        self.root, self.models, self.runs = root, {}, {}
        self.images = root / "images"
        self.images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(self.images / f"{i}.png")
            (self.images / f"{i}.txt").write_text(["a cat", "the dog", "a red car"][i % 3])
        self.prompts = root / "prompts.txt"
        self.prompts.write_text("a cat\nthe dog\na red car\na cat of the dog\nthe red dog\na car\n")

    def model(self, kind: str) -> Path:
        from models.tiny_pipelines import save_tiny_pipeline

        if kind not in self.models:
            self.models[kind] = save_tiny_pipeline(self.root / kind, kind)
        return self.models[kind]

    def config(self, method: str, kind: str, **overrides) -> dict:
        """The fit config of `method` on the tiny `kind` folder; `overrides` replace model init_args."""
        model = str(self.model(kind))  # a Flux-dev folder: its conditioner gives embedded guidance 3.5 with every prompt
        if method == "gd":
            cfg = {"model": {"class_path": "train.methods.guidance_distillation.GuidanceDistillation", "init_args": {
                       "teacher": model, "w_min": 1.0, "w_max": 4.0, "lr": 1e-4, "warmup_steps": 1, "ema_decay": 0.0,
                       "val_samples": 0}},
                   "data": {"class_path": "data.captions.CaptionedImageDataModule", "init_args": {
                       "path": str(self.images), "image_size": 16, "batch_size": 2, "val_size": 2}}}
        elif method == "dmd":
            cfg = {"model": {"class_path": "train.methods.onestep.OneStepDistillation", "init_args": {
                       "teacher": model, "guidance_scale": 3.0, "fake_score": {"mode": "lora", "rank": 4},
                       "generator": {"lr": 1e-3}, "ema_decay": 0.0, "val_samples": 0}},
                   "data": {"class_path": "data.prompts.PromptDataModule", "init_args": {
                       "path": str(self.prompts), "batch_size": 2, "val_size": 2}}}
        elif method == "erase":
            cfg = {"model": {"class_path": "train.methods.erasure.ConceptErasure", "init_args": {
                       "model": model, "concepts": CONCEPTS, "params": "esd-x", "uncond_weight": 1.0, "batch_size": 2,
                       "trajectory_steps": 3, "bank_size": 2, "lr": 0.01}},
                   "data": {"class_path": "data.steps.ErasureSteps", "init_args": {"steps_per_epoch": 4}}}
        elif method == "gd_prompts":  # data-free guidance distillation: x_t from the teacher's guided trajectories
            cfg = {"model": {"class_path": "train.methods.guidance_distillation.GuidanceDistillation", "init_args": {
                       "teacher": model, "w_min": 1.0, "w_max": 4.0, "lr": 1e-4, "warmup_steps": 1, "ema_decay": 0.0,
                       "val_samples": 0, "trajectory_steps": 3}},
                   "data": {"class_path": "data.prompts.PromptDataModule", "init_args": {
                       "path": str(self.prompts), "batch_size": 2, "val_size": 2}}}
        elif method == "pd":  # progressive distillation of the "gd" student: 4 -> 2 -> 1 steps, one step per round
            cfg = {"model": {"class_path": "train.methods.progressive.ProgressiveDistillation", "init_args": {
                       "student": str(self.fitted("gd", kind)), "start_steps": 4, "end_steps": 1, "steps_per_round": 1,
                       "lr": 1e-4, "warmup_steps": 1, "ema_decay": 0.5, "val_samples": 0}},
                   "data": {"class_path": "data.captions.CaptionedImageDataModule", "init_args": {
                       "path": str(self.images), "image_size": 16, "batch_size": 2, "val_size": 2}}}
        elif method == "teacher":  # fine-tuning the folder's network on captioned images, with caption dropout
            from train.runtime.checkpoint import pipeline_teacher_config

            teacher = pipeline_teacher_config(model)
            cfg = {"model": {"class_path": teacher.pop("_class_path"), "init_args": {
                       **teacher, "p_uncond": 0.1, "lr": 1e-4, "warmup_steps": 1, "val_samples": 0}},
                   "data": {"class_path": "data.captions.CaptionedImageDataModule", "init_args": {
                       "path": str(self.images), "image_size": 16, "batch_size": 2, "val_size": 2}}}
        elif method == "uce":  # closed-form erasure: the run's one step is the edit
            cfg = {"model": {"class_path": "train.methods.uce.ClosedFormErasure", "init_args": {
                       "model": model, "concepts": CONCEPTS, "val_samples": 0}},
                   "data": {"class_path": "data.steps.ErasureSteps", "init_args": {"steps_per_epoch": 1}},
                   "trainer": {"max_steps": 1, "limit_val_batches": 0, "val_check_interval": None}}
        elif method == "lcm":  # LCM-LoRA: w baked in, rank 2, the student itself as the target, 50-point solver grid
            cfg = {"model": {"class_path": "train.methods.consistency.ConsistencyDistillation", "init_args": {
                       "teacher": model, "w_min": 3.0, "w_max": 15.0, "w_input": False, "solver_steps": 50,
                       "target_decay": 0.0, "lora_rank": 2, "lr": 1e-4, "warmup_steps": 1, "val_samples": 0}},
                   "data": self.config("gd", kind)["data"]}
        elif method == "fdistill":  # f-distill JS with the GAN term: a discriminator on captioned latents
            cfg = self.config("dmd", kind)
            cfg["model"]["init_args"].update(objective={"divergence": "jensen_shannon"},
                                             discriminator={"gan_weight": 0.1, "hidden": 16})
            cfg["data"] = self.config("gd", kind)["data"]
        else:
            raise ValueError(f"unknown method {method!r}")
        cfg["model"]["init_args"].update(overrides)
        return cfg

    def fitted(self, method: str, kind: str, **overrides) -> Path:
        """The last.ckpt of `method` fitted 2 steps through the CLI on the tiny `kind` folder (fitted once)."""
        from train.cli import main

        key = (method, kind, json.dumps(overrides, sort_keys=True))
        if key not in self.runs:
            name = f"{method}-{kind}" + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            run, path = self.root / f"run-{name}", self.root / f"{name}.yaml"
            config = self.config(method, kind, **overrides)
            trainer = {**TRAINER, **config.pop("trainer", {}), "default_root_dir": str(run)}
            path.write_text(yaml.safe_dump({"seed_everything": 0, **config, "trainer": trainer}, sort_keys=False))
            main(["fit", "--config", str(path)])
            self.runs[key] = run / "checkpoints" / "last.ckpt"
        return self.runs[key]


def randomised(ckpt: Path, out: Path, *names: str, std: float = 0.1, seed: int = 0) -> Path:
    """A copy of checkpoint `ckpt` at `out` whose weights with any of `names` in their key are drawn N(0, std^2), so
    that what two steps barely moved (LoRA B, the w-embedding's last layer) visibly matters."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(seed)
    hit = [k for k in state["state_dict"] if any(n in k for n in names)]
    assert hit, f"no weights named like {names} in {ckpt}"
    for k in hit:
        v = state["state_dict"][k]
        state["state_dict"][k] = (std * torch.randn(v.shape, generator=g)).to(v.dtype)
    torch.save(state, out)
    return out


def pipeline_latents(pipe, kind: str, noise: torch.Tensor, args: dict) -> torch.Tensor:
    """The latents [B, C, h, w] a diffusers pipeline generates from initial `noise` [B, C, h, w] (packed and
    unpacked for Flux), with `args` its call arguments."""
    from models.text_transformer import pack_latents, unpack_latents

    flux = kind == "flux"
    h, w = noise.shape[-2:]
    if flux:
        args = {**args, "height": h * pipe.vae_scale_factor, "width": w * pipe.vae_scale_factor}
    out = pipe(**args, latents=pack_latents(noise) if flux else noise.clone(), output_type="latent").images
    return unpack_latents(out, h, w) if flux else out


def card_call(folder: Path) -> dict:
    """The keyword arguments of the pipeline call (`image = pipe(...).images[0]`) in an export's model card that are
    values; those naming the card's own variables (a generator's `latents=latents, generator=gen`) are left to the
    caller, which supplies its own noise."""
    import ast

    code = (folder / "README.md").read_text().split("```python\n", 1)[1].split("\n```", 1)[0]
    call = ast.parse(code.rsplit("image = ", 1)[1]).body[0].value.value.value  # pipe(...) in pipe(...).images[0]
    return {k.arg: eval(compile(ast.Expression(k.value), "card", "eval"), {}) for k in call.keywords
            if not isinstance(k.value, ast.Name)}
