"""Peak memory and step time of one-step distillation (fake score as a full copy vs LoRA) relative to
plain fine-tuning of the same network; prints a Markdown table.

    python -m bench.onestep_memory                       # digits and wide UNets, CPU
    python -m bench.onestep_memory --nets digits --steps 8

Each row runs in its own subprocess. Memory is the growth of the process's peak resident set size
(ru_maxrss) from just before the network is built to the end of training: weights, gradients, AdamW
moments, activations and allocator slack all count, as they would on a machine. Step time is the median
wall time of the timed training steps (after warm-up), through the same Lightning Trainer for every row.
Plain fine-tuning = the teacher's denoising loss with AdamW on the network (train.teacher, no EMA). One
DMD step = one fake-score update + one generator update (fake_updates=1), no EMA, so both sides hold
the same optimiser state per trainable network. Random weights: memory and time do not depend on them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

NETS = {  # ClassConditionalUNet sizes: the digits teacher (configs/digits/teacher.yaml) and a 16x wider one
    "digits": {"block_out_channels": [32, 64, 64], "batch_size": 128},
    "wide": {"block_out_channels": [128, 256, 256], "batch_size": 32},
}
ROWS = {  # name -> OneStepDistillation overrides (None: plain fine-tuning)
    "plain fine-tuning": None,
    "DMD, fake score = full copy": {"fake_score": "copy"},
    "DMD, fake score = LoRA r16": {"fake_score": "lora", "lora_rank": 16},
    "f-distill JS + GAN, LoRA r16": {"fake_score": "lora", "lora_rank": 16, "divergence": "jensen_shannon", "gan_weight": 0.01},
}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def worker(net_name: str, row: str, warmup: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import lightning as L

    import train.onestep as onestep
    from data.digits import DigitsDataModule
    from guidance.denoiser import Denoiser
    from guidance.schedules import VPCosine
    from models.adapters import ClassConditionalUNet
    from train.teacher import TeacherPretraining

    spec = NETS[net_name]
    data = DigitsDataModule(batch_size=spec["batch_size"])
    data.setup()
    torch.manual_seed(0)
    baseline = _peak_mb()
    net = ClassConditionalUNet(num_classes=10, sample_size=8, block_out_channels=spec["block_out_channels"],
                               attention_levels=[False, True, True], layers_per_block=1, norm_num_groups=32)
    overrides = ROWS[row]
    if overrides is None:
        module = TeacherPretraining(net, VPCosine(), "v", ema_decay=0.0, warmup_steps=0)
    else:
        teacher = Denoiser(net, VPCosine(), "v").requires_grad_(False).eval()
        onestep.load_teacher = lambda path, config: (teacher, None)  # build from this network, no checkpoint
        module = onestep.OneStepDistillation(teacher="(bench)", ema_decay=0.0, fake_updates=1, **overrides)

    times: list[float] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, *args):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args):
            times.append(time.perf_counter() - self.t0)

    trainer = L.Trainer(max_steps=warmup + steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[StepTimer()])
    trainer.fit(module, data)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    base_params = sum(p.numel() for n, p in net.named_parameters() if "lora_" not in n)
    return {"net": net_name, "row": row, "peak_mb": _peak_mb() - baseline, "step_s": statistics.median(times[warmup:]),
            "params_m": base_params / 1e6, "trainable_m": trainable / 1e6}


def run_row(net: str, row: str, warmup: int, steps: int) -> dict:
    # fixed mmap threshold: large tensors are mmapped and returned on free, so peak RSS tracks live memory
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "bench.onestep_memory", "--worker", net, row, "--warmup", str(warmup), "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker {net}/{row} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def table(results: list[dict]) -> str:
    lines = ["| network (params) | setup | trainable (M) | peak memory (MB) | x plain | step (s) | x plain |",
             "|---|---|---|---|---|---|---|"]
    base = {r["net"]: r for r in results if ROWS[r["row"]] is None}
    for r in results:
        b = base[r["net"]]
        lines.append(f"| {r['net']} ({r['params_m']:.1f}M) | {r['row']} | {r['trainable_m']:.2f} | {r['peak_mb']:.0f} | "
                     f"{r['peak_mb'] / b['peak_mb']:.2f} | {r['step_s']:.3f} | {r['step_s'] / b['step_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--worker", nargs=2, metavar=("NET", "ROW"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.warmup, args.steps)))
        return
    results = [run_row(net, row, args.warmup, args.steps) for net in args.nets for row in ROWS]
    print(table(results))


if __name__ == "__main__":
    main()
