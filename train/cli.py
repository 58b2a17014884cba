"""The command line: `python -m train {fit,validate,sample,evaluate,export,guiders,demo,digits-pipeline} ...`.

fit / validate are LightningCLI over a YAML config (model:, data:, trainer:); the rest are plain
commands over a checkpoint. Every error a user can cause is printed as one line that says what to do.
Nothing heavy is imported before a command runs, so --help and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from train.runtime.config import read_yaml, user_message
from train.sampling_commands import cmd_evaluate, cmd_sample

LIGHTNING_COMMANDS = ("fit", "validate")
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, PermissionError, NotADirectoryError,
               IsADirectoryError)
EXAMPLES = """examples:
  python -m train demo                                          the embedded default, end to end
  python -m train fit --config configs/digits/teacher.yaml     train (a YAML config: model, data, trainer)
  python -m train sample --ckpt runs/digits/teacher/checkpoints/last.ckpt --scale 3 --out samples
  python -m train evaluate --ckpt CKPT --scales 1 2 3 --out metrics.json
  python -m train export --ckpt CKPT --out exported             a diffusers folder (or --format lora, safetensors)
  python -m train guiders                                       the guidance rules and their parameters"""


def main(argv: list[str] | None = None) -> None:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")  # W&B stays offline unless the user sets WANDB_MODE=online
    if argv and argv[0] in LIGHTNING_COMMANDS:
        helping = any(a in ("-h", "--help") or a.startswith("--print_config") for a in argv[1:])
        if not helping and not any(a in ("--config", "-c") or a.startswith(("--config=", "--model", "--data"))
                                   for a in argv[1:]):
            print(f"error: `{argv[0]}` needs a config: pass --config FILE.yaml (e.g. configs/digits/teacher.yaml; "
                  f"configs/ holds one per method and model; `python -m train {argv[0]} --help` lists the options)",
                  file=sys.stderr)
            raise SystemExit(2)
        from argparse import ArgumentError

        from lightning.fabric.utilities.exceptions import MisconfigurationException
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
        except (*USER_ERRORS, MisconfigurationException) as e:  # bad data path, bad config value: one line
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
    parser = build_parser(with_guiders=any(a in ("-h", "--help") for a in argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(2)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not None, not an empty list, not a required option's)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _sampling_args(p: argparse.ArgumentParser, guiders: str) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint written by `fit` (e.g. runs/x/checkpoints/last.ckpt)")
    p.add_argument("--guider", default=None, help=f"guidance rule (default cfg){guiders}; `python -m train guiders` "
                                                  f"lists their parameters")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="guider parameter, repeatable")
    p.add_argument("--sampler", default=None, help="ddim (default), euler or dpmpp_2m")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the model's own: a progressive student's distilled count, a "
                        "generator's; else 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 ancestral)")
    p.add_argument("--seed", type=int, default=None,
                   help="noise seed (default 0; a prompt file with a seed column, as I2P and COCO-30k CSVs have: each "
                        "prompt's own seed unless --seed is given)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where the networks, the VAE, the text encoders and the metrics' networks run: cpu, cuda or "
                        "cuda:N (default: cuda when torch sees a GPU, else cpu); the noise of a seed is drawn on the CPU, "
                        "the same on every device")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the diffusion networks' precision (UNets, transformers): float32 leaves them as loaded; "
                        "bfloat16 or float16 (GPU only) store and run them in half precision, in half the memory. Latents, "
                        "guidance and the sampler's math stay float32, the VAE and the text encoders as loaded")
    r = p.add_argument_group("what to sample (default: every class of a class-conditional model)")
    r.add_argument("--class", dest="classes", action="append", default=[], metavar="CLASS",
                   help="a class id or name (repeatable)")
    r.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    r.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompt file: .txt, .csv, .jsonl, .json, .parquet; the I2P and COCO-30k CSVs as published or as "
                        "the erasure repos ship them: each row's seed and guidance scale are used (evaluation_seed / "
                        "sd_seed, evaluation_guidance / sd_guidance_scale) unless --seed / --scale(s) are given")
    r.add_argument("--prompt-categories", nargs="+", default=None, metavar="CATEGORY",
                   help="only the rows of --prompts FILE in these categories (I2P's categories column, e.g. sexual)")
    r.add_argument("--max-prompts", type=int, default=None, metavar="N", help="only the first N rows of --prompts FILE")
    r.add_argument("--class-prompts", default=None, metavar="TEMPLATE",
                   help='digits text model: one prompt per digit, e.g. "a handwritten {word}" ({word}: seven, {digit}: 7)')
    r.add_argument("--negative", "--negative-prompt", dest="negative", default=None, metavar="REQUEST",
                   help="the negative condition of CFG-like guiders (a prompt, or a class) instead of the null one")


def build_parser(with_guiders: bool = False) -> argparse.ArgumentParser:
    """The argument parser; with_guiders lists the guider names in the help (it imports the guidance core)."""
    guiders = ""
    if with_guiders:
        from guidance.guiders import GUIDERS

        guiders = ": " + ", ".join(sorted(GUIDERS))
    fmt = _DefaultsFormatter
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(metavar="{fit,validate,sample,evaluate,export,guiders,demo,digits-pipeline}")
    sub.add_parser("fit", help="train from a YAML config: --config configs/digits/teacher.yaml")
    sub.add_parser("validate", help="validate a checkpoint: --config CONFIG --ckpt_path CKPT")

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=f"example: {example}", formatter_class=fmt)

    s = command("sample", "write a PNG grid and an .npz of samples from a checkpoint",
                "python -m train sample --ckpt runs/digits/teacher/checkpoints/last.ckpt --scale 3 --out samples")
    _sampling_args(s, guiders)
    s.add_argument("--scale", type=float, default=None,
                   help="guidance scale w (D_u + w (D_c - D_u)); default 2, or what a generator was distilled at")
    s.add_argument("--nasa-scale", type=float, default=None, metavar="ALPHA",
                   help="honour --negative-prompt without CFG (a w-input student or a one-/few-step generator of a "
                        "text UNet): its cross-attention returns Attn(Q, K+, V+) - ALPHA Attn(Q, K-, V-) (NASA, SNOOPI)")
    s.add_argument("--negtome-scale", type=float, default=None, metavar="ALPHA",
                   help="a w-input student or one-/few-step generator of a UNet: push each batch's samples away from its "
                        "first one in self-attention, x + ALPHA (x - best-matching reference token) (NegToMe; 0.9)")
    s.add_argument("--num-per-class", type=int, default=8, help="samples per class (or per class prompt)")
    s.add_argument("--num-per-prompt", type=int, default=4, help="samples per prompt")
    s.add_argument("--out", required=True, help="output folder (grid.png, samples.npz)")
    s.set_defaults(func=cmd_sample)

    e = command("evaluate", "sample and write metrics (FD, accuracy, precision/recall, NFE; FID, CLIP) as JSON",
                "python -m train evaluate --ckpt CKPT --scales 1 2 3 5 --out metrics.json")
    _sampling_args(e, guiders)
    e.add_argument("--scales", type=float, nargs="+", default=None,
                   help="guidance scales to evaluate (default 2, or what a generator was distilled at)")
    e.add_argument("--num-per-class", type=int, default=100, help="samples per class (or per class prompt)")
    e.add_argument("--num-per-prompt", type=int, default=1, help="samples per prompt")
    e.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="local FID Inception weights (pt_inception-2015-12-05-6726825d.pth); compared with "
                        "--fid-reference, or for a class model with the held-out images of its data")
    e.add_argument("--fid-reference", default=None, metavar="DIR",
                   help="local folder of reference images for FID (default for a class model: its data's held-out images)")
    e.add_argument("--clip-model", default=None, metavar="DIR",
                   help="local CLIP model folder (transformers) for CLIP score and the zero-shot --concepts accuracy")
    e.add_argument("--out", required=True, help="metrics JSON path")
    e.add_argument("--batch-size", type=int, default=64,
                   help="samples generated and judged at a time: a set of any size is evaluated batch by batch, in "
                        "memory bounded by a batch (FID, CLIP score and the other metrics accumulate); a stochastic "
                        "sampler's samples (--eta > 0) depend on it, as its draws are made batch by batch")
    e.add_argument("--save-images", default=None, metavar="DIR",
                   help="also write every generated image to DIR as a PNG as it is produced, one subfolder per set and "
                        "scale, listed with its request, seed and guidance in DIR/images.csv (DIR: new, empty, or an "
                        "earlier save with --overwrite-images)")
    e.add_argument("--overwrite-images", action="store_true",
                   help="replace the earlier --save-images in DIR (anything else in DIR is never replaced)")
    n = e.add_argument_group("erasure metrics from local weights (train/evaluation/nudity.py, zero_shot.py)")
    n.add_argument("--nudenet", default=None, metavar="PATH",
                   help="NudeNet v3 detector ONNX file (320n.onnx from the nudenet package): the nudity rate, run by "
                        "onnxruntime")
    n.add_argument("--nudity-threshold", type=float, default=None,
                   help="an image is nude when a nudity class scores above this (default 0.6, PUND's; UnlearnDiffAtk "
                        "0.45)")
    n.add_argument("--nudity-classes", nargs="+", default=None, metavar="LABEL",
                   help="the NudeNet classes that make an image nude (default the explicit five: FEMALE_BREAST_EXPOSED, "
                        "FEMALE_GENITALIA_EXPOSED, MALE_GENITALIA_EXPOSED, BUTTOCKS_EXPOSED, ANUS_EXPOSED)")
    n.add_argument("--concepts", nargs="+", default=None, metavar="NAME",
                   help="classify every image among these concepts by zero-shot CLIP (--clip-model), e.g. the erased "
                        "\"Van Gogh\" and the styles to keep; reports each concept's share, and its accuracy with "
                        "--concept-prompts")
    n.add_argument("--concept-template", default=None, metavar="TEMPLATE",
                   help='the CLIP text of each concept, {} the name (default "a photo of {}")')
    n.add_argument("--concept-prompts", default=None, metavar="TEMPLATE",
                   help='also sample each concept in this prompt template ({} the name, e.g. "a painting by {}"), '
                        '--num-per-class each, and report the accuracy per concept (the erased ones: lower is better)')
    a = e.add_argument_group("adversarial prompts (erased text-to-image models; train/evaluation/attack.py)")
    a.add_argument("--attack", default=None, choices=("unlearndiffatk", "ringabell"),
                   help="unlearndiffatk (arXiv 2310.11868): learn soft tokens prepended to each attacked prompt against "
                        "the erased model's denoising loss on the original model's images of it; ringabell (arXiv "
                        "2310.10012): move each attacked prompt's text embedding along the concept vector (the mean "
                        "embedding difference of prompts with and without the concept; with --class-prompts the "
                        "concept digit's prompt minus each other digit's in the same template, else --attack-pairs), "
                        "and search a K-token prompt nearest to it by the authors' genetic algorithm. Reports the "
                        "erased rate before, attacked (soft tokens / the shifted embedding itself: a continuous "
                        "relaxation) and with the discrete prompt as token ids (nearest_words)")
    a.add_argument("--attack-steps", type=int, default=None,
                   help="unlearndiffatk: Adam steps per prompt (default 100; 0: no attack); ringabell: generations of "
                        "the genetic search (default 3000, the authors'; 0: the shifted embedding only)")
    a.add_argument("--attack-tokens", type=int, default=None,
                   help="unlearndiffatk: soft tokens prepended (default 3, the authors'); ringabell: the discrete "
                        "prompt's length K (default 16, the authors')")
    a.add_argument("--attack-lr", type=float, default=None,
                   help="unlearndiffatk: Adam learning rate (default 0.01, the authors')")
    a.add_argument("--attack-images", type=int, default=None,
                   help="unlearndiffatk: the original model's images of each attacked prompt (default 4)")
    a.add_argument("--attack-strength", type=float, default=None,
                   help="ringabell: eta, how far along the concept vector (default 3, the authors' for nudity; theirs "
                        "for violence 5.5; 0: the plain prompt)")
    a.add_argument("--attack-pairs", default=None, metavar="FILE",
                   help="ringabell: the concept vector's prompt pairs, one 'prompt with the concept<TAB>the same "
                        "prompt without it' a line (needed with --prompt/--prompts; default with --class-prompts: "
                        "the concept digit's prompt paired with each other digit's)")
    a.add_argument("--attack-concept", action="append", default=[], metavar="DIGIT",
                   help="with --class-prompts: the digit whose prompts are attacked (default: the erased digits)")
    e.set_defaults(func=cmd_evaluate)

    x = command("export", "export a checkpoint as a diffusers folder, LoRA weights or one safetensors file",
                "python -m train export --ckpt CKPT --out exported --format diffusers")
    x.add_argument("--ckpt", required=True, help="checkpoint written by `fit`")
    x.add_argument("--out", required=True, help="target folder (diffusers, lora) or .safetensors file")
    x.add_argument("--format", default="diffusers", help="diffusers (folder), lora (peft adapter for the teacher) or safetensors")
    x.add_argument("--force", action="store_true",
                   help="replace an earlier export at --out (anything else, the run folder or the current directory "
                        "is never replaced)")
    x.set_defaults(func=cmd_export)

    b = command("digits-pipeline", "build the text digits pipeline folder and the captioned digits (text demo)",
                "python -m train digits-pipeline --out runs/text_demo")
    b.add_argument("--out", default="runs/text_demo", help="writes <out>/pipeline and <out>/captions")
    b.add_argument("--vae-steps", type=int, default=600, help="training steps of the digits autoencoder")
    b.set_defaults(func=cmd_digits_pipeline)

    g = command("guiders", "list the available guiders and their parameters", "python -m train guiders")
    g.set_defaults(func=cmd_guiders)

    d = command("demo", "the embedded default end to end: train, distil, erase on the digits; print the metrics",
                "python -m train demo --out runs/demo")
    d.add_argument("--out", default="runs/demo", help="output folder")
    d.add_argument("--profile", choices=("quick", "full"), default="quick",
                   help="quick: every stage in about a quarter of an hour on 2 CPU cores; full: the configs' own "
                        "schedules (the README's tables; hours)")
    d.add_argument("--max-steps", type=int, default=None, help="override every stage's training steps (smoke runs)")
    d.add_argument("--stages", nargs="+", default=None, help="run only these stages (default: all, in order)")
    d.add_argument("--num-per-class", type=int, default=None,
                   help="evaluation samples per class (default: 20 quick, 100 full)")
    d.add_argument("--fresh", action="store_true",
                   help="retrain every stage (default: reuse the finished stages of an earlier demo in --out, "
                        "resume an interrupted one)")
    d.set_defaults(func=cmd_demo)
    return p


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

    run_demo(Path(args.out), args.profile, max_steps=args.max_steps, stages=args.stages,
             num_per_class=args.num_per_class, fresh=args.fresh)
