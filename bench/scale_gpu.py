"""`bench/scale_gpu.sh` (`python -m bench.scale_gpu`): the scale bench on one GPU, prepared for when one is lent.

    bench/scale_gpu.sh                     # under 10 minutes on one H100: writes bench/results/scale_gpu.{md,json}

SD 1.5 size at 4x64x64 latents, bf16-mixed, batch 8: images per second (generator samples per training step over the
step time) and peak GPU memory (torch.cuda.max_memory_allocated from just before the method is built) of our DMD setup
(LoRA fake score on a bf16 frozen base) against DMD2's three full UNets (full-copy fake score, fp32 teacher); then
SDXL size (UNet2DConditionModel from SDXL base 1.0's config, 2.6B parameters, random weights) at 4x128x128 with
ZeRO-2 (train.runtime.strategy.MultiEngineDeepSpeed, one process), the LoRA fake score, a bf16 frozen base and
gradient checkpointing: whether it fits on the GPU, and its peak. A row that does not fit reports CUDA's
out-of-memory line instead of stopping the run. The SDXL folder's text encoders have the real widths (768 + 1280:
cross-attention 2048, pooled 1280) but one layer each: they are frozen and outside the step (prompts encoded once).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = {"act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
             "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
             "center_input_sample": False, "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
             "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
             "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4,
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True}
# (network, latent side, batch, row, ZeRO stage, gradient checkpointing)
GPU_ROWS = [("sd15", 64, 8, "dmd_lora_bf16", 0, False), ("sd15", 64, 8, "dmd_copy", 0, False),
            ("sdxl", 128, 2, "dmd_lora_bf16", 2, True)]


def sdxl_folder(root: Path) -> Path:
    """A StableDiffusionXLPipeline folder with SDXL's UNet (random), one-layer CLIP-L / bigG-width text encoders and a
    tiny VAE (not in the step); written once under `root`."""
    folder = root / "sdxl_s128"
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from models.tiny_pipelines import sd_scheduler, tiny_clip_tokenizer, tiny_vae

    tok, tok2 = tiny_clip_tokenizer(77), tiny_clip_tokenizer(77)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               vocab_size=1024, max_position_embeddings=77, num_hidden_layers=1)
    torch.manual_seed(1)
    enc = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, **ids)).eval()
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                      projection_dim=1280, **ids)).eval()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET).eval()
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(3), text_encoder=enc, text_encoder_2=enc2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sd_scheduler("sdxl"), force_zeros_for_empty_prompt=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scale_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results", help="folder of scale_gpu.{md,json}")
    p.add_argument("--models", default="runs/bench-scale-models", help="where the random pipeline folders are written")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--timeout", type=int, default=240, help="seconds per row before it is stopped")
    p.add_argument("--dry-run", action="store_true", help="print the rows and exit (no GPU needed)")
    args = p.parse_args(argv)
    if args.dry_run:
        for row in GPU_ROWS:
            print(dict(zip(("net", "size", "batch", "row", "stage", "ckpt"), row)))
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; bench/scale_gpu.sh needs one GPU (the CPU bench is python -m bench.scale)")
    from bench import report
    from bench.report import Table
    from bench.scale_nets import ROWS, describe_net, sd_folder
    from bench.scale_worker import run_jobs

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    models, t0, records = Path(args.models), time.time(), []
    gpu = torch.cuda.get_device_name(0)
    for net, size, batch, row, stage, ckpt in GPU_ROWS:
        log(f"[scale-gpu] {net} {row} 4x{size}x{size} batch {batch}, ZeRO-{stage or 'off'}, checkpointing {ckpt}")
        folder = sdxl_folder(models) if net == "sdxl" else sd_folder(models, 1.0, size)
        job = {"net": net, "row": row, "size": size, "batch": batch, "ckpt": ckpt, "stage": stage, "devices": 1,
               "warmup": 1, "steps": args.steps, "threads": 8, "accelerator": "gpu", "precision": "bf16-mixed",
               "folder": str(folder.absolute())}
        done, error = run_jobs([job], 2048, args.timeout, log)
        rec = {**job, **(done[0] if done else {}), "label": ROWS[row][0], "network": describe_net(net, size, batch)}
        oom = error is not None and "out of memory" in error.lower()
        rec["status"] = "ok" if done else (f"does not fit on {gpu}: CUDA out of memory" if oom else error.splitlines()[0][:300])
        rec["gpu_peak_gb"] = rec["gpu_peak_mb"] / 1024 if done else None
        records.append(rec)
    table = Table(f"One GPU ({gpu}), bf16-mixed, {args.steps} timed steps after 1 warm-up",
                  [("network", "network"), ("label", "method"), ("stage", "ZeRO stage"), ("ckpt", "checkpointing"),
                   ("trainable_m", "trainable (M)"), ("gpu_peak_gb", "peak GPU memory (GB)"), ("step_s", "step (s)"),
                   ("images_per_s", "images / s"), ("status", "status")], records,
                  ["images / s: generator samples per training step (batch) over the step time; one-step rows: 1 "
                   "fake-score update per generator update",
                   "peak GPU memory: torch.cuda.max_memory_allocated from just before the method is built"])
    info = {**report.machine(), "gpu": gpu, "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    meta = {"command": "bench/scale_gpu.sh " + shlex.join(sys.argv[1:] if argv is None else argv), "machine": info,
            "seconds": round(time.time() - t0), "records": records}
    print(report.write_part(Path(args.out), "scale_gpu", [table], meta), flush=True)
    (Path(args.out) / "scale_gpu.records.json").write_text(json.dumps(records, indent=2, default=str))


if __name__ == "__main__":
    main()
