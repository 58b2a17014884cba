"""Export of a text-to-image model as a full diffusers pipeline folder (the trained UNet / transformer beside the
base folder's text encoders, tokenizers and VAE, a scheduler whose steps equal the project's sampler) or as LoRA
weights in diffusers' own format for the ORIGINAL pipeline folder (`pipe.load_lora_weights(EXPORT)`), each with a
model card that samples it with StableDiffusion(XL)Pipeline / StableDiffusion3Pipeline / FluxPipeline alone."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from guidance.denoiser import Denoiser

NETWORK_FOLDERS = ("unet", "transformer")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for


def text_base(net: nn.Module) -> nn.Module | None:
    """The text adapter inside a (w-conditioned) network, or None for class-conditional networks."""
    inner = getattr(net, "base", net)
    return inner if getattr(inner, "pretrained", None) is not None else None


def pipeline_class(root: Path) -> str:
    return json.loads((root / "model_index.json").read_text())["_class_name"]


def network_folder(root: Path) -> str:
    """unet or transformer: where the pipeline folder keeps its denoising network."""
    return next(s for s in NETWORK_FOLDERS if (root / s).is_dir())


def save_text_w_embedding(net, folder: Path, sub: str) -> None:
    """The student's w-embedding (train.export.save_w_embedding), its config naming the pipeline module it is added to."""
    from train.export import save_w_embedding

    save_w_embedding(net, folder)
    config = json.loads((folder / "config.json").read_text())
    config["added_to"] = f"the output of pipe.{sub}.{net.hooked.split('.', 1)[1]}"
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_text_pipeline(module, den: Denoiser, meta: dict, tmp: Path, plain: nn.Module) -> Path:
    """tmp <- the base pipeline folder with the trained network (`plain`: LoRA merged) in place of unet/ or
    transformer/; `w_embedding/` for guidance-distilled students; a DDIM "trailing" scheduler for VP models (the
    grid of guidance.samplers, ending at clean data), the base folder's flow-matching scheduler otherwise."""
    from models.w_embedding import WConditionedNetwork
    from train.export import diffusers_scheduler

    base = text_base(den.net)
    root = Path(base.pretrained)
    sub = network_folder(root)
    shutil.copytree(root, tmp, dirs_exist_ok=True, ignore=lambda d, names: [n for n in names if Path(d) == root and n == sub])
    plain_base = plain.base if isinstance(plain, WConditionedNetwork) else plain
    plain_base.unet.save_pretrained(tmp / sub, safe_serialization=True)
    if den.parameterization != "flow":
        shutil.rmtree(tmp / "scheduler")
        diffusers_scheduler(den.schedule, den.parameterization).save_pretrained(tmp / "scheduler")
    if isinstance(plain, WConditionedNetwork):
        save_text_w_embedding(plain, tmp / "w_embedding", sub)
    meta = {**meta, "pipeline": pipeline_class(root), "network_folder": sub, "base_pipeline": str(root)}
    (tmp / "guidedistill.json").write_text(json.dumps(meta, indent=2, default=str))
    (tmp / "README.md").write_text(text_model_card(meta))
    return tmp


def write_text_lora(module, den: Denoiser, meta: dict, tmp: Path, config, state: dict) -> Path:
    """tmp <- the LoRA adapter of a text model in diffusers' format for its base pipeline folder: LORA_WEIGHTS with
    keys `unet.<module>.lora_A.weight` (or `transformer.`), written by the pipeline class's own save_lora_weights
    with the peft LoraConfig (rank, alpha, targets) as its adapter metadata, so `load_lora_weights` rebuilds the
    same scaling. Beside it: `scheduler/` (VP models: the DDIM "trailing" scheduler whose steps equal ours; flow
    models keep the base folder's), `w_embedding/` for guidance-distilled students (added by the card's hook:
    diffusers' LoRA loader has no place for a new embedding), guidedistill.json and the card.

    config, state: models.param_select.lora_adapter(den.net) (peft keys relative to the diffusers network)."""
    import diffusers

    from models.w_embedding import WConditionedNetwork
    from train.export import diffusers_scheduler

    root = Path(text_base(den.net).pretrained)
    sub, cls = network_folder(root), pipeline_class(root)
    adapter = {**config.to_dict(), "inference_mode": True, "base_model_name_or_path": None}
    weights = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    getattr(diffusers, cls).save_lora_weights(tmp, weight_name=LORA_WEIGHTS, **{f"{sub}_lora_layers": weights,
                                                                                 f"{sub}_lora_adapter_metadata": adapter})
    if den.parameterization != "flow":
        diffusers_scheduler(den.schedule, den.parameterization).save_pretrained(tmp / "scheduler")
    if isinstance(den.net, WConditionedNetwork):
        save_text_w_embedding(den.net, tmp / "w_embedding", sub)
    meta = {**meta, "pipeline": cls, "network_folder": sub, "base_pipeline": str(root),
            "lora": {"r": config.r, "lora_alpha": config.lora_alpha, "weights": LORA_WEIGHTS, "format": "diffusers"}}
    (tmp / "guidedistill.json").write_text(json.dumps(meta, indent=2, default=str))
    (tmp / "README.md").write_text(text_model_card(meta))
    return tmp


