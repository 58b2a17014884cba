"""The scale bench's networks and rows: Stable Diffusion 1.5's UNet at a width fraction (random weights, written as a
pipeline folder with a CLIP-L-size text encoder), random latents with prompts, and each row's method config.

    folder = sd_folder(Path("runs/bench-scale-models"), 0.5, 32)   # SD 1.5 at half width, 4x32x32 latents
    module, data = build_row("dmd_lora_bf16", "sd15/2", folder, batch=1)

Rows are the methods' own modules built from configs (train/methods/*), as bench.methods builds them for the
digits networks; the SD networks are loaded through the project's pipeline-folder path (TextConditionalUNet over
the folder, prompts through the folder's text encoder), exactly as a user's SD 1.5 snapshot would be.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset

# Stable Diffusion 1.5's unet/config.json (runwayml/stable-diffusion-v1-5); block_out_channels scale with the width
SD15_UNET = {"act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
             "center_input_sample": False, "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
             "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
# SD 1.5's text_encoder/config.json (CLIP ViT-L/14's text tower, 123M parameters); "small": one layer of the same
# width (the quick mode's: cross-attention reads 768-wide tokens either way)
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
TEXT_ENCODERS = {"clip-l": CLIP_L, "small": {**CLIP_L, "num_hidden_layers": 1, "intermediate_size": 768, "vocab_size": 1024}}

# network name -> SD 1.5 width fraction; the class-conditional digits networks are bench.methods.NETS
SD_NETS = {"sd15": 1.0, "sd15/2": 0.5, "sd15/4": 0.25, "sd15/8": 0.125}
PROMPTS = ["a photo of a cat", "a red car in the rain", "a painting of a lighthouse", "a bowl of fruit on a table",
           "a mountain lake at dawn", "a portrait of an old man", "a city street at night", "a dog on a beach"]
CONCEPTS = {"concepts": [{"name": "van gogh", "prompts": ["van gogh", "a painting in the style of van gogh"]}],
            "anchors": ["a painting by monet", "a photo of a cat"]}
LORA_RANK = 64  # configs/sd15/dmd.yaml's (the digits networks: bench.methods' r32)
FAKE_UPDATES = 1  # fake-score updates per generator update (configs/sd15/dmd.yaml: 10; the peak does not change)

# row -> (label, bench.methods key its digits-network version starts from, overrides for both kinds, text-only args)
ROWS: dict[str, tuple[str, str, dict, dict]] = {
    "plain": ("plain fine-tuning (AdamW, fp32 master weights)", "plain", {"ema_decay": 0.0, "p_uncond": 0.0}, {}),
    "teacher": ("teacher training, caption/label dropout 0.1", "teacher", {"ema_decay": 0.0}, {}),
    "guidance_distillation": ("guidance distillation (w-embedding, fp32 teacher)", "guidance_distillation",
                              {"ema_decay": 0.0, "val_samples": 0}, {"w_min": 2.0, "w_max": 14.0}),
    "dmd_lora_bf16": ("one-step DMD, LoRA fake score on a bf16 frozen base (ours)", "dmd_lora_bf16",
                      {"ema_decay": 0.0, "val_samples": 0, "fake_score": {"mode": "lora", "updates": FAKE_UPDATES}},
                      {"guidance_scale": 3.0, "fake_score": {"mode": "lora", "rank": LORA_RANK, "updates": FAKE_UPDATES}}),
    "dmd_copy": ("one-step DMD, full-copy fake score, fp32 teacher (DMD2: three UNets)", "dmd_copy",
                 {"ema_decay": 0.0, "val_samples": 0, "fake_score": {"mode": "copy", "updates": FAKE_UPDATES}},
                 {"guidance_scale": 3.0}),
    "fdistill_gan": ("f-distill JS + GAN head, LoRA fake score, bf16 frozen base", "fdistill_js",
                     {"ema_decay": 0.0, "val_samples": 0, "frozen_dtype": "bfloat16",
                      "fake_score": {"mode": "lora", "updates": FAKE_UPDATES}},
                     {"guidance_scale": 3.0, "fake_score": {"mode": "lora", "rank": LORA_RANK, "updates": FAKE_UPDATES}}),
    "erasure": ("ESD-x erasure (cross-attention / class embedding), frozen copy", "erasure",
                {"params": "esd-x", "x_t_source": "frozen_bank", "trajectory_steps": 2, "val_samples": 0}, {}),
}


def is_sd(net: str) -> bool:
    """A text-to-image network loaded from a pipeline folder (SD 1.5 at a width, or SDXL: bench.scale_gpu)."""
    return net in SD_NETS or net == "sdxl"


def unet_config(width: float, sample_size: int) -> dict:
    """SD 1.5's UNet config with block_out_channels times `width` (8 heads as SD 1.5; group norm over the largest
    divisor of the first level's channels up to 32) and latents of side `sample_size`."""
    channels = [int(c * width) for c in SD15_UNET["block_out_channels"]]
    if any(c % SD15_UNET["attention_head_dim"] for c in channels):
        raise ValueError(f"width {width}: channels {channels} do not split into 8 attention heads; use 1/8, 1/4, 1/2 or 1")
    groups = math.gcd(channels[0], 32)
    return {**SD15_UNET, "block_out_channels": channels, "norm_num_groups": groups, "sample_size": sample_size}


