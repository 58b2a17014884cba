"""`make demo`: the main job on the embedded default (scikit-learn digits), end to end on a CPU.

Stages (each a `python -m train fit` of a config under configs/digits, then an evaluation):
teacher -> guidance distillation -> progressive distillation -> one-step DMD -> one-step f-distill (JS)
-> concept erasure (one digit, two digits, one toward another) -> an erased one-step generator (SFD);
then the same on text: the text digits pipeline (train.digits_pipeline, SD 1.x layout) and its captioned digits ->
a text-to-image teacher -> guidance distillation -> one-step DMD -> erasing "seven" by prompt (configs/text_digits),
judged by the same metrics on prompts "a handwritten <digit>" (the erasure also on "the digit <digit>").
Later stages start from the earlier stages' checkpoints. Every stage prints its metrics table; all tables go to
<out>/metrics.json and <out>/tables.md.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCALES = (1.0, 2.0, 3.0, 5.0)
COLUMNS = ["stage", "requests", "guider", "w", "steps", "nfe_per_sample", "accuracy", "fd", "precision", "recall",
           "erased_rate", "other_accuracy"]
TEXT = "text"  # the text stages' folder under <out>: pipeline/, captions/, latents/ and one folder per stage
TEXT_DATA = {"path": "captions", "cache_dir": "latents"}  # data init args -> folders under <out>/text

# (stage, config, {init arg: stage whose last.ckpt it takes}, evaluation steps, scales, class-prompt templates)
STAGES = [
    ("teacher", "digits/teacher.yaml", {}, 50, SCALES, ()),
    ("guidance_distill", "digits/guidance_distill.yaml", {"teacher": "teacher"}, 8, SCALES, ()),
    ("progressive", "digits/progressive.yaml", {"student": "guidance_distill"}, 1, SCALES, ()),
    ("dmd", "digits/dmd.yaml", {"teacher": "teacher"}, 1, (2.0,), ()),
    ("fdistill_js", "digits/fdistill_js.yaml", {"teacher": "teacher"}, 1, (2.0,), ()),
    ("erase_one", "digits/erase_one.yaml", {"model": "teacher"}, 50, (2.0,), ()),
    ("erase_two", "digits/erase_two.yaml", {"model": "teacher"}, 50, (2.0,), ()),
    ("erase_toward", "digits/erase_toward.yaml", {"model": "teacher"}, 50, (2.0,), ()),
    ("sfd", "digits/sfd.yaml", {"teacher": "teacher"}, 1, (2.0,), ()),
    ("text_pipeline", None, {}, 0, (), ()),
    ("text_teacher", "text_digits/teacher.yaml", {"net.init_args.pretrained": "text_pipeline"}, 50, SCALES,
     ("a handwritten {word}",)),
    ("text_guidance_distill", "text_digits/guidance_distill.yaml", {"teacher": "text_teacher"}, 8, SCALES,
     ("a handwritten {word}",)),
    ("text_dmd", "text_digits/dmd.yaml", {"teacher": "text_teacher"}, 1, (2.0,), ("a handwritten {word}",)),
    ("text_erase", "text_digits/erase.yaml", {"model": "text_teacher"}, 50, (2.0,),
     ("a handwritten {word}", "the digit {word}")),
]


def _stage_dir(out: Path, name: str) -> Path:
    """Where stage `name` writes: <out>/<name>, or <out>/text/<name without text_> for the text stages."""
    return out / TEXT / name.removeprefix("text_") if name.startswith("text_") else out / name


def _takes(out: Path, name: str, takes: dict[str, str]) -> list[str]:
    """The CLI overrides that point stage `name` at its inputs under `out` (checkpoints, text data folders)."""
    args = []
    for arg, stage in takes.items():
        src = _stage_dir(out, stage) if stage == "text_pipeline" else _stage_dir(out, stage) / "checkpoints" / "last.ckpt"
        if not src.exists():
            raise FileNotFoundError(f"demo stage {name!r} needs {src}; run stage {stage!r} first")
        args += [f"--model.init_args.{arg}", str(src)]
    if name.startswith("text_") and name not in ("text_pipeline", "text_erase"):
        for arg, folder in TEXT_DATA.items():
            value = out / TEXT / folder
            if name == "text_dmd":  # data-free: the prompt set only
                value = out / TEXT / "captions" / "prompts.txt" if arg == "path" else None
            if value is not None:
                args += [f"--data.init_args.{arg}", str(value)]
    return args


def _fit(config: Path, root: Path, overrides: list[str], max_steps: int | None) -> Path:
    from train.fit import lightning_cli

    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(root), "--reuse_run_folder", "true",
            *overrides]
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

    from train.evaluation import format_table
    from train.evaluation.images import save_grid
    from train.evaluation.requests import evaluate_checkpoint, evaluate_class_prompts
    from train.fit import finish_wandb
    from train.runtime.checkpoint import load_method

    out.mkdir(parents=True, exist_ok=True)
    wanted = stages or [s[0] for s in STAGES]
    unknown = set(wanted) - {s[0] for s in STAGES}
    if unknown:
        raise ValueError(f"unknown demo stage(s) {sorted(unknown)}; choose from {', '.join(s[0] for s in STAGES)}")
    results, tables, t0 = {}, [], time.time()
    for name, config, takes, steps, scales, templates in STAGES:
        if name not in wanted:
            continue
        root = _stage_dir(out, name)
        if config is None:  # text_pipeline: the SD-layout folder and the captioned digits
            from train.digits_pipeline import build_digits_pipeline, write_captioned_digits

            print(f"[demo] stage {name}: python -m train digits-pipeline --out {out / TEXT}", flush=True)
            build_digits_pipeline(root, vae_steps=max_steps or 600)
            write_captioned_digits(out / TEXT / "captions")
            continue
        overrides = _takes(out, name, takes)
        print(f"[demo] stage {name}: python -m train fit --config {CONFIGS / config} {' '.join(overrides)}", flush=True)
        ckpt = _fit(CONFIGS / config, root, overrides, max_steps)
        finish_wandb()
        module = load_method(ckpt)
        w = scales[0] if len(scales) == 1 else 2.0
        if templates:
            from train.evaluation.digits_text import generate_digits

            save_grid(generate_digits(module, templates[0], 8, w, steps)[0], root / "grid.png", nrow=8)
            rows = [{"stage": name, **r} for t in templates
                    for r in evaluate_class_prompts(module, t, scales, steps, num_per_class=num_per_class)]
        else:
            images, _ = module.generate(torch.arange(10).repeat_interleave(8), scale=w, steps=steps)
            save_grid(images, root / "grid.png", nrow=8)
            rows = [{"stage": name, **r} for r in evaluate_checkpoint(module, scales, steps=steps, num_per_class=num_per_class)]
        from train.evaluation.digits_text import erased_digits, erasure_columns

        rows = [{**r, **erasure_columns(r, erased_digits(module))} for r in rows]
        table = format_table(rows, [c for c in COLUMNS if any(c in r for r in rows)])
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
