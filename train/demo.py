"""`make demo`: the main job on the embedded default (scikit-learn digits), end to end on a CPU.

Stages (each a `python -m train fit` of a config under configs/digits, then an evaluation):
teacher -> guidance distillation -> progressive distillation -> one-step DMD -> one-step f-distill (JS)
-> concept erasure (one digit, two digits, one toward another) -> an erased one-step generator (SFD);
then the same on text: the text digits pipeline (train.digits_pipeline, SD 1.x layout) and its captioned digits ->
a text-to-image teacher -> guidance distillation -> one-step DMD -> erasing "seven" by prompt (configs/text_digits),
judged by the same metrics on prompts "a handwritten <digit>" (the erasure also on "the digit <digit>").
Later stages start from the earlier stages' checkpoints. Every stage prints its metrics table; all tables go to
<out>/metrics.json and <out>/tables.md, and the progress (stage i of n, steps of each stage, time left) to the
terminal and <out>/demo.log.

Profiles: "quick" (the default: every stage end to end in about a quarter of an hour on 2 CPU cores: short
schedules, 20 samples per class at 20 sampler steps; its tables are labelled as the quick profile) and "full" (the
configs' own schedules and 100 samples per class: the README's tables, hours on a CPU). A stage whose run finished
is reused on the next demo into the same folder, an interrupted one resumes from its last.ckpt; --fresh retrains.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCALES = (1.0, 2.0, 3.0, 5.0)
COLUMNS = ["stage", "requests", "guider", "w", "steps", "nfe_per_sample", "accuracy", "fd", "precision", "recall",
           "erased_rate", "other_accuracy"]
TEXT = "text"  # the text stages' folder under <out>: pipeline/, captions/, latents/ and one folder per stage
TEXT_DATA = {"path": "captions", "cache_dir": "latents"}  # data init args -> folders under <out>/text
PROFILES = ("quick", "full")


@dataclass(frozen=True)
class Stage:
    """One demo stage: its config, the earlier stages it takes ({init arg: stage}), how it is evaluated (sampler
    steps, None: the model's own, e.g. a progressive student's or a generator's; scales; class-prompt templates), and
    its quick profile (trainer steps, model overrides, a relative cost per step for the time estimate)."""

    name: str
    config: str | None
    takes: dict = field(default_factory=dict)
    eval_steps: int | None = 50
    scales: tuple = (2.0,)
    templates: tuple = ()
    quick_steps: int = 100
    quick_args: dict = field(default_factory=dict)
    cost: float = 1.0  # seconds per training step on a 2-core CPU, roughly (the quick profile's estimate)
    steps: int | None = None  # a fixed step count whatever the profile or --max-steps (a closed-form edit: 1)


FAST_ERASURE = {"x_t_source": "frozen_bank", "bank_size": 32}  # the quick profile's erasure x_t

STAGES = [
    # quick_steps and cost: from `make demo` on a fresh clone, 2-core CPU (11:17 in all; cost: seconds per step, with
    # 10 s per stage for start-up and evaluation);
    # the quick erasure stages take x_t from the frozen model's cached trajectories (x_t_source: frozen_bank), about
    # 3x cheaper per step than the paper's on-policy draws the configs use
    Stage("teacher", "digits/teacher.yaml", {}, 50, SCALES, quick_steps=500, cost=0.15),
    Stage("guidance_distill", "digits/guidance_distill.yaml", {"teacher": "teacher"}, 8, SCALES, quick_steps=300,
          cost=0.19),
    Stage("progressive", "digits/progressive.yaml", {"student": "guidance_distill"}, None, SCALES, quick_steps=150,
          quick_args={"start_steps": 8, "steps_per_round": 50}, cost=0.17),
    Stage("lcm", "digits/lcm.yaml", {"teacher": "teacher"}, 4, SCALES, quick_steps=300, cost=0.3),
    Stage("dmd", "digits/dmd.yaml", {"teacher": "teacher"}, None, quick_steps=45, cost=1.15),
    Stage("fdistill_js", "digits/fdistill_js.yaml", {"teacher": "teacher"}, None, quick_steps=35, cost=1.15),
    Stage("erase_one", "digits/erase_one.yaml", {"model": "teacher"}, 50, quick_steps=60, cost=0.37,
          quick_args=FAST_ERASURE),
    Stage("erase_two", "digits/erase_two.yaml", {"model": "teacher"}, 50, quick_steps=60, cost=0.37,
          quick_args=FAST_ERASURE),
    Stage("erase_toward", "digits/erase_toward.yaml", {"model": "teacher"}, 50, quick_steps=60, cost=0.37,
          quick_args=FAST_ERASURE),
    Stage("sid", "digits/sid.yaml", {"teacher": "teacher"}, None, quick_steps=45, cost=0.75),
    Stage("sfd", "digits/sfd.yaml", {"teacher": "teacher"}, None, quick_steps=40, cost=0.62),
    Stage("text_pipeline", None, quick_steps=200, cost=0.02),
    Stage("text_teacher", "text_digits/teacher.yaml", {"net.init_args.pretrained": "text_pipeline"}, 50, SCALES,
          ("a handwritten {word}",), quick_steps=300, cost=0.26),
    Stage("text_guidance_distill", "text_digits/guidance_distill.yaml", {"teacher": "text_teacher"}, 8, SCALES,
          ("a handwritten {word}",), quick_steps=120, cost=0.32),
    Stage("text_dmd", "text_digits/dmd.yaml", {"teacher": "text_teacher"}, None, (2.0,), ("a handwritten {word}",),
          quick_steps=40, cost=0.55),
    Stage("text_erase", "text_digits/erase.yaml", {"model": "text_teacher"}, 50, (2.0,),
          ("a handwritten {word}", "the digit {word}"), quick_steps=60, cost=0.78, quick_args=FAST_ERASURE),
    Stage("text_uce", "text_digits/uce.yaml", {"model": "text_teacher"}, 50, (2.0,),
          ("a handwritten {word}", "the digit {word}"), cost=2.0, steps=1),
]
EVALUATION = {"quick": (20, 20), "full": (100, None)}  # profile -> (samples per class, sampler steps; None: the stage's)
VAE_STEPS = {"quick": 200, "full": 600}


def _stage_dir(out: Path, name: str) -> Path:
    """Where stage `name` writes: <out>/<name>, or <out>/text/<name without text_> for the text stages."""
    return out / TEXT / name.removeprefix("text_") if name.startswith("text_") else out / name


def _takes(out: Path, stage: Stage) -> list[str]:
    """The CLI overrides that point `stage` at its inputs under `out` (checkpoints, text data folders)."""
    args = []
    for arg, source in stage.takes.items():
        src = _stage_dir(out, source) if source == "text_pipeline" else _stage_dir(out, source) / "checkpoints" / "last.ckpt"
        if not src.exists():
            raise FileNotFoundError(f"demo stage {stage.name!r} needs {src}; run stage {source!r} first")
        args += [f"--model.init_args.{arg}", str(src)]
    if stage.name.startswith("text_") and stage.name not in ("text_pipeline", "text_erase", "text_uce"):
        for arg, folder in TEXT_DATA.items():
            value = out / TEXT / folder
            if stage.name == "text_dmd":  # data-free: the prompt set only
                value = out / TEXT / "captions" / "prompts.txt" if arg == "path" else None
            if value is not None:
                args += [f"--data.init_args.{arg}", str(value)]
    return args


def _planned_steps(stage: Stage, profile: str, max_steps: int | None) -> int:
    """Training steps of `stage` in `profile` (--max-steps overrides both profiles; a stage's fixed `steps` all)."""
    if stage.steps is not None:
        return stage.steps
    if max_steps is not None:
        return max_steps
    if profile == "quick" or stage.config is None:
        return stage.quick_steps if profile == "quick" else VAE_STEPS["full"]
    from train.runtime.config import read_yaml

    return int(read_yaml(CONFIGS / stage.config)["trainer"]["max_steps"])


def _finished(ckpt: Path, steps: int) -> bool:
    """A stage run whose last.ckpt reached its planned steps (its training is done)."""
    import torch

    try:
        return ckpt.is_file() and int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]) >= steps
    except Exception:  # an unreadable checkpoint is not a finished run: train again
        return False


