"""The command line: `python -m train {fit,validate,sample,evaluate,export,guiders,demo} ...`.

fit / validate are LightningCLI over a YAML config (model:, data:, trainer:); the rest are plain
commands over a checkpoint. Every error a user can cause is printed as one line that says what to do.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from train.runtime.config import read_yaml, user_message

LIGHTNING_COMMANDS = ("fit", "validate")
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)


def main(argv: list[str] | None = None) -> None:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")  # W&B stays offline unless the user sets WANDB_MODE=online
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from argparse import ArgumentError

        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from train.runtime.nonfinite import NonFiniteError

        try:
            for flag, value in zip(argv, argv[1:]):
                if flag in ("--config", "-c"):
                    read_yaml(value)  # missing or malformed YAML: a one-line error before LightningCLI's usage dump
            from train.fit import finish_wandb, lightning_cli

            cli = lightning_cli(None if from_shell else argv)  # None: LightningCLI reads sys.argv itself, no warning
            finish_wandb()
            return cli
        except USER_ERRORS as e:  # bad data path, bad config value: one line, no traceback
            print(f"error: {user_message(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        except ArgumentError as e:  # unknown class, option or value in the config: one line instead of the usage
            print(f"error: {user_message(e)} (`python -m train {argv[0]} --help` lists the options)", file=sys.stderr)
            raise SystemExit(2) from None
        except NonFiniteError as e:  # NaN/inf under nonfinite: stop (or too many skipped updates)
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        except SIGTERMException as e:  # stopped by SIGTERM/SIGINT; train.runtime.interrupt wrote last.ckpt and said so
            raise SystemExit(e.code if isinstance(e.code, int) else 128 + signal.SIGTERM) from None
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(2)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def _parse_params(items: list[str]) -> dict:
    """`key=value` pairs (values parsed as JSON when possible) -> dict."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"guider parameter {item!r} must look like name=value (e.g. --param eta=0.0)")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint written by `fit` (e.g. runs/x/checkpoints/last.ckpt)")
    p.add_argument("--guider", default="cfg", help="guider name (see `python -m train guiders`)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="guider parameter, repeatable")
    p.add_argument("--sampler", default="ddim", help="ddim, euler or dpmpp_2m")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the model's own, e.g. a progressive student's distilled count; else 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 ancestral)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    t = p.add_argument_group("text-to-image models")
    t.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    t.add_argument("--prompts", default=None, metavar="FILE", help="prompt file: .txt, .csv, .jsonl, .json, .parquet")
    t.add_argument("--class-prompts", default=None, metavar="TEMPLATE",
                   help='digits text model: one prompt per digit, e.g. "a handwritten {word}" ({word}: seven, {digit}: 7)')
    t.add_argument("--negative-prompt", default=None, help="the negative prompt of CFG-like guiders (instead of the empty one)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(metavar="{fit,validate,sample,evaluate,export,guiders,demo,digits-pipeline}")
    sub.add_parser("fit", help="train from a YAML config (LightningCLI: --config configs/digits/teacher.yaml)")
    sub.add_parser("validate", help="validate a checkpoint (LightningCLI)")

    s = sub.add_parser("sample", help="write a PNG grid and an .npz of samples from a checkpoint")
    _sampling_args(s)
    s.add_argument("--scale", type=float, default=2.0, help="guidance scale w (D_u + w (D_c - D_u))")
    s.add_argument("--num-per-class", type=int, default=8, help="samples per class (or per class prompt)")
    s.add_argument("--num-per-prompt", type=int, default=4, help="text models: samples per prompt")
    s.add_argument("--out", required=True, help="output folder (grid.png, samples.npz)")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="sample and write metrics (FD, accuracy, precision/recall, NFE) as JSON")
    _sampling_args(e)
    e.add_argument("--scales", type=float, nargs="+", default=[2.0], help="guidance scales to evaluate")
    e.add_argument("--num-per-class", type=int, default=100, help="samples per class (or per class prompt)")
    e.add_argument("--num-per-prompt", type=int, default=1, help="text models, --prompts: samples per prompt")
    e.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="local FID Inception weights (pt_inception-2015-12-05-6726825d.pth); with --fid-reference")
    e.add_argument("--fid-reference", default=None, metavar="DIR", help="local folder of reference images for FID")
    e.add_argument("--clip-model", default=None, metavar="DIR", help="local CLIP model folder (transformers) for CLIP score")
    e.add_argument("--out", required=True, help="metrics JSON path")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="export a checkpoint as a diffusers folder, peft LoRA weights or one safetensors file")
    x.add_argument("--ckpt", required=True, help="checkpoint written by `fit`")
    x.add_argument("--out", required=True, help="target folder (diffusers, lora) or .safetensors file")
    x.add_argument("--format", default="diffusers", help="diffusers (folder), lora (peft adapter for the teacher) or safetensors")
    x.add_argument("--force", action="store_true", help="replace an existing target")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("digits-pipeline", help="build the text digits pipeline folder and the captioned digits (text demo)")
    b.add_argument("--out", default="runs/text_demo", help="writes <out>/pipeline and <out>/captions")
    b.add_argument("--vae-steps", type=int, default=600, help="training steps of the digits autoencoder")
    b.set_defaults(func=cmd_digits_pipeline)

    g = sub.add_parser("guiders", help="list the available guiders and their parameters")
    g.set_defaults(func=cmd_guiders)

    d = sub.add_parser("demo", help="the embedded default: train the digits teacher, sample, print metrics")
    d.add_argument("--out", default="runs/demo", help="output folder")
    d.add_argument("--max-steps", type=int, default=None, help="override every stage's training steps (quick runs)")
    d.add_argument("--stages", nargs="+", default=None, help="run only these stages (default: all, in order)")
    d.add_argument("--num-per-class", type=int, default=100, help="evaluation samples per class")
    d.set_defaults(func=cmd_demo)
    return p


