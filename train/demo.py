"""`make demo`: the main job on the embedded default (scikit-learn digits), end to end on a CPU.

Stage 1 trains the digits teacher from configs/digits/teacher.yaml, samples a guided grid and prints the
metrics table (FD, class accuracy, precision/recall, network evaluations) at w in {1, 2, 3, 5}.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCALES = (1.0, 2.0, 3.0, 5.0)


def _fit(config: Path, root: Path, max_steps: int | None) -> Path:
    from train.cli import lightning_cli

    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(root)]
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps)]
    lightning_cli(args)
    ckpt = root / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"training finished without writing {ckpt}")
    return ckpt


def run_demo(out: Path, max_steps: int | None = None) -> dict:
    """Run every demo stage into `out`; returns the metrics written to out/metrics.json."""
    import torch

    from train.checkpoint import load_method
    from train.cli import evaluate_checkpoint
    from train.evaluation import format_table
    from train.images import save_grid

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[demo] stage 1: train the digits teacher ({CONFIGS / 'digits/teacher.yaml'})", flush=True)
    ckpt = _fit(CONFIGS / "digits" / "teacher.yaml", out / "teacher", max_steps)
    teacher = load_method(ckpt, expect="teacher")
    labels = torch.arange(10).repeat_interleave(8)
    images, _ = teacher.generate(labels, scale=2.0, steps=50)
    grid = save_grid(images, out / "teacher" / "grid_w2.png", nrow=8)
    print(f"[demo] guided grid (w=2, DDIM 50 steps): {grid}")
    rows = evaluate_checkpoint(teacher, SCALES, steps=50)
    table = format_table(rows, ["guider", "w", "steps", "nfe_per_sample", "accuracy", "fd", "precision", "recall"])
    print("\n[demo] teacher, DDIM 50 steps, 1000 samples (100 per class), FD to the 300 held-out digits:\n")
    print(table)
    metrics = {"teacher": {"checkpoint": str(ckpt), "rows": rows}, "seconds": round(time.time() - t0, 1)}
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    (out / "teacher_table.md").write_text(table + "\n")
    print(f"\n[demo] done in {metrics['seconds']} s; metrics in {out / 'metrics.json'}")
    return metrics
