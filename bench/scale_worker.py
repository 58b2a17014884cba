"""The scale bench's worker: trains rows in a subprocess and measures each one's peak memory, step time and bare
network passes; and the parent's side, which starts it and stops it before the machine runs out of memory.

    python -m bench.scale_worker --jobs jobs.json --result DIR      # (started by bench.scale, one row per process)

Memory is bench.memory's: growth of the process's peak RSS (VmHWM, reset at the baseline) over its RSS at the
baseline, taken after the libraries, one tiny training step (bench.memory._warm_up) and, for an SD network, the
frozen text encoder with every prompt encoded (frozen, outside the step: its cached embeddings are the condition).
Time is bench.speed's: each timed step followed by a replay of its bare network passes (StepVsBare). Under ZeRO
(two gloo processes) steps are timed alone and the converted checkpoint is compared with the gathered weights; on
a GPU the peak is torch.cuda.max_memory_allocated and steps are timed between synchronisations.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch


class SyncedSteps(L.Callback):
    """Step times (CUDA synchronised around each step on a GPU); erasure banks built before the first step."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_start(self, trainer, pl_module):
        prebuild(pl_module)

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, *args):
        self._sync(pl_module)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self.t0)


class Prebuild(L.Callback):
    def on_train_start(self, trainer, pl_module):
        prebuild(pl_module)


def prebuild(module) -> None:
    """Erasure from a frozen bank: every request's trajectories (the null request, the classes or the concept and
    anchor prompts) sampled before the first step, so no measured step builds one (bench.methods.prebuild_banks
    covers class networks only)."""
    from train.methods.erasure import ConceptErasure

    if isinstance(module, ConceptErasure) and module.x_t_source == "frozen_bank":
        requests = [module.conditioner.null_request, *(module.conditioner.enumerate() or []),
                    *[r for rs in module.spec.requests for r in rs], *module.spec.anchors]
        module._bank().build_missing(requests, module.device)


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 partitioned weight holds a slice of itself


def _checkpoint_check(trainer, module, folder: Path) -> dict:
    """Save a ZeRO checkpoint, convert it to one state dict (train.runtime.strategy.convert_zero_checkpoint) and compare
    its trainable weights with the engines' weights gathered in memory: the largest absolute difference."""
    from models.ema import gathered_weights
    from train.runtime.strategy import convert_zero_checkpoint

    trainer.save_checkpoint(folder / "zero.ckpt")
    gathered = {}
    for name, net in module.trainable_networks().items():
        with gathered_weights(net):
            gathered.update({f"{name}.{k}": p.detach().float().cpu().clone()
                             for k, p in net.named_parameters() if p.requires_grad})
    if trainer.global_rank != 0:
        return {}
    converted = convert_zero_checkpoint(folder / "zero.ckpt")["state_dict"]
    missing = [k for k in gathered if k not in converted]
    diff = max((float((converted[k].float() - v).abs().max()) for k, v in gathered.items() if k in converted), default=0.0)
    return {"ckpt_compared": len(gathered) - len(missing), "ckpt_missing": len(missing), "ckpt_max_diff": diff,
            "ckpt_equal": not missing and diff == 0.0}


