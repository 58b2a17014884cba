"""The class-conditional UNet's export (models.adapters.ClassConditionalUNet): peft adapter files for its UNet2DModel
and the model card's code that samples the export with torch, diffusers, safetensors (and peft) alone.

The card's code holds one ```python block. Its first assignment line (`path, ... = ...`) holds what a user edits; the
final samples are in `x` ([N, C, H, W], in [-1, 1]). tests/train/test_export.py runs these blocks as written and
compares `x` with `module.generate`.
"""
from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from models.diffusers_export import cpu_state

# x0 from the raw output y at (x_t, a, s): the parameterisations diffusers' schedulers share
X0_FROM_OUTPUT = {"eps": "(x_t - s * y) / a", "v": "(a * x_t - s * y) / (a * a + s * s)", "x0": "y"}

WHY_W_EMBEDDING_IS_SEPARATE = (
    "diffusers' UNet2DModel has no guidance-scale input (no `time_cond_proj_dim` / `timestep_cond` as in "
    "UNet2DConditionModel, which LCM uses) and only one class-embedding slot, already taken by the class labels; "
    "UNet2DConditionModel cannot stand in for it either (its UNetMidBlock2D has no attention, and its `cond_proj` "
    "adds w before the time MLP, not after). So the w-embedding is stored beside unet/ in w_embedding/: the "
    "weights of diffusers' own `TimestepEmbedding` over a `Timesteps` code of w * w_scale, whose output is added to "
    "the output of `unet.time_embedding` (a forward hook, below). unet/ alone samples as if that term were zero.")


def save_peft_adapter(net: nn.Module, folder: Path):
    """folder <- peft's adapter_config.json + adapter_model.safetensors for the UNet2DModel `net.unet`; returns the
    LoraConfig. UNet2DModel has no diffusers LoRA loader, so peft loads these (PeftModel.from_pretrained)."""
    from safetensors.torch import save_file

    from models.param_select import lora_adapter

    config, state = lora_adapter(net)
    config = copy.deepcopy(config)
    config.inference_mode, config.base_model_name_or_path = True, None
    config.save_pretrained(folder)  # adapter_config.json
    # the keys PeftModel.save_pretrained writes; set_peft_model_state_dict also takes them (it strips the prefix)
    save_file({f"base_model.model.{k}": v for k, v in cpu_state(state).items()}, folder / "adapter_model.safetensors")
    return config


def lora_contents(meta: dict) -> str:
    return (f"**LoRA adapters** (peft format: `adapter_config.json`, `adapter_model.safetensors`) for the base "
            f"UNet = the teacher this run started from, exported as diffusers with `python -m train export --ckpt "
            f"{meta['lora']['base_checkpoint']} --out BASE`. UNet2DModel has no diffusers LoRA loader (it is not a "
            f"PeftAdapterMixin, so no `load_lora_adapter`), so peft loads them: `PeftModel.from_pretrained(unet, PATH)` "
            f"(`.merge_and_unload()` gives a plain UNet2DModel), or `inject_adapter_in_model(LoraConfig.from_pretrained"
            f"(PATH), unet)` then `set_peft_model_state_dict(unet, load_peft_weights(PATH))`.")


