"""`python -m train export`: a training checkpoint -> a diffusers model folder, peft LoRA weights or one safetensors file.

One writer per format, all behind the same atomic write (a hidden temporary folder next to the target, then a
rename; an existing target is refused unless `force`):

- diffusers:   `unet/` (UNet2DModel.from_pretrained; LoRA adapters merged in), `scheduler/` (DDIM, "trailing"),
               for text-to-image models a full pipeline folder (train.text_export),
               `w_embedding/` for guidance-distilled students (see train.model_card.WHY_W_EMBEDDING_IS_SEPARATE),
               `guidedistill.json` (method, parameterisation, schedule, sampling recipe, one-step times) and a
               model card `README.md` whose code samples the folder with diffusers alone;
- lora:        peft's `adapter_config.json` + `adapter_model.safetensors` for the base (teacher) UNet, plus
               `w_embedding/` for students, `guidedistill.json` and the card; for text-to-image models diffusers'
               own LoRA file for the original pipeline folder (`pipe.load_lora_weights`, train.text_export);
- safetensors: the sampling network's state dict (LoRA merged), the metadata under the key "guidedistill".
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import lightning as L
import torch

from guidance.denoiser import Denoiser
from models.param_select import lora_adapter, lora_layers, merge_lora
from models.w_embedding import WConditionedNetwork
from train.runtime.checkpoint import load_method
from train.model_card import WHY_W_EMBEDDING_IS_SEPARATE, model_card

FORMATS = ("diffusers", "lora", "safetensors")


def diffusers_scheduler(schedule, parameterization: str):
    """The diffusers scheduler whose DDIM steps equal ours (same alphas_cumprod, 'trailing' spacing)."""
    from diffusers import DDIMScheduler

    from guidance.schedules import VPCosine, VPLinear

    prediction = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}.get(parameterization)
    if prediction is None:
        raise ValueError(f"export to diffusers supports eps, v and x0 networks on VP schedules; this one predicts "
                         f"{parameterization!r} — export --format safetensors instead")
    common = dict(num_train_timesteps=schedule.num_steps if hasattr(schedule, "num_steps") else 1000,
                  prediction_type=prediction, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    if isinstance(schedule, VPCosine) and schedule.s == 0.008 and schedule.max_beta == 0.999:
        return DDIMScheduler(beta_schedule="squaredcos_cap_v2", **common)
    if isinstance(schedule, VPLinear):
        return DDIMScheduler(beta_schedule="scaled_linear" if schedule.scaled else "linear",
                             beta_start=schedule.beta_start, beta_end=schedule.beta_end, **common)
    raise ValueError(f"no diffusers scheduler reproduces {type(schedule).__name__}; export --format safetensors instead")


# ------------------------------------------------------------------------------------------------ what is exported

def plain_network(net: torch.nn.Module) -> torch.nn.Module:
    """`net` with any LoRA adapters merged into its weights (the original parameter names), else `net` itself."""
    return merge_lora(net) if lora_layers(net) else net


def generator_table(module) -> dict:
    """The one-step generator's times t, network times and alpha(t), sigma(t), as float32 values exactly as
    OneStepDistillation.run_generator uses them."""
    times = module.generator_times.float()
    sched = module.sampling_denoiser().schedule
    a, s = sched.alpha_sigma(times)
    return {"steps": len(times), "t": times.tolist(), "timesteps": sched.net_time(times).tolist(),
            "alpha": a.tolist(), "sigma": s.tolist()}


def export_meta(module, den: Denoiser, fmt: str, metrics: dict | None) -> dict:
    """guidedistill.json: the method, schedule, network description and how to sample the export."""
    hp = dict(module.hparams) if module.hparams else {}
    meta = {"method": module.method_name, "format": fmt, "parameterization": den.parameterization,
            "schedule": den.schedule.describe(), "guidance_convention": "D_u + w * (D_c - D_u)",
            **den.net.describe(), "sampling": module.recipe().describe()}
    if meta["sampling"]["recipe"] == "generator":
        meta["generator"] = generator_table(module)
        meta["distilled_guidance_scale"] = module.pg_sb_range or module.guidance_scale  # PG-SB: a range of w
    if "w_embedding" in meta:
        where = "keys w_embedding.*" if fmt == "safetensors" else "w_embedding/ (diffusers TimestepEmbedding weights)"
        meta["w_embedding"].update(in_unet=False, weights=where, why=WHY_W_EMBEDDING_IS_SEPARATE)
    meta["metrics"], meta["training_config"] = metrics, hp or None
    return meta


# ------------------------------------------------------------------------------------------------ writers

def write_diffusers(module, den: Denoiser, meta: dict, tmp: Path) -> Path:
    from train.text_export import text_base, write_text_pipeline

    net = plain_network(den.net)
    if text_base(den.net) is not None:  # a text-to-image model: a full pipeline folder
        return write_text_pipeline(module, den, meta, tmp, net)
    scheduler = diffusers_scheduler(den.schedule, den.parameterization)
    net.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    if isinstance(net, WConditionedNetwork):
        save_w_embedding(net, tmp / "w_embedding")
    write_card(tmp, meta)
    return tmp


def write_lora(module, den: Denoiser, meta: dict, tmp: Path) -> Path:
    from safetensors.torch import save_file

    from train.text_export import text_base, write_text_lora

    config, state = lora_adapter(den.net)
    check_lora_base(module, den.net)
    if text_base(den.net) is not None:  # diffusers' own LoRA format, for pipe.load_lora_weights
        return write_text_lora(module, den, meta, tmp, config, state)
    config = copy.deepcopy(config)
    config.inference_mode, config.base_model_name_or_path = True, None
    config.save_pretrained(tmp)  # adapter_config.json
    # the keys PeftModel.save_pretrained writes; set_peft_model_state_dict also takes them (it strips the prefix)
    save_file({f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()},
              tmp / "adapter_model.safetensors")
    if isinstance(den.net, WConditionedNetwork):
        save_w_embedding(den.net, tmp / "w_embedding")
    hp = meta.get("training_config") or {}
    meta = {**meta, "lora": {"r": config.r, "lora_alpha": config.lora_alpha, "peft_type": "LORA",
                             "base_checkpoint": hp.get("teacher") or hp.get("model")}}
    write_card(tmp, meta)
    return tmp


def write_safetensors(module, den: Denoiser, meta: dict, tmp: Path) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in plain_network(den.net).state_dict().items()}
    target = tmp / "model.safetensors"
    save_file(state, target, metadata={"guidedistill": json.dumps(meta, default=str)})
    return target


WRITERS: dict[str, Callable] = {"diffusers": write_diffusers, "lora": write_lora, "safetensors": write_safetensors}


def save_w_embedding(net: WConditionedNetwork, folder: Path) -> None:
    """The w-embedding as diffusers' `TimestepEmbedding` weights + the config that rebuilds it (names follow
    TimestepEmbedding's and Timesteps' arguments: our sinusoidal code is Timesteps(flip_sin_to_cos=True, shift 0))."""
    from safetensors.torch import save_file

    e = net.w_embedding
    folder.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in e.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "TimestepEmbedding", "in_channels": e.embed_dim, "time_embed_dim": e.hidden_dim,
              "out_dim": e.out_dim, "act_fn": "silu", "flip_sin_to_cos": True, "downscale_freq_shift": 0,
              "w_scale": e.w_scale, "input": "Timesteps(in_channels, flip_sin_to_cos, downscale_freq_shift)(w * w_scale)",
              "added_to": "the output of unet.time_embedding"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def check_lora_base(module, net: torch.nn.Module) -> None:
    """LoRA weights are only useful on the network they were trained on: check that the adapted network's base
    weights still equal the frozen teacher's (erasure: `frozen`, guidance distillation: `teacher`)."""
    frozen = next((d for d in (getattr(module, "frozen", None), getattr(module, "teacher", None))
                   if isinstance(d, Denoiser)), None)
    base = {k.replace(".base_layer.", "."): v for k, v in net.unet.state_dict().items() if ".lora_" not in k}
    ref = frozen.net.unet.state_dict() if frozen is not None else {}
    if base.keys() != ref.keys() or any(not torch.equal(v, ref[k]) for k, v in base.items()):
        raise ValueError(f"the {module.method_name!r} network's base weights are not its frozen teacher's (they were "
                         f"trained too), so its LoRA weights alone do not reproduce it; export --format diffusers")