def _check_sampling(args) -> None:
    from guidance.guiders import build_guider
    from guidance.samplers import check_sampler
    from train.methods.base import DEFAULT_STEPS

    check_sampler(args.sampler, DEFAULT_STEPS if args.steps is None else args.steps)
    build_guider(args.guider, **_parse_params(args.param))


def _steps(args, module) -> int:
    """--steps, or the model's own default (a progressive student's distilled step count), else 50."""
    from train.methods.base import DEFAULT_STEPS

    return args.steps if args.steps is not None else getattr(module, "default_steps", DEFAULT_STEPS)


def cmd_sample(args) -> None:
    import numpy as np
    import torch

    from train.runtime.checkpoint import load_method
    from train.evaluation.images import save_grid

    _check_sampling(args)
    if args.num_per_class <= 0:
        raise ValueError(f"--num-per-class must be positive, got {args.num_per_class}")
    module = load_method(args.ckpt)
    if _text_inputs(args, module):
        return _sample_text(args, module)
    labels = torch.arange(module.sampling_denoiser().net.num_classes).repeat_interleave(args.num_per_class)
    images, nfe = module.generate(labels, args.scale, _steps(args, module), args.sampler, args.guider, args.seed,
                                  progress=True, **_parse_params(args.param))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images, out / "grid.png", nrow=args.num_per_class)
    np.savez(out / "samples.npz", images=images.numpy(), labels=labels.numpy(), nfe_per_sample=nfe)
    print(f"wrote {out / 'grid.png'} and {out / 'samples.npz'} ({len(labels)} samples, {nfe:g} network evaluations each)")


def _text_inputs(args, module) -> bool:
    """True when `module` is a text model, which then needs prompts; prompts for a class model are refused."""
    from train.evaluation.prompts import is_text_model

    given = bool(args.prompt or args.prompts or args.class_prompts)
    if not is_text_model(module):
        if given or args.negative_prompt:
            raise ValueError(f"{args.ckpt} is a class-conditional model: drop --prompt/--prompts/--class-prompts/"
                             f"--negative-prompt (it samples --num-per-class images of each class)")
        return False
    if not given:
        raise ValueError(f"{args.ckpt} is a text-to-image model: give --prompt TEXT (repeatable), --prompts FILE, or "
                         f"--class-prompts TEMPLATE for the digits text model")
    return True


