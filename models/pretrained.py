"""Loading real model families from a local folder in diffusers layout: folder checks, dtypes, and the
project's schedule and parameterisation read from the folder's scheduler config."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from guidance.schedules import RectifiedFlow, Schedule, VPCosine, VPLinear

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_pipeline_folder(path: str | Path, *subfolders: str) -> Path:
    """The folder as a Path, after checking it exists and holds `subfolders`; a clear message otherwise
    (models are only ever loaded from local folders, never from the hub)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"pretrained model folder {str(path)!r} does not exist; set `pretrained:` to a local "
                                f"folder in diffusers layout (e.g. one written by `pipe.save_pretrained(dir)` or a "
                                f"snapshot of runwayml/stable-diffusion-v1-5); nothing is downloaded")
    for sub in subfolders:
        if not (root / sub).is_dir():
            have = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise FileNotFoundError(f"{root} has no {sub}/ folder (it has: {', '.join(have) or 'nothing'}); "
                                    f"is it a pipeline folder in diffusers layout?")
    return root


def read_json(root: Path, rel: str) -> dict:
    p = root / rel
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing; a pipeline folder in diffusers layout has it")
    return json.loads(p.read_text())


FAMILIES = {"StableDiffusionPipeline": "clip", "StableDiffusionXLPipeline": "sdxl",
            "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def pipeline_family(root: str | Path) -> str:
    """The prompt-encoder kind of a pipeline folder: clip (SD 1.x/2.x), sdxl, sd3 or flux, from model_index.json's
    _class_name, else from its folders (transformer/ with text_encoder_3/: sd3; transformer/: flux;
    text_encoder_2/: sdxl)."""
    root = Path(root)
    p = root / "model_index.json"
    name = json.loads(p.read_text()).get("_class_name", "") if p.is_file() else ""
    if name in FAMILIES:
        return FAMILIES[name]
    if (root / "transformer").is_dir():
        return "sd3" if (root / "text_encoder_3").is_dir() else "flux"
    return "sdxl" if (root / "text_encoder_2").is_dir() else "clip"


def flux_shift(path: str | Path, image_seq_len: int) -> float:
    """The rectified-flow shift a dynamic-shifting scheduler (Flux) uses for `image_seq_len` packed latent tokens
    ((H/16) (W/16) for Flux): exp(mu), mu linear in the token count between (base_image_seq_len, base_shift)
    and (max_image_seq_len, max_shift), as diffusers' calculate_shift; its exponential time shift
    e^mu t / (1 + (e^mu - 1) t) is guidance.schedules.RectifiedFlow(shift=e^mu)."""
    import math

    cfg = read_json(check_pipeline_folder(path, "scheduler"), "scheduler/scheduler_config.json")
    lo_n, hi_n = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    lo_s, hi_s = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    mu = lo_s + (hi_s - lo_s) * (image_seq_len - lo_n) / (hi_n - lo_n)
    return math.exp(mu)


def vae_scale_factor_of(root: str | Path) -> int:
    """Pixel size of one latent: 2^(levels - 1) of the folder's VAE (8 for SD/SDXL/SD3/Flux); 8 without a vae/."""
    p = Path(root) / "vae" / "config.json"
    if not p.is_file():
        return 8
    return 2 ** (len(json.loads(p.read_text())["block_out_channels"]) - 1)


def schedule_from_pretrained(path: str | Path, image_seq_len: int | None = None) -> tuple[Schedule, str]:
    """(schedule, parameterization) equal to the training schedule of the folder's scheduler/ config.

    DDPM-family schedulers (DDIM, PNDM, Euler, DPM-Solver, ...): beta_schedule "linear" or "scaled_linear"
    -> VPLinear, "squaredcos_cap_v2" -> VPCosine; prediction_type epsilon / v_prediction / sample -> eps / v / x0.
    Flow-matching schedulers (SD3, Flux): RectifiedFlow with the config's `shift` and parameterization
    "flow" (diffusers' velocity is noise - x0, ours too). Flux's dynamic shifting (a shift that depends
    on the image size) needs `image_seq_len`, the packed latent token count of the resolution (flux_shift).
    """
    cfg = read_json(check_pipeline_folder(path, "scheduler"), "scheduler/scheduler_config.json")
    name = cfg.get("_class_name", "")
    if name in FLOW_SCHEDULERS:
        if cfg.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise ValueError(f"{path}: the scheduler uses dynamic shifting (Flux): the shift depends on the image size; "
                                 f"give image_seq_len (packed latent tokens, (H/16)(W/16)) or build "
                                 f"guidance.schedules.RectifiedFlow(shift=...) for your resolution")
            if cfg.get("time_shift_type", "exponential") != "exponential":
                raise ValueError(f"{path}: only the exponential time shift is supported")
            return RectifiedFlow(shift=flux_shift(path, image_seq_len)), "flow"
        return RectifiedFlow(shift=float(cfg.get("shift", 1.0))), "flow"
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"{path}: unsupported prediction_type {kind!r}; supported: {', '.join(PREDICTION_TYPES)}")
    if cfg.get("trained_betas") is not None:
        raise ValueError(f"{path}: schedulers with explicit trained_betas are not supported")
    n, beta = int(cfg.get("num_train_timesteps", 1000)), cfg.get("beta_schedule", "linear")
    if beta in ("linear", "scaled_linear"):
        sched: Schedule = VPLinear(n, float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02)),
                                   scaled=beta == "scaled_linear")
    elif beta == "squaredcos_cap_v2":
        sched = VPCosine(n)
    else:
        raise ValueError(f"{path}: unsupported beta_schedule {beta!r}; supported: linear, scaled_linear, squaredcos_cap_v2")
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError(f"{path}: rescale_betas_zero_snr is not supported by the project's VP schedules")
    return sched, PREDICTION_TYPES[kind]
