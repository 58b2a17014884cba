"""`python -m bench` (`make bench`): the quality, speed and memory tables, printed and written to
<out>/{quality,speed,memory}.{md,json}.

    python -m bench                                   # all three parts, ~20 minutes on a 2-core CPU
    python -m bench --runs runs/demo                  # quality of the checkpoints `make demo` wrote
    python -m bench --ckpt teacher=T.ckpt --ckpt dmd=D.ckpt --parts quality
    python -m bench --quick --out /tmp/bench          # tiny smoke configuration (the test suite's)

Quality reads trained checkpoints and trains nothing (rows without a checkpoint are marked absent; see
bench/quality.py for the row names). Speed and memory train their own networks with random weights for a
few steps (bench/speed.py, bench/memory.py): figures are medians of repeated runs with min and max, and
the headline is the ratio measured side by side in one run, not the absolute time.

At Stable Diffusion scale (hours, ~20 GB): `python -m bench.scale` (`make bench-scale`; bench/scale.py).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

PARTS = ("quality", "speed", "memory")
# full and --quick settings of each part
FULL = {"net": "digits", "warmup": 2, "repeats": 7, "guider_steps": 8, "guider_repeats": 5, "cfg_batches": [1, 8, 64],
        "memory_nets": ["digits", "wide"], "memory_methods": ["plain", "guidance_distillation", "dmd_copy", "dmd_lora",
                                                              "dmd_lora8", "dmd_lora_bf16", "dmd_lora8_bf16",
                                                              "fdistill_js", "erasure"],
        "zero_net": "wide", "zero_stages": [2, 3], "memory_warmup": 1, "memory_steps": 2, "num_per_class": 100}
QUICK = {"net": "tiny", "warmup": 1, "repeats": 2, "guider_steps": 2, "guider_repeats": 1, "cfg_batches": [1, 8],
         "memory_nets": ["tiny"], "memory_methods": ["plain", "dmd_copy", "dmd_lora"], "zero_net": "tiny",
         "zero_stages": [2], "memory_warmup": 1, "memory_steps": 1, "num_per_class": 4}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results", help="folder of the written tables")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="which tables to produce")
    p.add_argument("--quick", action="store_true", help="tiny networks, few repeats: a smoke run of every part")
    p.add_argument("--runs", default="runs/demo",
                   help="quality: folder laid out as `python -m train demo --out DIR` writes it")
    p.add_argument("--ckpt", action="append", default=[], metavar="ROW=PATH",
                   help="quality: the checkpoint of one row (repeatable), e.g. teacher=runs/x/checkpoints/last.ckpt")
    p.add_argument("--scale", type=float, default=2.0, help="quality: guidance scale w of guided models and w-students")
    p.add_argument("--num-per-class", type=int, default=None, help="quality: samples per class (default 100; quick 4)")
    p.add_argument("--no-zero", action="store_true", help="memory: skip the two-process ZeRO rows")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine more threads oversubscribe and scatter timings)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.num_per_class is not None:
        settings["num_per_class"] = args.num_per_class
    from bench.quality import parse_ckpts

    try:
        ckpts = parse_ckpts(args.ckpt)  # refuse a bad ROW before any work
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.dry_run:
        print({**vars(args), **settings})
        return
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    from bench import report

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = {"command": command.strip(), "machine": report.machine(), "settings": settings}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t_all = time.time()
    for part in (p for p in PARTS if p in args.parts):
        t0 = time.time()
        goals = None
        if part == "quality":
            from bench import quality

            runs = Path(args.runs) if args.runs else None
            tables = quality.run(runs if runs and runs.exists() else None, ckpts, args.scale,
                                 settings["num_per_class"], log)
        elif part == "speed":
            from bench import speed

            tables, goals = speed.run(settings["net"], settings["warmup"], settings["repeats"],
                                      settings["guider_steps"], settings["guider_repeats"], settings["cfg_batches"], log)
        else:
            from bench import memory

            tables, goals = memory.run(settings["memory_nets"], None if args.no_zero else settings["zero_net"],
                                       settings["memory_warmup"], settings["memory_steps"], settings["memory_methods"],
                                       settings["zero_stages"], log)
        meta_part = {**meta, "seconds": round(time.time() - t0, 1), "machine_at_end": report.machine()}
        print(report.write_part(out, part, tables, meta_part, goals), flush=True)
    log(f"[bench] done in {time.time() - t_all:.0f} s; tables in {out}/{{{','.join(args.parts)}}}.{{md,json}}")


if __name__ == "__main__":
    main()