def sd_folder(root: Path, width: float, sample_size: int, text: str = "clip-l") -> Path:
    """A StableDiffusionPipeline folder (diffusers layout) with SD 1.5's UNet at `width` and random weights, the text
    encoder `text` (random, tokenizer: models.tiny_pipelines' byte-level CLIP tokenizer padded to 77 tokens), a tiny
    VAE (not in any training step: the bench feeds latents) and SD 1.5's scheduler. Written once under `root` and
    reused; another latent size shares the weights file (a symlink) with only the UNet config changed."""
    name = f"sd15_w{width:g}_{text}"
    folder = root / f"{name}_s{sample_size}"
    if (folder / "model_index.json").is_file():
        return folder
    base = root / f"{name}_s64"
    if not (base / "model_index.json").is_file():
        _write_folder(base, width, text)
    if sample_size != 64:
        tmp = root / f".{folder.name}.tmp"
        for sub in ("text_encoder", "tokenizer", "vae", "scheduler"):
            (tmp / sub).parent.mkdir(parents=True, exist_ok=True)
            (tmp / sub).symlink_to((base / sub).resolve())
        (tmp / "unet").mkdir()
        for f in (base / "unet").iterdir():
            if f.name != "config.json":
                (tmp / "unet" / f.name).symlink_to(f.resolve())
        cfg = json.loads((base / "unet" / "config.json").read_text())
        (tmp / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": sample_size}, indent=2))
        (tmp / "model_index.json").write_text((base / "model_index.json").read_text())
        tmp.rename(folder)
    return folder


def _write_folder(folder: Path, width: float, text: str) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.tiny_pipelines import sd_scheduler, tiny_clip_tokenizer, tiny_vae

    tok = tiny_clip_tokenizer(max_length=77)
    spec = TEXT_ENCODERS[text]
    torch.manual_seed(1)
    enc = CLIPTextModel(CLIPTextConfig(**spec, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)).eval()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(width, 64)).eval()
    pipe = StableDiffusionPipeline(vae=tiny_vae(3), text_encoder=enc, tokenizer=tok, unet=unet,
                                   scheduler=sd_scheduler("sd15"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = folder.with_name(f".{folder.name}.tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)


class LatentPrompts(Dataset):
    """(latent [C, S, S], prompt) pairs: random latents standing in for a captioned set's cached VAE latents (what a
    step costs does not depend on their values)."""

    def __init__(self, channels: int, size: int, n: int = 256):
        self.latents = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int):
        return self.latents[i], PROMPTS[i % len(PROMPTS)]


class LatentPromptData(L.LightningDataModule):
    """Batches (latents [B, C, S, S], prompts [B]) of LatentPrompts, through the project's resumable loader."""

    has_images = True  # real latents for the discriminator's real branch (f-distill)

    def __init__(self, channels: int = 4, size: int = 32, batch_size: int = 1):
        super().__init__()
        self.set, self.batch_size = LatentPrompts(channels, size), batch_size

    def train_dataloader(self):
        from data.resumable import training_loader

        return training_loader(self.set, self.batch_size, 0, self.trainer)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def row_config(row: str, net: str, folder: Path | None) -> dict:
    """{class_path, init_args} of `row` on network `net` (an SD width: the pipeline `folder`; else a bench.methods
    digits network with a random teacher config)."""
    from bench.methods import METHODS, TEACHER_ARG, net_config, teacher_config

    _, key, common, text_args = ROWS[row]
    _, class_path, args = METHODS[key]
    args = _merge(args, common)
    if not is_sd(net):
        if class_path.endswith("TeacherPretraining"):
            args["net"] = net_config(net)
        else:
            arg = TEACHER_ARG[class_path]
            args[arg], args[f"{arg}_config"] = f"(bench: random {net} teacher)", teacher_config(net)
        return {"class_path": class_path, "init_args": args}
    from train.runtime.checkpoint import pipeline_teacher_config

    args = _merge(args, text_args)
    if class_path.endswith("TeacherPretraining"):
        teacher = pipeline_teacher_config(folder)
        args.update({k: teacher[k] for k in ("net", "schedule", "parameterization")})
    elif class_path.endswith("ConceptErasure"):
        args.update({"model": str(folder), "concepts": CONCEPTS})
    else:
        args[TEACHER_ARG[class_path]] = str(folder)
    return {"class_path": class_path, "init_args": args}


def build_row(row: str, net: str, folder: Path | None, batch: int, size: int = 32):
    """(module, datamodule) of `row` on `net`: SD widths train on LatentPromptData (4 x size x size latents, `batch`
    per step; erasure: `batch` per term on step counters), the digits networks on the digits at bench.methods' batch."""
    from bench.methods import NETS
    from data.digits import DigitsDataModule
    from data.steps import ErasureSteps
    from train.runtime.config import instantiate

    cfg = row_config(row, net, folder)
    erasure = cfg["class_path"].endswith("ConceptErasure")
    b = batch if is_sd(net) else NETS[net]["batch"]
    if erasure:
        cfg["init_args"].update({"batch_size": b if is_sd(net) else max(1, b // 3), "bank_size": b})
        data = ErasureSteps(steps_per_epoch=1000)
    else:
        data = LatentPromptData(4, size, b) if is_sd(net) else DigitsDataModule(batch_size=b)
    return instantiate(cfg), data


def describe_net(net: str, size: int, batch: int) -> str:
    from bench.methods import NETS

    if net == "sdxl":
        return f"SDXL UNet, 4x{size}x{size} latents, batch {batch}"
    if is_sd(net):
        return f"SD 1.5 UNet x{SD_NETS[net]:g} width, 4x{size}x{size} latents, batch {batch}"
    return f"digits UNet '{net}', 1x8x8, batch {NETS[net]['batch']}"


def structure(net: str) -> Any:
    """The bare diffusers network of `net` on the meta device (no memory): what the arithmetic counts."""
    from diffusers import UNet2DConditionModel

    from bench.methods import net_config
    from models.adapters import ClassConditionalUNet

    with torch.device("meta"):
        if is_sd(net):
            return UNet2DConditionModel(**unet_config(SD_NETS[net], 64))
        return ClassConditionalUNet(**net_config(net)["init_args"]).unet


if __name__ == "__main__":  # python -m bench.scale_nets ROOT WIDTH SIZE TEXT: write (or find) a folder, print its path
    import sys

    print(sd_folder(Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
