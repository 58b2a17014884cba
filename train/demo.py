"""`make demo`: the main job on the embedded default (scikit-learn digits), end to end on a CPU.

Stages (each a `python -m train fit` of a config under configs/digits, then an evaluation):
teacher -> guidance distillation -> progressive distillation -> one-step DMD -> one-step f-distill (JS)
-> concept erasure (one digit, two digits, one toward another) -> an erased one-step generator (SFD).
Later stages start from the earlier stages' checkpoints. Every stage prints its metrics table; all tables go to
<out>/metrics.json and <out>/tables.md.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "digits"
SCALES = (1.0, 2.0, 3.0, 5.0)
COLUMNS = ["stage", "guider", "w", "steps", "nfe_per_sample", "accuracy", "fd", "precision", "recall"]

# (stage, config, {init arg: stage whose last.ckpt it takes}, evaluation steps, scales)
STAGES = [
    ("teacher", "teacher.yaml", {}, 50, SCALES),
    ("guidance_distill", "guidance_distill.yaml", {"teacher": "teacher"}, 8, SCALES),
    ("progressive", "progressive.yaml", {"student": "guidance_distill"}, 1, SCALES),
    ("dmd", "dmd.yaml", {"teacher": "teacher"}, 1, (2.0,)),
    ("fdistill_js", "fdistill_js.yaml", {"teacher": "teacher"}, 1, (2.0,)),
    ("erase_one", "erase_one.yaml", {"model": "teacher"}, 50, (2.0,)),
    ("erase_two", "erase_two.yaml", {"model": "teacher"}, 50, (2.0,)),
    ("erase_toward", "erase_toward.yaml", {"model": "teacher"}, 50, (2.0,)),
    ("sfd", "sfd.yaml", {"teacher": "teacher"}, 1, (2.0,)),
]


def _fit(config: Path, root: Path, overrides: dict[str, str], max_steps: int | None) -> Path:
    from train.cli import lightning_cli

    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(root)]
    for key, value in overrides.items():
        args += [f"--model.init_args.{key}", value]
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps)]
    lightning_cli(args)
    ckpt = root / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"training finished without writing {ckpt}")
    return ckpt


def run_demo(out: Path, max_steps: int | None = None, stages: list[str] | None = None, num_per_class: int = 100) -> dict:
    """Run the demo stages into `out` (all by default); returns what out/metrics.json holds."""
    import torch

    from train.checkpoint import load_method
    from train.cli import _finish_wandb, evaluate_checkpoint
    from train.evaluation import format_table
    from train.images import save_grid

    out.mkdir(parents=True, exist_ok=True)
    wanted = stages or [s[0] for s in STAGES]
    unknown = set(wanted) - {s[0] for s in STAGES}
    if unknown:
        raise ValueError(f"unknown demo stage(s) {sorted(unknown)}; choose from {', '.join(s[0] for s in STAGES)}")
    results, tables, t0 = {}, [], time.time()
    for name, config, takes, steps, scales in STAGES:
        if name not in wanted:
            continue
        overrides = {}
        for arg, stage in takes.items():
            ckpt = out / stage / "checkpoints" / "last.ckpt"
            if not ckpt.is_file():
                raise FileNotFoundError(f"demo stage {name!r} needs {ckpt}; run stage {stage!r} first")
            overrides[arg] = str(ckpt)
        print(f"[demo] stage {name}: python -m train fit --config {CONFIGS / config}", flush=True)
        ckpt = _fit(CONFIGS / config, out / name, overrides, max_steps)
        _finish_wandb()
        module = load_method(ckpt)
        images, _ = module.generate(torch.arange(10).repeat_interleave(8), scale=scales[0] if len(scales) == 1 else 2.0,
                                    steps=steps)
        save_grid(images, out / name / "grid.png", nrow=8)
        rows = [{"stage": name, **r} for r in evaluate_checkpoint(module, scales, steps=steps, num_per_class=num_per_class)]
        table = format_table(rows, COLUMNS)
        print(f"\n[demo] {name} ({steps} sampler steps, {10 * num_per_class} samples, FD to the 300 held-out digits):\n\n{table}\n", flush=True)
        results[name] = {"checkpoint": str(ckpt), "rows": rows}
        tables.append(f"### {name}\n\n{table}\n")
    metrics = {"stages": results, "seconds": round(time.time() - t0, 1)}
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    (out / "tables.md").write_text("\n".join(tables))
    print(f"[demo] done in {metrics['seconds']} s; metrics in {out / 'metrics.json'}, tables in {out / 'tables.md'}")
    return metrics