def measure(job: dict, result: Path) -> dict:
    """Train job["row"] on job["net"] for warmup + steps steps; its measurements."""
    from bench.memory import _reset_peak, _status_mb
    from bench.scale_nets import build_row
    from bench.speed import StepVsBare
    from train.runtime.strategy import MultiEngineDeepSpeed

    gpu = job["accelerator"] == "gpu"
    gc.collect()
    torch.manual_seed(0)
    _reset_peak()
    baseline = _status_mb("VmRSS")
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()
    folder = Path(job["folder"]) if job.get("folder") else None
    module, data = build_row(job["row"], job["net"], folder, job["batch"], job["size"])
    if job["ckpt"]:
        for net in module.trainable_networks().values():
            if hasattr(net, "enable_gradient_checkpointing"):
                net.enable_gradient_checkpointing()  # as MultiEngineDeepSpeed(activation_checkpointing=True) does
    bare = job.get("bare", True) and job["stage"] == 0 and not gpu  # replays need one process and the CPU
    timer = StepVsBare(job["warmup"], job["steps"]) if bare else SyncedSteps()
    callbacks = [Prebuild()] if bare else []  # StepVsBare prebuilds class banks only; the text banks first
    strategy = MultiEngineDeepSpeed(stage=job["stage"]) if job["stage"] else "auto"
    trainer = L.Trainer(max_steps=job["warmup"] + job["steps"], accelerator=job["accelerator"], devices=job["devices"],
                        strategy=strategy, precision=job["precision"], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[*callbacks, timer], default_root_dir=str(result))
    trainer.fit(module, data)
    out = {**job, "rank": trainer.global_rank, "baseline_mb": baseline, "peak_mb": _status_mb("VmHWM") - baseline,
           "trainable_m": sum(_numel(p) for p in module.parameters() if p.requires_grad) / 1e6,
           "params_m": sum(_numel(p) for n, p in module.sampling_denoiser().net.named_parameters()
                           if "lora_" not in n) / 1e6}
    if gpu:
        out["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() - gpu_base) / 2**20
    if bare:
        steps, bares = timer.step_s, timer.bare_s
        ratio = [s / b for s, b in zip(steps, bares)]
        passes: dict[str, list[str]] = {}
        for c in timer.recorder.calls:
            passes.setdefault(c.label, []).append(c.describe())
        out.update({"step_s": statistics.median(steps), "bare_s": statistics.median(bares),
                    "overhead": statistics.median(ratio), "overhead_min": min(ratio), "overhead_max": max(ratio),
                    "steps_s": steps, "bares_s": bares, "partial_calls": sum(not c.complete for c in timer.recorder.calls),
                    "passes": "; ".join(f"{n}: {', '.join(p)}" for n, p in passes.items())})
    else:
        timed = timer.times[job["warmup"]:] or timer.times
        out.update({"step_s": statistics.median(timed), "steps_s": timed})
        if gpu:
            out["images_per_s"] = job["batch"] / out["step_s"]  # generator samples (or training images) per second
    if job.get("check_ckpt"):
        out.update(_checkpoint_check(trainer, module, result))
    del trainer, module, data, timer
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", required=True, help="JSON file: a list of jobs (bench.scale builds them)")
    p.add_argument("--result", required=True, help="folder of the results: rank<r>.job<i>.json")
    args = p.parse_args(argv)
    jobs = json.loads(Path(args.jobs).read_text())
    torch.set_num_threads(jobs[0]["threads"])
    import deepspeed  # noqa: F401  (imported by every row, so that no row's growth includes it)
    import diffusers  # noqa: F401
    import peft  # noqa: F401

    import train.methods.erasure  # noqa: F401
    import train.methods.guidance_distillation  # noqa: F401
    import train.methods.onestep  # noqa: F401
    from bench.memory import _warm_up
    from bench.scale_nets import CONCEPTS, PROMPTS
    from models.conditioning import shared_prompt_encoder

    _warm_up()
    for folder in sorted({j["folder"] for j in jobs if j.get("folder")}):
        enc = shared_prompt_encoder(folder)  # frozen, loaded once per process: outside every row's measurement
        if jobs[0]["accelerator"] == "gpu":
            enc.to("cuda")
        concept = [pr for c in CONCEPTS["concepts"] for pr in c["prompts"]] + CONCEPTS["anchors"]
        enc.encode(PROMPTS + concept)
        enc.null(1)
    result = Path(args.result)
    for i, job in enumerate(jobs):
        out = measure(job, result)
        (result / f"rank{out['rank']}.job{i}.json").write_text(json.dumps(out))


def run_jobs(jobs: list[dict], floor_mb: float, timeout: float, log) -> tuple[list[dict], str | None]:
    """Run `jobs` in one worker process (two ranks when the jobs ask for 2 devices); (per job, the largest rank's
    result with every rank's peak; an error line or None). The worker is killed, with every rank, as soon as the
    machine's available memory falls under `floor_mb`: the row is then reported as not fitting, the machine lives."""
    from bench.scale_plan import mem_available_mb

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(jobs[0]["threads"]), "PYTHONWARNINGS": "ignore",
           "MALLOC_MMAP_THRESHOLD_": "65536", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if jobs[0]["accelerator"] == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        spec, logfile = Path(tmp) / "jobs.json", Path(tmp) / "worker.log"
        spec.write_text(json.dumps(jobs))
        with logfile.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "bench.scale_worker", "--jobs", str(spec), "--result", tmp],
                                    cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            t0, low, error = time.time(), None, None
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
                    free = mem_available_mb()
                    if free < floor_mb or time.time() - t0 > timeout:
                        low = free
                        break
            finally:
                if proc.poll() is None:  # low memory, time out, or the bench itself stopped (Ctrl-C, SIGTERM)
                    os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group (its ranks): ours
                    proc.wait()
        if low is not None:
            error = (f"stopped: the machine had {low / 1024:.1f} GB free" if low < floor_mb
                     else f"stopped after {timeout:.0f} s")
        elif proc.returncode != 0:
            lines = [ln for ln in logfile.read_text().splitlines() if ln.strip() and "Warning" not in ln]
            error = f"worker failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"
        rows = []
        for i in range(len(jobs)):
            ranks = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob(f"rank*.job{i}.json"))]
            if len(ranks) != jobs[i]["devices"]:
                break
            row = max(ranks, key=lambda r: r["peak_mb"])
            row["rank_peaks_mb"] = [r["peak_mb"] for r in ranks]
            row.update({k: v for r in ranks for k, v in r.items() if k.startswith("ckpt_") and r["rank"] == 0})
            rows.append(row)
    if error:
        log(f"[scale] {error.splitlines()[0]}")
    return rows, error


if __name__ == "__main__":
    main()
