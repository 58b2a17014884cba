"""The model card (README.md) of an export: what the model is and runnable code that samples it without guidedistill.

Every card holds one ```python block that needs only torch, diffusers, safetensors (and peft for LoRA). Its first
assignment line (`path, ... = ...`) holds what a user edits; the final samples are in `x` ([N, C, H, W], in
[-1, 1]). tests/train/test_export.py runs these blocks as written and compares `x` with `module.generate`.
"""
from __future__ import annotations

import json

# x0 from the raw output y at (x_t, a, s): the parameterisations diffusers' schedulers share
X0_FROM_OUTPUT = {"eps": "(x_t - s * y) / a", "v": "(a * x_t - s * y) / (a * a + s * s)", "x0": "y"}

WHY_W_EMBEDDING_IS_SEPARATE = (
    "diffusers' UNet2DModel has no guidance-scale input (no `time_cond_proj_dim` / `timestep_cond` as in "
    "UNet2DConditionModel, which LCM uses) and only one class-embedding slot, already taken by the class labels; "
    "UNet2DConditionModel cannot stand in for it either (its UNetMidBlock2D has no attention, and its `cond_proj` "
    "adds w before the time MLP, not after). So the w-embedding is stored beside unet/ in w_embedding/: the "
    "weights of diffusers' own `TimestepEmbedding` over a `Timesteps` code of w * w_scale, whose output is added to "
    "the output of `unet.time_embedding` (a forward hook, below). unet/ alone samples as if that term were zero.")


def sampling_code(meta: dict) -> str:
    """Python that samples the exported model with the ecosystem's libraries only (see module docstring)."""
    recipe, fmt, cfg = meta["sampling"]["recipe"], meta["format"], meta["config"]
    src = "base" if fmt == "lora" else "path"  # where unet/ and scheduler/ are
    lines = (["import json"] if recipe != "cfg" else []) + [
        "import torch", f"from diffusers import {'UNet2DModel' if recipe == 'generator' else 'DDIMScheduler, UNet2DModel'}"]
    if recipe == "w_input":
        lines += ["from diffusers.models.embeddings import TimestepEmbedding, Timesteps",
                  "from safetensors.torch import load_file"]
    if fmt == "lora":
        lines += ["from peft import PeftModel"]
    params = {"generator": "path, seed = \"PATH\", 0"}.get(
        recipe, f"path, w, steps, seed = \"PATH\", 2.0, {meta['sampling']['steps']}, 0")
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
    lines += [f"sched = DDIMScheduler.from_pretrained(f\"{{{src}}}/scheduler\")",
              "sched.set_timesteps(steps)",
              "x = z * sched.init_noise_sigma"]
    if recipe == "w_input":
        return "\n".join(lines + _w_embedding_hook() + _w_input_loop())
    return "\n".join(lines + _cfg_loop(meta))


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


def _generator_loop(meta: dict) -> list[str]:
    return ["g = json.load(open(f\"{path}/guidedistill.json\"))[\"generator\"]  # network times and their alpha, sigma",
            "with torch.no_grad():",
            "    for j, (t, a, s) in enumerate(zip(g[\"timesteps\"], g[\"alpha\"], g[\"sigma\"])):",
            "        x_t = s * z if j == 0 else a * x + s * torch.randn(z.shape, generator=gen)  # re-noise x0 (k > 1)",
            "        y = unet(x_t, torch.full((len(labels),), t), class_labels=labels).sample",
            f"        x = {X0_FROM_OUTPUT[meta['parameterization']]}  # x0 from the {meta['parameterization']} output"]


def _ddim_note(meta: dict) -> str:
    n = meta["schedule"].get("num_steps", 1000)
    return (f" DDIMScheduler steps from t to t - {n} // steps, so with a step count that divides {n} its grid is "
            f"exactly the one `python -m train sample` uses.")


def _what(meta: dict) -> str:
    s = meta["sampling"]
    if s["recipe"] == "generator":
        g = meta["generator"]
        return (f"A {g['steps']}-step generator trained by distribution matching against a guided teacher (guidance "
                f"w = {meta.get('distilled_guidance_scale')} is built in). Sample WITHOUT a scheduler loop: step 0 "
                f"feeds sigma * z (unit noise z) at the first recorded time and keeps the network's x0 prediction; each "
                f"further step re-noises that x0 to the next time. The network times and their alpha, sigma are "
                f"`guidedistill.json[\"generator\"]` (the values used in training): {g['steps']} network evaluation(s) "
                f"per sample.")
    if s["recipe"] == "w_input":
        return (f"A guidance-distilled student (Meng et al. 2023, arXiv 2210.03142): the guidance scale w is an "
                f"INPUT, so each DDIM step is one network evaluation. Sample with the DDIM scheduler in scheduler/ "
                f"('trailing' spacing) for {s['steps']} steps{' (the step count it was distilled for)' if s['distilled'] else ''}."
                f"{_ddim_note(meta)}\n\n**The w-embedding is not in unet/.** {WHY_W_EMBEDDING_IS_SEPARATE}")
    return ("A class-conditional diffusion model. Sample with classifier-free guidance, D = D_u + w (D_c - D_u), two "
            "network evaluations per step (the class and the null class in one batch), with the DDIM scheduler in "
            f"scheduler/ ('trailing' spacing).{_ddim_note(meta)}")


def _lora_note(meta: dict) -> str:
    if meta["format"] != "lora":
        return ""
    return (f"\n\n**LoRA adapters** (peft format: `adapter_config.json`, `adapter_model.safetensors`) for the base "
            f"UNet = the teacher this run started from, exported as diffusers with `python -m train export --ckpt "
            f"{meta['lora']['base_checkpoint']} --out BASE`. UNet2DModel has no diffusers LoRA loader (it is not a "
            f"PeftAdapterMixin, so no `load_lora_adapter`), so peft loads them: `PeftModel.from_pretrained(unet, PATH)` "
            f"(`.merge_and_unload()` gives a plain UNet2DModel), or `inject_adapter_in_model(LoraConfig.from_pretrained"
            f"(PATH), unet)` then `set_peft_model_state_dict(unet, load_peft_weights(PATH))`.")


def model_card(meta: dict) -> str:
    """README.md of an export: the model, how to sample it, the training config and the metrics."""
    return f"""# {meta['method']} exported by guidedistill

{_what(meta)}{_lora_note(meta)}

- method: `{meta['method']}`; parameterisation: `{meta['parameterization']}`; schedule: `{meta['schedule']['class']}`
- guidance convention: D = D_u + w (D_c - D_u) (w = 1 conditional); null class label: {meta['null_class_label']}
- network evaluations per sample: {meta['sampling']['steps'] * meta['sampling']['evaluations_per_step']} at the default steps below

## Sample with diffusers alone

```python
{sampling_code(meta)}
```

## Training config

```json
{json.dumps(meta.get('training_config'), indent=2)}
```

## Metrics

```json
{json.dumps(meta.get('metrics'), indent=2)}
```
"""
