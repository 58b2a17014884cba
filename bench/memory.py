"""Memory: peak memory of each method relative to plain fine-tuning of the same network (fake score as a
full copy vs LoRA), and per-process peaks under the multi-engine DeepSpeed strategy at ZeRO stages 2 and 3.

    python -m bench.memory                        # digits and wide networks, ZeRO rows on the wide one
    python -m bench.memory --nets digits --no-zero

Each row trains in its own subprocess (`--worker`). Memory is the growth of the process's peak resident
set size (VmHWM, reset at the baseline) over its resident size at the baseline: weights, gradients,
AdamW moments, activations, DeepSpeed buffers and allocator slack all count, as they would on a machine.
The baseline is taken just before the method is built, once every library (DeepSpeed included) is
imported, the digits are read and one tiny training step has run, so no row pays a start-up cost that
another skips. A fixed malloc mmap threshold returns large freed tensors to the system, so the peak
tracks live memory. Every method trains with the same batch (erasure: a third per term), without EMA,
so the rows differ by what the method holds, not by settings. ZeRO rows run two gloo processes on CPU
(each with the full batch) and report the larger of the two ranks' peaks.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Table

MEMORY_METHODS = ("plain", "guidance_distillation", "dmd_copy", "dmd_lora", "dmd_lora8", "dmd_lora_bf16",
                  "dmd_lora8_bf16", "fdistill_js", "erasure")
ZERO_METHODS = ("plain", "dmd_lora")
ZERO_STAGES = (2, 3)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: the peak), in MB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) / 1024.0


def _reset_peak() -> None:
    """Start the peak (VmHWM) afresh at the current resident size (Linux >= 4.0), so start-up transients such
    as imports do not hide the training peak."""
    Path("/proc/self/clear_refs").write_text("5")


def _warm_up() -> None:
    """What every row would pay once whatever it trains, done before the baseline: the digits arrays read, and
    one training step of a tiny UNet (thread pools, kernel caches, autograd and AdamW start-up)."""
    import torch

    from data.digits import digits_tensors
    from models.adapters import ClassConditionalUNet

    digits_tensors("train"), digits_tensors("validation")
    net = ClassConditionalUNet(block_out_channels=[16, 32], attention_levels=[False, True], norm_num_groups=8)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 1, 8, 8), torch.rand(2), torch.arange(2)).square().mean().backward()
    opt.step()


def worker(net: str, method: str, warmup: int, steps: int, stage: int, devices: int, result: Path) -> None:
    """Train `method` on network `net` for warmup + steps steps; write rank<r>.json into `result`."""
    import torch

    torch.set_num_threads(1)
    import deepspeed  # noqa: F401  (imported by every row, so that no row's growth includes it)
    import diffusers  # noqa: F401
    import lightning as L
    import peft  # noqa: F401

    import train.methods.erasure  # noqa: F401
    import train.methods.guidance_distillation  # noqa: F401
    import train.methods.onestep  # noqa: F401
    from bench.methods import build, prebuild_banks
    from train.runtime.strategy import MultiEngineDeepSpeed

    _warm_up()
    torch.manual_seed(0)
    _reset_peak()
    baseline = _status_mb("VmRSS")
    module, data = build(method, net, ema=False)
    prebuild_banks(module)  # erasure: its trajectory banks count in memory, not in the step times
    times: list[float] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, *args):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args):
            times.append(time.perf_counter() - self.t0)

    strategy = MultiEngineDeepSpeed(stage=stage) if stage else "auto"
    trainer = L.Trainer(max_steps=warmup + steps, accelerator="cpu", devices=devices, strategy=strategy,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[StepTimer()])
    trainer.fit(module, data)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in module.sampling_denoiser().net.named_parameters() if "lora_" not in n)
    out = {"net": net, "method": method, "stage": stage, "devices": devices, "rank": trainer.global_rank,
           "peak_mb": _status_mb("VmHWM") - baseline, "step_s": statistics.median(times[warmup:] or times),
           "params_m": base / 1e6, "trainable_m": trainable / 1e6}
    (result / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


def run_row(net: str, method: str, warmup: int, steps: int, stage: int = 0, devices: int = 1,
            timeout: int = 900) -> dict:
    """One worker subprocess (or two ranks under ZeRO); its row, with the larger rank's peak."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536",
           "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        cmd = [sys.executable, "-m", "bench.memory", "--worker", net, method, "--warmup", str(warmup),
               "--steps", str(steps), "--stage", str(stage), "--devices", str(devices), "--result", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=timeout, check=False)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    if proc.returncode != 0 or len(ranks) != devices:
        raise RuntimeError(f"memory worker {net}/{method} (stage {stage}, {devices} process(es)) failed:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    row = max(ranks, key=lambda r: r["peak_mb"])
    row["rank_peaks_mb"] = [r["peak_mb"] for r in ranks]
    return row


def run(nets: list[str], zero_net: str | None, warmup: int, steps: int, methods=MEMORY_METHODS,
        zero_stages=ZERO_STAGES, log=print) -> tuple[list[Table], list[dict]]:
    """The memory tables and the goal they answer. `methods` must include "plain" (the reference)."""
    from bench.methods import METHODS, NETS

    rows = []
    for net in nets:
        for method in methods:
            log(f"[bench] memory: {method} on the {net} network")
            rows.append(run_row(net, method, warmup, steps))
    plain = {r["net"]: r for r in rows if r["method"] == "plain"}
    for r in rows:
        r["label"] = METHODS[r["method"]][0]
        r["network"] = f"{r['net']} ({r['params_m']:.2f}M, batch {NETS[r['net']]['batch']})"
        r["x_plain"] = r["peak_mb"] / plain[r["net"]]["peak_mb"]
        r["time_x_plain"] = r["step_s"] / plain[r["net"]]["step_s"]
    tables = [Table(f"Peak memory per method relative to plain fine-tuning of the same network (1 process, "
                    f"{steps} steps after {warmup} warm-up, no EMA)",
                    [("network", "network (params)"), ("label", "method"), ("trainable_m", "trainable (M)"),
                     ("peak_mb", "peak memory (MB)"), ("x_plain", "x plain"), ("step_s", "step (s)"),
                     ("time_x_plain", "step x plain")], rows,
                    ["memory: growth of the process's peak RSS from just before the method is built to the end "
                     "of training; the frozen teacher (a second copy of the weights) counts for every "
                     "distillation and erasure row",
                     "one-step rows hold the generator (a trained copy: weights, gradients, AdamW moments, as plain "
                     "fine-tuning), the frozen teacher (one more copy of the weights) and the fake score: a second "
                     "trained copy, or LoRA adapters with their gradients and moments (r32 adds 17% of the wide "
                     "network's weights, r8 4%: on an 8x8 UNet this narrow a rank is a large share; on SD-scale "
                     "networks r32-64 is a few percent), plus the activations of the fake-score and generator updates",
                     "bfloat16 frozen base (frozen_dtype: bfloat16): the teacher / LoRA base weights in half "
                     "precision, LoRA weights and everything trained in float32"])]
    if zero_net:
        single = {r["method"]: r for r in rows if r["net"] == zero_net}
        zrows = []
        for method in ZERO_METHODS:
            if method not in single:
                log(f"[bench] memory: {method} on the {zero_net} network (1 process, the ZeRO rows' reference)")
                single[method] = run_row(zero_net, method, warmup, steps)
        for stage in zero_stages:
            for method in ZERO_METHODS:
                log(f"[bench] memory: {method} on the {zero_net} network, ZeRO-{stage}, 2 processes")
                zrows.append(run_row(zero_net, method, warmup, steps, stage=stage, devices=2))
        for r in zrows:
            ref = next(z for z in zrows if z["stage"] == r["stage"] and z["method"] == "plain")
            r["label"] = METHODS[r["method"]][0]
            r["strategy"] = f"ZeRO-{r['stage']}, 2 processes"
            r["x_plain"] = r["peak_mb"] / ref["peak_mb"]
            r["x_single"] = r["peak_mb"] / single[r["method"]]["peak_mb"]
            r["ranks"] = " / ".join(f"{p:.0f}" for p in r["rank_peaks_mb"])
        tables.append(Table(f"Peak memory per process under the multi-engine DeepSpeed strategy ({zero_net} network, "
                            f"CPU/gloo, full batch per process, no EMA)",
                            [("strategy", "strategy"), ("label", "method"), ("peak_mb", "peak per process (MB)"),
                             ("ranks", "rank 0 / rank 1 (MB)"), ("x_plain", "x plain fine-tuning, same stage"),
                             ("x_single", "x same method, 1 process without DeepSpeed")], zrows,
                            ["ZeRO-1 partitions optimizer states, ZeRO-2 also gradients, ZeRO-3 also the trainable "
                             "weights; frozen networks (the teacher) stay whole on every rank",
                             "DeepSpeed's own buffers and the gloo process group count, so on a small network the "
                             "strategy can cost more than it saves"]))
    lora_rows = [r for r in rows if r["method"] in ("dmd_lora", "dmd_lora8", "dmd_lora_bf16", "dmd_lora8_bf16")]
    best = min(lora_rows, key=lambda r: r["x_plain"]) if lora_rows else None
    goals = [{"goal": "one-step DMD with a LoRA fake score vs plain fine-tuning (peak memory; best LoRA setting)",
              "target": "<= 1.3x",
              "measured": (f"{best['x_plain']:.2f}x ({best['net']} {best['method']}); "
                           + ", ".join(f"{r['net']} {r['method']} {r['x_plain']:.2f}x" for r in lora_rows))
              if best else "-",
              "met": best is not None and best["x_plain"] <= 1.3}]
    return tables, goals


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nets", nargs="+", default=["digits", "wide"], help="network sizes (bench.methods.NETS)")
    p.add_argument("--zero-net", default="wide", help="network of the ZeRO rows")
    p.add_argument("--no-zero", action="store_true", help="skip the two-process ZeRO rows")
    p.add_argument("--zero-stages", type=int, nargs="+", default=list(ZERO_STAGES), choices=(1, 2, 3))
    p.add_argument("--methods", nargs="+", default=list(MEMORY_METHODS), choices=MEMORY_METHODS,
                   help="rows to measure (plain fine-tuning is always measured: every row is relative to it)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=2, help="timed training steps")
    p.add_argument("--worker", nargs=2, metavar=("NET", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.warmup, args.steps, args.stage, args.devices, Path(args.result))
        return
    methods = ["plain"] + [m for m in args.methods if m != "plain"]
    tables, goals = run(args.nets, None if args.no_zero else args.zero_net, args.warmup, args.steps, methods,
                        zero_stages=args.zero_stages)
    for t in tables:
        print(t.markdown() + "\n")
    for g in goals:
        print(f"{g['goal']}: {g['measured']} (target {g['target']})")


if __name__ == "__main__":
    main()