def _fit(stage: Stage, out: Path, profile: str, steps: int, fresh: bool, log: "Log") -> Path:
    """Train `stage` (or reuse / resume its earlier run in the same folder); returns its last.ckpt."""
    from train.fit import finish_wandb, lightning_cli

    root = _stage_dir(out, stage.name)
    ckpt = root / "checkpoints" / "last.ckpt"
    args = ["fit", "--config", str(CONFIGS / stage.config), "--trainer.default_root_dir", str(root),
            *_takes(out, stage), "--trainer.max_steps", str(steps)]
    if profile == "quick":
        args += [a for k, v in stage.quick_args.items() for a in (f"--model.init_args.{k}", str(v))]
        args += ["--trainer.val_check_interval", str(steps), "--trainer.log_every_n_steps", str(max(1, steps // 10))]
    progress = ["--trainer.callbacks+=train.runtime.progress.ProgressLog", f"--trainer.callbacks.path={log.path}",
                f"--trainer.callbacks.name={stage.name}"]
    if not fresh and _finished(ckpt, steps):
        log(f"stage {stage.name}: {ckpt} already holds {steps} steps; reusing it (--fresh retrains)")
        return ckpt
    if not fresh and ckpt.is_file():
        log(f"stage {stage.name}: resuming the interrupted run from {ckpt}")
        args += ["--ckpt_path", str(ckpt)]
    log(f"stage {stage.name}: python -m train {' '.join(args)}")
    if root.exists() and (fresh or not ckpt.is_file()):
        args += ["--reuse_run_folder", "true"]  # the demo's own earlier run of this stage is replaced
    lightning_cli(args + progress)
    finish_wandb()
    if not ckpt.is_file():
        raise FileNotFoundError(f"training finished without writing {ckpt}")
    return ckpt


class Log:
    """Progress lines to the terminal and to <out>/demo.log (a log file shows them too, not only a terminal)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, line: str) -> None:
        line = f"[demo {time.strftime('%H:%M:%S')}] {line}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def run_demo(out: Path, profile: str = "quick", max_steps: int | None = None, stages: list[str] | None = None,
             num_per_class: int | None = None, fresh: bool = False) -> dict:
    """Run the demo stages into `out` (all by default); returns what out/metrics.json holds."""
    import torch

    from train.evaluation import format_table
    from train.evaluation.digits_text import erased_digits, erasure_columns, generate_digits
    from train.evaluation.images import save_grid
    from train.evaluation.requests import evaluate_checkpoint, evaluate_class_prompts
    from train.runtime.checkpoint import load_method
    from train.runtime.progress import clock

    if profile not in PROFILES:
        raise ValueError(f"unknown demo profile {profile!r}; choose {' or '.join(PROFILES)}")
    wanted = stages or [s.name for s in STAGES]
    unknown = set(wanted) - {s.name for s in STAGES}
    if unknown:
        raise ValueError(f"unknown demo stage(s) {sorted(unknown)}; choose from {', '.join(s.name for s in STAGES)}")
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"--max-steps must be positive, got {max_steps}")
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "demo.log")
    per_class, eval_steps = EVALUATION[profile]
    per_class = num_per_class or per_class
    todo = [s for s in STAGES if s.name in wanted]
    planned = {s.name: _planned_steps(s, profile, max_steps) for s in todo}
    estimate = {s.name: planned[s.name] * s.cost + 10 for s in todo}  # + start-up and evaluation
    log(f"{len(todo)} stage(s), {profile} profile, into {out}; about {clock(sum(estimate.values()))} on 2 CPU cores")
    results, tables, t0 = {}, [], time.time()
    for i, stage in enumerate(todo, 1):
        left = sum(estimate[s.name] for s in todo[i - 1:])
        log(f"stage {i}/{len(todo)}: {stage.name} ({planned[stage.name]} steps); elapsed {clock(time.time() - t0)}, "
            f"about {clock(left)} left")
        root = _stage_dir(out, stage.name)
        if stage.config is None:  # text_pipeline: the SD-layout folder and the captioned digits
            from train.digits_pipeline import build_digits_pipeline, write_captioned_digits

            if fresh or not (root / "model_index.json").is_file():
                log(f"stage {stage.name}: python -m train digits-pipeline --out {out / TEXT} --vae-steps "
                    f"{planned[stage.name]}")
                build_digits_pipeline(root, vae_steps=planned[stage.name])
                write_captioned_digits(out / TEXT / "captions")
            else:
                log(f"stage {stage.name}: reusing {root} (--fresh rebuilds)")
            continue
        ckpt = _fit(stage, out, profile, planned[stage.name], fresh, log)
        module = load_method(ckpt)
        steps = stage.eval_steps if eval_steps is None or stage.eval_steps is None else min(eval_steps, stage.eval_steps)
        scales = stage.scales if module.recipe().name != "generator" else (None,)
        w = scales[0] if len(scales) == 1 else 2.0
        log(f"stage {stage.name}: evaluating ({10 * per_class} samples per scale)")
        if stage.templates:
            save_grid(generate_digits(module, stage.templates[0], 8, w, steps)[0], root / "grid.png", nrow=8)
            rows = [{"stage": stage.name, **r} for t in stage.templates
                    for r in evaluate_class_prompts(module, t, scales, steps, num_per_class=per_class)]
        else:
            images, _ = module.generate(torch.arange(10).repeat_interleave(8), scale=w, steps=steps)
            save_grid(images, root / "grid.png", nrow=8)
            rows = [{"stage": stage.name, **r}
                    for r in evaluate_checkpoint(module, scales, steps=steps, num_per_class=per_class)]
        rows = [{**r, **erasure_columns(r, erased_digits(module))} for r in rows]
        table = format_table(rows, [c for c in COLUMNS if any(c in r for r in rows)])
        title = (f"{stage.name} ({profile} profile: {planned[stage.name]} training steps; "
                 f"{steps or module.recipe().resolve().steps} sampler steps, {10 * per_class} samples, FD to the 300 "
                 f"held-out digits)")
        print(f"\n{title}:\n\n{table}\n", flush=True)
        results[stage.name] = {"checkpoint": str(ckpt), "training_steps": planned[stage.name], "rows": rows}
        tables.append(f"### {title}\n\n{table}\n")
    metrics = {"profile": profile, "stages": results, "seconds": round(time.time() - t0, 1)}
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    (out / "tables.md").write_text(f"Demo tables ({profile} profile).\n\n" + "\n".join(tables))
    log(f"done in {clock(metrics['seconds'])}; metrics in {out / 'metrics.json'}, tables in {out / 'tables.md'}")
    return metrics

