"""Export of the text-to-image adapters (models.text_unet, models.text_transformer): a full diffusers pipeline folder
(the trained UNet / transformer beside the base folder's text encoders, tokenizers and VAE) or LoRA weights in
diffusers' own format for the ORIGINAL pipeline folder (`pipe.load_lora_weights(EXPORT)`), and the model card's code
that samples either with StableDiffusion(XL)Pipeline / StableDiffusion3Pipeline / FluxPipeline alone."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from models.diffusers_export import LORA_WEIGHTS, cpu_state, export_scheduler, generator_scheduler, plain_network

NETWORK_FOLDERS = ("unet", "transformer")


def pipeline_class(root: Path) -> str:
    return json.loads((root / "model_index.json").read_text())["_class_name"]


def network_folder(root: Path) -> str:
    """unet or transformer: where the pipeline folder keeps its denoising network."""
    return next(s for s in NETWORK_FOLDERS if (root / s).is_dir())


class PipelineExport:
    """The export methods of a text adapter: one with `pretrained` (its pipeline folder), its diffusers network at
    `.unet` and `describe()`. VP models get a DDIM "trailing" scheduler whose steps equal the project's sampler
    (ending at clean data), latent consistency models and k-step generators an LCMScheduler
    (models.diffusers_export.export_scheduler; a generator's at its own timesteps, from latents sigma(t_0) z);
    flow models keep the base folder's flow-matching scheduler."""

    @staticmethod
    def _scheduler(schedule, parameterization: str, sampling: dict | None):
        """The scheduler the export writes to scheduler/, None for flow models (they keep the base folder's); a
        consistency model on a flow schedule: export_scheduler's one-line refusal; a VP k-step generator: the
        LCMScheduler for its timesteps, or generator_scheduler's one-line refusal of non-integer ones."""
        recipe = None if sampling is None else sampling.get("recipe")
        if recipe == "generator" and parameterization != "flow":
            return generator_scheduler(schedule, parameterization, sampling)
        lcm = recipe == "consistency"
        return export_scheduler(schedule, parameterization, sampling) if parameterization != "flow" or lcm else None

    def _pipeline_root(self) -> Path:
        if self.pretrained is None:
            raise ValueError(f"this {type(self).__name__} was built without a pipeline folder, so there is no pipeline "
                             f"to export it into; export --format safetensors instead")
        return Path(self.pretrained)

    def _pipeline_info(self, root: Path) -> dict:
        sub = network_folder(root)
        return {"pipeline": pipeline_class(root), "network_folder": sub, "network": f"pipe.{sub}",
                "base_pipeline": str(root)}

    def save_diffusers(self, folder: Path, schedule, parameterization: str, sampling: dict | None = None) -> dict:
        """folder <- the base pipeline folder with this network (LoRA merged) in place of unet/ or transformer/."""
        root = self._pipeline_root()
        info = self._pipeline_info(root)
        sub = info["network_folder"]
        scheduler = self._scheduler(schedule, parameterization, sampling)
        shutil.copytree(root, folder, dirs_exist_ok=True, ignore=lambda d, names: [n for n in names if Path(d) == root
                                                                                    and n == sub])
        plain_network(self).unet.save_pretrained(folder / sub, safe_serialization=True)
        if scheduler is not None:  # from_pretrained builds the class model_index.json names (SD 1.5's: PNDM)
            shutil.rmtree(folder / "scheduler")
            scheduler.save_pretrained(folder / "scheduler")
            index = json.loads((folder / "model_index.json").read_text())
            index["scheduler"] = ["diffusers", type(scheduler).__name__]
            (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        return {**info, "contents": f"A full pipeline folder: the trained `{sub}/` with the text encoders, tokenizers "
                                    f"and VAE of `{root}`."}

    def save_lora(self, folder: Path, schedule, parameterization: str, base_checkpoint: str | None = None,
                  sampling: dict | None = None) -> dict:
        """folder <- LORA_WEIGHTS with keys `unet.<module>.lora_A.weight` (or `transformer.`), written by the pipeline
        class's own save_lora_weights with the peft LoraConfig (rank, alpha, targets) as its adapter metadata, so
        `load_lora_weights` rebuilds the same scaling; `scheduler/` for VP models. base_checkpoint: unused (the base is
        this network's own pipeline folder)."""
        import diffusers

        from models.param_select import lora_adapter

        config, state = lora_adapter(self)
        scheduler = self._scheduler(schedule, parameterization, sampling)
        root = self._pipeline_root()
        info = self._pipeline_info(root)
        sub, cls = info["network_folder"], info["pipeline"]
        adapter = {**config.to_dict(), "inference_mode": True, "base_model_name_or_path": None}
        getattr(diffusers, cls).save_lora_weights(folder, weight_name=LORA_WEIGHTS, **{
            f"{sub}_lora_layers": cpu_state(state), f"{sub}_lora_adapter_metadata": adapter})
        if scheduler is not None:
            scheduler.save_pretrained(folder / "scheduler")
        return {**info, "lora": {"r": config.r, "lora_alpha": config.lora_alpha, "weights": LORA_WEIGHTS,
                                 "format": "diffusers"},
                "contents": f"LoRA weights (rank {config.r}, alpha {config.lora_alpha}) in diffusers' format for the "
                            f"`{sub}/` of `{root}`: load that folder, then `pipe.load_lora_weights(EXPORT)`."}

    def card_code(self, meta: dict) -> str:
        """The card's code: build the pipeline, hook a student's w-embedding, a generator's initial latents, then one
        pipeline call."""
        return f"{_loading_code(meta)}{_w_hook_code(meta)}{_generator_latents_code(meta)}image = {_sampling_call(meta)}"


def _lcm_generator(meta: dict) -> bool:
    """A VP k-step generator: sampled by the export's LCMScheduler at its own timesteps."""
    return meta["sampling"]["recipe"] == "generator" and meta["parameterization"] != "flow"


def _generator_latents_code(meta: dict) -> str:
    """A VP generator's first input: sigma(t_0) z (OneStepDistillation.run_generator's step 0), which the pipeline
    takes as latents= (LCMScheduler's init_noise_sigma is 1), with the re-noise drawn from the same generator."""
    if not _lcm_generator(meta):
        return ""
    g = meta["generator"]
    return f'''
# step 0 of the generator denoises sigma(t_0) z at timestep {g["timesteps"][0]:g}, not z; LCMScheduler then
# re-noises each x0 to the next timestep with fresh noise from `gen`
import torch
gen = torch.Generator().manual_seed(0)
config = pipe.{meta["network_folder"]}.config
latents = {g["sigma"][0]!r} * torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=gen)
'''


def _sampling_call(meta: dict) -> str:
    """The pipeline call that reproduces the project's sampler for this export. A Flux-dev transformer takes its
    embedded guidance as an input (FluxPipeline's guidance_scale: the conditioner's embedded_guidance it was trained
    with); true CFG is FluxPipeline's true_cfg_scale, every other pipeline's guidance_scale."""
    s, cls, embedded = meta["sampling"], meta["pipeline"], meta.get("embedded_guidance")
    w = meta.get("distilled_guidance_scale") if s["recipe"] == "generator" else 7.5
    args = ['"a photo of a cat"']
    if s["recipe"] == "cfg":
        args += ['negative_prompt="blurry"', f"true_cfg_scale={w}" if cls == "FluxPipeline" else f"guidance_scale={w}"]
    if cls == "FluxPipeline":
        args += [] if embedded is None else [f"guidance_scale={embedded}"]
    elif s["recipe"] != "cfg":  # one evaluation per step: the pipeline's own guidance off
        args += ["guidance_scale=1.0"]
    if _lcm_generator(meta):  # LCMScheduler at the generator's own timesteps, from sigma(t_0) z
        args += [f"timesteps={[int(round(t)) for t in s['timesteps']]}", "latents=latents", "generator=gen"]
    elif cls == "StableDiffusion3Pipeline":  # its default grid ends at sigma 1/1000, ours at 1/N
        args += [f'sigmas=[1 - i / {s["steps"]} for i in range({s["steps"]})]']
    else:
        args += [f'num_inference_steps={s["steps"]}']
    return f'pipe({", ".join(args)}).images[0]'


def _w_hook_code(meta: dict) -> str:
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


def _loading_code(meta: dict) -> str:
    """The lines that build the pipeline: the export itself, or the base folder with the LoRA (and the export's
    scheduler for VP models) loaded onto it."""
    cls = meta["pipeline"]
    if meta["format"] != "lora":
        return f'from diffusers import {cls}\npipe = {cls}.from_pretrained("EXPORT")\n'
    code = f'from diffusers import {cls}\npipe = {cls}.from_pretrained("{meta["base_pipeline"]}")\npipe.load_lora_weights("EXPORT")\n'
    if meta["parameterization"] != "flow":  # the DDIM "trailing" grid of the project's sampler, or LCM's sampler
        sched = "LCMScheduler" if meta["sampling"]["recipe"] in ("consistency", "generator") else "DDIMScheduler"
        code += f'from diffusers import {sched}\npipe.scheduler = {sched}.from_pretrained("EXPORT/scheduler")\n'
    return code