def sampling_code(meta: dict) -> str:
    """Python that samples the exported model with the ecosystem's libraries only (see module docstring)."""
    recipe, fmt, cfg = meta["sampling"]["recipe"], meta["format"], meta["config"]
    w_input = recipe == "w_input" or (recipe == "consistency" and meta["sampling"]["w_input"])
    # where scheduler/ is: a LoRA export's base (the teacher's DDIM one); a consistency model's LoRA export has its own
    src = "base" if fmt == "lora" and recipe != "consistency" else "path"
    scheduler = {"generator": None, "consistency": "LCMScheduler"}.get(recipe, "DDIMScheduler")
    lines = (["import json"] if recipe == "generator" or w_input else []) + [
        "import torch", f"from diffusers import {f'{scheduler}, ' if scheduler else ''}UNet2DModel"]
    if w_input:
        lines += ["from diffusers.models.embeddings import TimestepEmbedding, Timesteps",
                  "from safetensors.torch import load_file"]
    if fmt == "lora":
        lines += ["from peft import PeftModel"]
    params = {"generator": "path, seed = \"PATH\", 0"}.get(
        recipe, f"path, w, steps, seed = \"PATH\", {_card_scale(meta)}, {meta['sampling']['steps']}, 0")
    if recipe == "consistency" and not w_input:  # the guidance it was distilled with is part of the network
        params = f"path, steps, seed = \"PATH\", {meta['sampling']['steps']}, 0"
    if fmt == "lora":
        params = params.replace("path,", "path, base,").replace('"PATH",', '"PATH", "BASE",')
        params += "  # BASE: the teacher exported by `python -m train export`"
    lines += ["", params]
    if fmt == "lora":
        lines += ["unet = PeftModel.from_pretrained(UNet2DModel.from_pretrained(f\"{base}/unet\"), path)"
                  ".merge_and_unload().eval()"]
    else:
        lines += ["unet = UNet2DModel.from_pretrained(f\"{path}/unet\").eval()"]
    lines += [f"labels = torch.arange({meta['num_classes']})  # class labels; {meta['null_class_label']} is the null class",
              "gen = torch.Generator().manual_seed(seed)",
              f"z = torch.randn(len(labels), {cfg['in_channels']}, {cfg['sample_size']}, {cfg['sample_size']}, generator=gen)"]
    if recipe == "generator":
        return "\n".join(lines + _generator_loop(meta))
    lines += [f"sched = {scheduler}.from_pretrained(f\"{{{src}}}/scheduler\")",
              "sched.set_timesteps(steps)",
              "x = z * sched.init_noise_sigma"]
    hook = _w_embedding_hook() if w_input else []
    if recipe == "consistency":
        return "\n".join(lines + hook + _consistency_loop())
    if recipe == "w_input":
        return "\n".join(lines + hook + _w_input_loop())
    return "\n".join(lines + _cfg_loop(meta))


def _card_scale(meta: dict) -> float:
    """The card's default w: 2, or the nearest end of the range a consistency model was distilled over."""
    lo, hi = meta["sampling"].get("scale_range") or (2.0, 2.0)
    return float(min(max(2.0, lo), hi))


def _cfg_loop(meta: dict) -> list[str]:
    return [f"null = torch.full_like(labels, {meta['null_class_label']})",
            "with torch.no_grad():",
            "    for t in sched.timesteps:  # classifier-free guidance: conditional and null branch in one batch",
            "        c, u = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)",
            "        x = sched.step(u + w * (c - u), t, x).prev_sample"]


def _w_embedding_hook() -> list[str]:
    return ["e = json.load(open(f\"{path}/w_embedding/config.json\"))",
            "w_code = Timesteps(e[\"in_channels\"], e[\"flip_sin_to_cos\"], e[\"downscale_freq_shift\"])",
            "w_mlp = TimestepEmbedding(e[\"in_channels\"], e[\"time_embed_dim\"], out_dim=e[\"out_dim\"])",
            "w_mlp.load_state_dict(load_file(f\"{path}/w_embedding/diffusion_pytorch_model.safetensors\"))",
            "with torch.no_grad():",
            "    w_emb = w_mlp(w_code(torch.full((len(labels),), float(w)) * e[\"w_scale\"]))",
            "unet.time_embedding.register_forward_hook(lambda module, args, out: out + w_emb)  # the student's w input"]


def _w_input_loop() -> list[str]:
    return ["with torch.no_grad():",
            "    for t in sched.timesteps:  # ONE network evaluation per step: w is an input, not a second branch",
            "        x = sched.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample"]


def _consistency_loop() -> list[str]:
    return ["with torch.no_grad():",
            "    for t in sched.timesteps:  # multistep consistency sampling: one evaluation per step, then LCMScheduler",
            "        # keeps c_skip x + c_out x0 and re-noises it to the next time with fresh noise from gen",
            "        x = sched.step(unet(x, t, class_labels=labels).sample, t, x, generator=gen).prev_sample"]


def _generator_loop(meta: dict) -> list[str]:
    return ["g = json.load(open(f\"{path}/guidedistill.json\"))[\"generator\"]  # network times and their alpha, sigma",
            "with torch.no_grad():  # no scheduler loop: step 0 denoises sigma * z, each further step re-noises x0",
            "    for j, (t, a, s) in enumerate(zip(g[\"timesteps\"], g[\"alpha\"], g[\"sigma\"])):",
            "        x_t = s * z if j == 0 else a * x + s * torch.randn(z.shape, generator=gen)  # re-noise x0 (k > 1)",
            "        y = unet(x_t, torch.full((len(labels),), t), class_labels=labels).sample",
            f"        x = {X0_FROM_OUTPUT[meta['parameterization']]}  # x0 from the {meta['parameterization']} output"]