def _sample_text(args, module) -> None:
    import numpy as np

    from train.evaluation.images import save_grid
    from train.evaluation.prompts import generate_images, prompt_list
    from train.evaluation.digits_text import class_prompts

    prompts, n = prompt_list(args.prompt, args.prompts), args.num_per_prompt
    if args.class_prompts:
        prompts += class_prompts(args.class_prompts, 1)[0]  # the ten digits' prompts
    if n <= 0:
        raise ValueError(f"--num-per-prompt must be positive, got {n}")
    rows = [p for p in prompts for _ in range(n)]
    images, nfe = generate_images(module, rows, args.scale, _steps(args, module), args.sampler, args.guider, args.seed,
                                  args.negative_prompt, **_parse_params(args.param))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images, out / "grid.png", nrow=n)
    np.savez(out / "samples.npz", images=images.numpy(), prompts=np.array(rows), nfe_per_sample=nfe)
    (out / "prompts.txt").write_text("".join(f"row {i}: {p}\n" for i, p in enumerate(prompts)), encoding="utf-8")
    print(f"wrote {out / 'grid.png'} (one row per prompt, listed in {out / 'prompts.txt'}) and {out / 'samples.npz'} "
          f"({len(rows)} samples, {nfe:g} network evaluations each)")


def cmd_evaluate(args) -> None:
    from train.runtime.checkpoint import load_method
    from train.evaluation import format_table

    _check_sampling(args)
    module = load_method(args.ckpt)
    columns = ["guider", "w", "sampler", "steps", "nfe_per_sample", "accuracy", "fd", "precision", "recall"]
    missing: list[str] = []
    if _text_inputs(args, module):
        rows, columns = _evaluate_text(args, module, missing), ["prompts", *columns, "fid", "clip_score"]
    else:
        from train.evaluation.evaluate import evaluate_checkpoint

        rows = evaluate_checkpoint(module, args.scales, _steps(args, module), args.sampler, args.guider, args.seed,
                                   args.num_per_class, _parse_params(args.param))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps({"checkpoint": str(args.ckpt), "rows": rows, "not_computed": missing}, indent=2))
    os.replace(tmp, out)
    print(format_table(rows, [c for c in columns if any(c in r for r in rows)]))
    for line in missing:
        print(f"not computed: {line}")
    print(f"wrote {out}")


def _evaluate_text(args, module, missing: list[str]) -> list[dict]:
    """Rows of a text model: digits metrics for --class-prompts, FID / CLIP score for --prompt / --prompts."""
    from train.evaluation.prompts import evaluate_class_prompts, evaluate_prompt_set, prompt_list

    steps, params, rows = _steps(args, module), _parse_params(args.param), []
    if args.class_prompts:
        rows += evaluate_class_prompts(module, args.class_prompts, args.scales, steps, args.sampler, args.guider,
                                       args.seed, args.num_per_class, params, args.negative_prompt)
    prompts = prompt_list(args.prompt, args.prompts)
    if prompts:
        if args.num_per_prompt <= 0:
            raise ValueError(f"--num-per-prompt must be positive, got {args.num_per_prompt}")
        more, missing[:] = evaluate_prompt_set(module, prompts, args.scales, steps, args.sampler, args.guider, args.seed,
                                               args.num_per_prompt, params, args.negative_prompt, args.fid_weights,
                                               args.fid_reference, args.clip_model)
        rows += more
    return rows


def cmd_export(args) -> None:
    from train.export import export

    path = export(args.ckpt, args.out, args.format, args.force)
    print(f"wrote {path}")


def cmd_digits_pipeline(args) -> None:
    from train.digits_pipeline import build_digits_pipeline, write_captioned_digits

    out = Path(args.out)
    build_digits_pipeline(out / "pipeline", vae_steps=args.vae_steps)
    write_captioned_digits(out / "captions")
    print(f"wrote {out / 'pipeline'} (StableDiffusionPipeline layout; the UNet is untrained) and {out / 'captions'}")


def cmd_guiders(args) -> None:
    from guidance.guiders import list_guiders

    for name, doc, params in list_guiders():
        ps = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "-"
        print(f"{name:16s} {doc}\n{'':16s} parameters: {ps}")


def cmd_demo(args) -> None:
    from train.demo import run_demo

    run_demo(Path(args.out), max_steps=args.max_steps, stages=args.stages, num_per_class=args.num_per_class)