def write_card(folder: Path, meta: dict) -> None:
    (folder / "guidedistill.json").write_text(json.dumps(meta, indent=2, default=str))
    (folder / "README.md").write_text(model_card(meta))


# ------------------------------------------------------------------------------------------------ the command

def export(ckpt: str | os.PathLike, out: str | os.PathLike, fmt: str = "diffusers", force: bool = False,
           metrics: dict | None = None) -> Path:
    """Export the sampling network of a checkpoint in format `fmt`; returns the written path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"export target {str(out)!r} exists; choose another --out or pass --force to replace it")
    module = load_method(ckpt)
    den = module.sampling_denoiser()
    meta = export_meta(module, den, fmt, metrics)
    return atomic_write(out, lambda tmp: WRITERS[fmt](module, den, meta, tmp))


def atomic_write(out: Path, write: Callable[[Path], Path]) -> Path:
    """Call write(tmp) with an empty hidden folder next to `out`, then rename what it returns (the folder or a
    file in it) to `out`, replacing an existing one; nothing is left behind when `write` fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result = write(tmp)
        if out.exists():  # the caller allowed replacing it (--force); removed just before the rename
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(result, out)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ W&B

class ExportArtifact(L.Callback):
    """At the end of training, export the model (`python -m train export`'s formats, with the last validation
    metrics in its model card) to `<run>/export` and log it to W&B as an artifact of type "model".

    format: diffusers (a folder from_pretrained loads), lora or safetensors.
    name:   artifact name; default "<run name>-model".
    Offline runs keep the artifact in the run folder; `wandb sync` uploads it with the rest of the run.
    Without a W&B logger the callback does nothing.
    """

    def __init__(self, format: str = "diffusers", name: str | None = None):
        if format not in FORMATS:
            raise ValueError(f"ExportArtifact format must be one of {', '.join(FORMATS)}, got {format!r}")
        self.format, self.name = format, name

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if not loggers or trainer.interrupted:
            return
        root = Path(trainer.default_root_dir)
        tmp = root / ".export-checkpoint"
        ckpt = tmp / "final.ckpt"
        trainer.save_checkpoint(ckpt)  # every rank takes part (a ZeRO checkpoint is written by all of them)
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            out = export(ckpt, root / "export" if self.format != "safetensors" else root / "export.safetensors",
                         self.format, force=True, metrics=metrics or None)
            self._log(loggers[0], out, pl_module, trainer, metrics)
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.strategy.barrier()

    def _log(self, logger, path: Path, pl_module, trainer: L.Trainer, metrics: dict) -> None:
        import wandb

        run = logger.experiment
        name = self.name or f"{run.name or run.id}-model"
        artifact = wandb.Artifact(name, type="model", metadata={
            "method": pl_module.method_name, "format": self.format, "step": int(trainer.global_step), **metrics})
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        run.log_artifact(artifact, aliases=["latest", f"step{trainer.global_step}"])
