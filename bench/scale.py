"""`python -m bench.scale` (`make bench-scale`): memory and speed of every method on networks of Stable Diffusion 1.5's
architecture and size (random weights) on CPU, under ZeRO-2/3 on two processes, and how both grow with the network.

    python -m bench.scale                          # the full run: digits, wide, SD 1.5 at 1/4, 1/2, 1 width (hours)
    python -m bench.scale --quick --out /tmp/s     # tiny digits net and SD 1.5 at 1/8 width (the test suite's)
    python -m bench.scale --nets sd15/2 --rows plain dmd_lora_bf16 --no-zero
    python -m bench.scale --mem-limit-gb 8         # plan as if the machine had 8 GB free

Writes <out>/scale.md, scale.json and scale.png (memory and step-time ratios against parameter count). Rows
(bench/scale_nets.py ROWS): plain fine-tuning, teacher training with caption dropout, guidance distillation, one-step
DMD with a LoRA fake score on a bf16 frozen base (the project's design), the same with a full-copy fake score and
an fp32 teacher (DMD2's three UNets), f-distill with the GAN head, ESD-x erasure; each with and without gradient
checkpointing. Every row first predicts its need (bench/scale_plan.py: bytes per parameter per copy, plus the
activations measured on the previous network); one that cannot fit in the memory the machine has is reported as
"does not fit (needs about N GB)" and never started, and a running one is stopped if the machine runs low.
Rows run one at a time, each in its own process (--quick: one process per network and setting).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.scale_nets import ROWS, SD_NETS, is_sd

FULL = {"nets": ["digits", "wide", "sd15/4", "sd15/2", "sd15"], "rows": list(ROWS), "size": 32, "batch": 1,
        "ckpt": [False, True], "warmup": 1, "steps": 2, "big_size": 64, "big_rows": ["plain", "dmd_lora_bf16", "dmd_copy"],
        "big_ckpt": [True], "big_steps": 1, "big_bare": False, "zero_nets": ["sd15/2", "sd15"], "zero_stages": [2, 3], "zero_steps": 1,
        "text": "clip-l", "group": False, "timeout": 5400}
QUICK = {"nets": ["tiny", "sd15/8"], "rows": list(ROWS), "size": 8, "batch": 1, "ckpt": [False, True], "warmup": 1,
         "steps": 1, "big_size": None, "big_rows": [], "big_ckpt": [], "big_steps": 1, "big_bare": False, "zero_nets": ["sd15/8"],
         "zero_stages": [2, 3], "zero_steps": 1, "text": "small", "group": True, "timeout": 900}
FLOOR_MB = 1024  # a running worker is killed when the machine's available memory falls below this


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results", help="folder of scale.{md,json,png}")
    p.add_argument("--models", default="runs/bench-scale-models",
                   help="where the random SD-size pipeline folders are written once and reused (3.9 GB at full size)")
    p.add_argument("--quick", action="store_true", help="small networks, one timed step: a smoke run of every part")
    p.add_argument("--nets", nargs="+", choices=["tiny", "digits", "wide", *SD_NETS], help="networks, small to large")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), help="methods (plain fine-tuning is always measured)")
    p.add_argument("--batch", type=int, help="SD latents per step (default 1; the digits nets keep bench.methods')")
    p.add_argument("--size", type=int, help="latent side of the SD rows (default 32; quick 8)")
    p.add_argument("--no-big", action="store_true", help="skip the 4x64x64 rows of the largest SD network")
    p.add_argument("--no-ckpt", action="store_true", help="skip the gradient-checkpointing rows")
    p.add_argument("--no-zero", action="store_true", help="skip the two-process ZeRO rows")
    p.add_argument("--mem-limit-gb", type=float, help="plan as if the machine had this much memory available")
    p.add_argument("--threads", default="auto",
                   help="torch threads per worker: a number, or auto (2 when the 1-minute load leaves 2 cores idle, else 1)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and the arithmetic, and exit")
    p.add_argument("--render", metavar="SCALE_JSON",
                   help="rewrite the tables and the plot from the records of an earlier run's scale.json; run nothing")
    args = p.parse_args(argv)
    if args.threads != "auto" and not args.threads.isdigit():
        p.error(f"--threads must be a number or auto, not {args.threads!r}")
    if args.batch is not None and args.batch < 1 or args.size is not None and args.size % 8:
        p.error("--batch must be >= 1 and --size a multiple of 8 (SD's UNet halves the latents three times)")
    return args


def resolve(args: argparse.Namespace) -> dict:
    s = dict(QUICK if args.quick else FULL)
    if args.nets:
        s["nets"] = args.nets
        s["zero_nets"] = [n for n in s["zero_nets"] if n in args.nets] or [n for n in args.nets if is_sd(n)][-1:]
    if args.rows:
        s["rows"] = ["plain"] + [r for r in args.rows if r != "plain"]
        s["big_rows"] = [r for r in s["big_rows"] if r in s["rows"]]
    s.update({k: v for k, v in (("batch", args.batch), ("size", args.size)) if v is not None})
    if args.no_big:
        s["big_size"] = None
    if args.no_ckpt:
        s["ckpt"], s["big_ckpt"] = [False], [False] if s["big_size"] else []
    if args.no_zero:
        s["zero_nets"] = []
    if args.threads == "auto":
        idle = (os.cpu_count() or 1) - os.getloadavg()[0]
        s["threads"] = 2 if idle >= 2 else 1
    else:
        s["threads"] = int(args.threads)
    return s


def largest_sd(nets: list[str]) -> str | None:
    sd = [n for n in nets if is_sd(n)]
    return max(sd, key=lambda n: SD_NETS[n]) if sd else None


class Bench:
    """One run: the planned jobs, their predictions, and their results in order."""

    def __init__(self, s: dict, models: Path, limit_mb: float | None, log):
        from bench.scale_plan import Predictor

        self.s, self.models, self.limit_mb, self.log = s, models, limit_mb, log
        self.pred = Predictor()
        self.rows: list[dict] = []
        self.zero: list[dict] = []

    def counts(self, net: str) -> dict:
        from bench.scale_nets import LORA_RANK
        from bench.scale_plan import counts

        return counts(net, LORA_RANK if is_sd(net) else 32)

    def folder(self, net: str, size: int) -> tuple[str | None, str | None]:
        """(the pipeline folder of an SD network at latent side `size`, or an error line); written in a subprocess
        (building the network takes about 2.5 x its fp32 weights, checked first)."""
        from bench.scale_plan import fits, no_fit_text

        if not is_sd(net):
            return None, None
        need = 10 * self.counts(net)["P"] / 2**20 + 1024
        ok, have = fits(need, self.limit_mb)
        name = self.models / f"sd15_w{SD_NETS[net]:g}_{self.s['text']}_s64" / "model_index.json"
        if not ok and not name.is_file():
            return None, f"{no_fit_text(need, have)} to write its folder"
        self.log(f"[scale] the {net} pipeline folder ({'reused' if name.is_file() else 'writing'})")
        proc = subprocess.run([sys.executable, "-m", "bench.scale_nets", str(self.models), str(SD_NETS[net]), str(size),
                               self.s["text"]], capture_output=True, text=True, env=_env(), cwd=_root())
        if proc.returncode:
            return None, f"could not write its folder: {proc.stderr.strip().splitlines()[-1:]}"
        return str(Path(proc.stdout.strip().splitlines()[-1]).absolute()), None

    def job(self, net: str, row: str, size: int, ckpt: bool, steps: int, folder: str | None, **extra) -> dict:
        from bench.methods import NETS

        batch = self.s["batch"] if is_sd(net) else NETS[net]["batch"]
        return {"net": net, "row": row, "size": size, "batch": batch, "ckpt": ckpt, "stage": 0, "devices": 1,
                "warmup": self.s["warmup"], "steps": steps, "threads": self.s["threads"], "accelerator": "cpu",
                "precision": "32-true", "folder": folder, **extra}

    def run_group(self, jobs: list[dict], needs: list[float], into: list[dict]) -> None:
        """Run `jobs` (one process) unless the largest need does not fit; append a record per job to `into`."""
        from bench.report import machine
        from bench.scale_plan import fits, no_fit_text
        from bench.scale_worker import run_jobs

        ok, have = fits(max(needs), self.limit_mb)
        load = machine()["load_average_1m"]
        base = [{**j, "need_mb": n, "free_mb": have, "load_1m": load} for j, n in zip(jobs, needs)]
        if not ok:
            for b in base:
                into.append({**b, "status": no_fit_text(b["need_mb"], have)})
                self.log(f"[scale] {b['net']} {b['row']} (stage {b['stage']}, checkpointing {b['ckpt']}): {into[-1]['status']}")
            return
        for b in base:
            self.log(f"[scale] {b['net']} {b['row']} {b['size']}x{b['size']} (checkpointing {b['ckpt']}, stage "
                     f"{b['stage']}); predicted {b['need_mb'] / 1024:.1f} GB, {have / 1024:.1f} GB free, load {load}")
        results, error = run_jobs(jobs, FLOOR_MB, self.s["timeout"], self.log)
        for i, b in enumerate(base):
            if i < len(results):
                into.append({**b, **results[i], "status": "ok"})
                r = into[-1]
                self.log(f"[scale]   peak {r['peak_mb'] / 1024:.2f} GB over a {r['baseline_mb'] / 1024:.2f} GB baseline, "
                         f"step {r['step_s']:.2f} s" + (f", {r['overhead']:.2f}x its bare passes" if "overhead" in r else ""))
            else:
                low = error is not None and error.startswith("stopped: the machine")
                into.append({**b, "status": ("does not fit: " + error) if low else (error or "not run")[:300]})

    def run_rows(self) -> None:
        from bench.scale_plan import arithmetic_mb

        top = largest_sd(self.s["nets"])
        for net in self.s["nets"]:
            c = self.counts(net)
            plan = [(self.s["size"], ckpt, self.s["rows"], self.s["steps"], True) for ckpt in self.s["ckpt"]]
            if net == top and self.s["big_size"]:
                plan += [(self.s["big_size"], ckpt, self.s["big_rows"], self.s["big_steps"], self.s["big_bare"])
                         for ckpt in self.s["big_ckpt"]]
            for size, ckpt, rows, steps, bare in plan:
                size = size if is_sd(net) else 8  # the digits networks: 1x8x8 at bench.methods' batch
                folder, error = self.folder(net, size)
                jobs = [self.job(net, r, size, ckpt, steps, folder, bare=bare, arith_mb=arithmetic_mb(r, c), **c)
                        for r in rows]
                if error:
                    self.rows += [{**j, "status": error} for j in jobs]
                    continue
                groups = [jobs] if self.s["group"] else [[j] for j in jobs]
                for group in groups:
                    b = group[0]["batch"]
                    needs = [self.pred.need_mb(j["row"], ckpt, c, size, b) for j in group]
                    start = len(self.rows)
                    self.run_group(group, needs, self.rows)
                    for r in self.rows[start:]:
                        if r["status"] == "ok":
                            self.pred.observe(r["row"], ckpt, c, size, b, r["peak_mb"], r["baseline_mb"])

    def run_zero(self) -> None:
        """DMD with the LoRA fake score under ZeRO-2/3 on two processes (full batch each), checkpoint converted."""
        from bench.scale_plan import zero_arithmetic_mb

        extra: dict[int, float] = {}
        single = {(r["net"], r["size"]): r for r in self.rows
                  if r["row"] == "dmd_lora_bf16" and not r["ckpt"] and r["status"] == "ok"}
        for net in self.s["zero_nets"]:
            c, size = self.counts(net), self.s["size"]
            folder, error = self.folder(net, size)
            for stage in self.s["zero_stages"]:
                arith = zero_arithmetic_mb(stage, 2, c)
                job = self.job(net, "dmd_lora_bf16", size, False, self.s["zero_steps"], folder, stage=stage, devices=2,
                               check_ckpt=True, arith_mb=arith, **c)
                if error:
                    self.zero.append({**job, "status": error})
                    continue
                act = self.pred.activations_mb("dmd_lora_bf16", False, c, size, self.s["batch"])
                need = self.pred.need_mb("dmd_lora_bf16", False, c, size, 1, devices=2,
                                         per_process_mb=arith + act + extra.get(stage, 0.0))
                self.run_group([job], [need], self.zero)
                r = self.zero[-1]
                ref = single.get((net, size))
                r["single_mb"] = ref["peak_mb"] if ref else None
                if r["status"] == "ok":
                    extra[stage] = max(0.0, r["peak_mb"] - arith - act)
                    r["x_single"] = r["peak_mb"] / ref["peak_mb"] if ref else None


def _root() -> Path:
    return Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    env["PYTHONPATH"] = os.pathsep.join([str(_root()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    s = resolve(args)
    limit_mb = None if args.mem_limit_gb is None else args.mem_limit_gb * 1024
    if args.dry_run:
        from bench.scale_plan import ARITHMETIC, arithmetic_mb, counts

        print(s)
        for net in s["nets"]:
            c = counts(net, 64 if is_sd(net) else 32)
            print(net, {k: f"{v / 1e6:.1f}M" for k, v in c.items()},
                  {r: f"{arithmetic_mb(r, c) / 1024:.2f} GB ({ARITHMETIC[r][1].split(':')[0]})" for r in s["rows"]})
        return
    os.environ.setdefault("WANDB_MODE", "disabled")
    from bench import report
    from bench.scale_plan import mem_available_mb, mem_total_mb

    out = Path(args.out)
    if args.render:
        import json

        saved = json.loads(Path(args.render).read_text())
        write(out, saved["records"]["rows"], saved["records"]["zero"], saved["settings"],
              {k: v for k, v in saved.items() if k not in ("records", "goals", "tables")})
        return
    command = "python -m bench.scale " + shlex.join(sys.argv[1:] if argv is None else argv)
    info = {**report.machine(), "memory_gb": round(mem_total_mb() / 1024, 1),
            "memory_available_gb": round(mem_available_mb() / 1024, 1), "torch_threads": s["threads"]}  # the workers'
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"[scale] {info['cores']} cores, load {info['load_average_1m']}, {info['memory_available_gb']} of "
        f"{info['memory_gb']} GB free; {s['threads']} thread(s) per worker")
    t0 = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through run_jobs, which stops its worker
    bench = Bench(s, Path(args.models), limit_mb, log)
    bench.run_rows()
    bench.run_zero()
    meta = {"command": command.strip(), "machine": info, "settings": s, "seconds": round(time.time() - t0),
            "machine_at_end": report.machine(), "mem_limit_gb": args.mem_limit_gb}
    write(out, bench.rows, bench.zero, s, meta)
    log(f"[scale] done in {time.time() - t0:.0f} s; {out}/scale.{{md,json,png}}")


def write(out: Path, rows: list[dict], zero: list[dict], s: dict, meta: dict) -> None:
    """scale.md and scale.json (with every record, so --render can redo the tables) and scale.png."""
    from bench import report
    from bench.scale_plot import plot
    from bench.scale_tables import goals, tables

    made = tables(rows, zero, s)
    meta = {**meta, "records": {"rows": rows, "zero": zero}}
    print(report.write_part(out, "scale", made, meta, goals(rows, zero, s)), flush=True)
    plot(rows, s, out / "scale.png")


if __name__ == "__main__":
    main()