def sampling_call(meta: dict) -> str:
    """The pipeline call that reproduces the project's sampler for this export."""
    s, flux = meta["sampling"], meta["pipeline"] == "FluxPipeline"
    w = meta.get("distilled_guidance_scale") if s["recipe"] == "generator" else 7.5
    if s["recipe"] != "cfg":  # one evaluation per step: the pipeline's own guidance off
        scale = "guidance_scale=1.0" if not flux else "guidance_scale=1.0  # embedded guidance input; no true CFG"
        return f'pipe("a photo of a cat", num_inference_steps={s["steps"]}, {scale}).images[0]'
    if meta["pipeline"] == "StableDiffusion3Pipeline":  # its default grid ends at sigma 1/1000, ours at 1/N
        grid = f'sigmas=[1 - i / {s["steps"]} for i in range({s["steps"]})]'
        return f'pipe("a photo of a cat", negative_prompt="blurry", guidance_scale={w}, {grid}).images[0]'
    if flux:
        return (f'pipe("a photo of a cat", negative_prompt="blurry", true_cfg_scale={w}, guidance_scale=1.0, '
                f'num_inference_steps={s["steps"]}).images[0]')
    return f'pipe("a photo of a cat", negative_prompt="blurry", guidance_scale={w}, num_inference_steps={s["steps"]}).images[0]'


def w_hook_code(meta: dict) -> str:
    if "w_embedding" not in meta:
        return ""
    sub, e = meta["network_folder"], meta["w_embedding"]
    hooked = e["added_to"].split(" ")[0].split(".", 1)[1]
    return f'''
# the guidance-distilled student takes w as an input: its w-embedding is added to the time embedding
import json, torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from safetensors.torch import load_file
cfg = json.load(open("EXPORT/w_embedding/config.json"))
emb = TimestepEmbedding(cfg["in_channels"], cfg["time_embed_dim"], out_dim=cfg["out_dim"])
emb.load_state_dict(load_file("EXPORT/w_embedding/diffusion_pytorch_model.safetensors"))
code, w = Timesteps(cfg["in_channels"], True, 0), 5.0   # the distilled scale, D_u + w (D_c - D_u)
pipe.{sub}.{hooked}.register_forward_hook(
    lambda m, i, out: out + emb(code(torch.full((out.shape[0],), w * cfg["w_scale"])).to(out)))
'''


def loading_code(meta: dict) -> str:
    """The lines that build the pipeline: the export itself, or the base folder with the LoRA (and the export's
    scheduler for VP models) loaded onto it."""
    cls = meta["pipeline"]
    if "lora" not in meta:
        return f'from diffusers import {cls}\npipe = {cls}.from_pretrained("EXPORT")\n'
    code = f'from diffusers import {cls}\npipe = {cls}.from_pretrained("{meta["base_pipeline"]}")\npipe.load_lora_weights("EXPORT")\n'
    if meta["parameterization"] != "flow":  # the DDIM "trailing" grid of the project's sampler
        code += 'from diffusers import DDIMScheduler\npipe.scheduler = DDIMScheduler.from_pretrained("EXPORT/scheduler")\n'
    return code


def text_model_card(meta: dict) -> str:
    what = (f"LoRA weights (rank {meta['lora']['r']}, alpha {meta['lora']['lora_alpha']}) in diffusers' format for the "
            f"`{meta['network_folder']}/` of `{meta['base_pipeline']}`: load that folder, then "
            f"`pipe.load_lora_weights(EXPORT)`" if "lora" in meta else
            f"A full pipeline folder: the trained `{meta['network_folder']}/` with the text encoders, tokenizers and VAE "
            f"of `{meta['base_pipeline']}`")
    return f"""# {meta['method']} exported by guidedistill ({meta['pipeline']})

{what}. Guidance convention D = D_u + w (D_c - D_u) (diffusers' guidance_scale; Flux's
true_cfg_scale). Sampling recipe: `{meta['sampling']['recipe']}`, {meta['sampling']['steps']} steps,
{meta['sampling']['evaluations_per_step']} network evaluation(s) per step.

## Sample with diffusers alone

```python
{loading_code(meta)}{w_hook_code(meta)}image = {sampling_call(meta)}
```

## Training config

```json
{json.dumps(meta.get('training_config'), indent=2, default=str)}
```

## Metrics

```json
{json.dumps(meta.get('metrics'), indent=2)}
```
"""
