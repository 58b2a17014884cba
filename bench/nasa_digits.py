"""How often a negated digit still appears, with and without NASA, on the text digits (the demo's text stages).

Every digit is prompted ("a handwritten {word}") with the negative prompt "a handwritten {negated word}" (or
--negative-template); the digits
classifier judges the samples. `negated_rate`: how often the negated digit's own prompts still give that digit;
`other_accuracy`: class accuracy on the other nine digits (what the negative must leave alone). Models: the one-step DMD
generator and the w-input student (at the demo's w and steps), each without a negative (alpha none: a
one-evaluation model cannot take one otherwise) and with NASA (SNOOPI, arXiv 2412.02687) at each alpha; the teacher
with CFG and the negative prompt as the multi-step reference.

    python -m bench.nasa_digits --demo runs/demo --alphas 0.5 1 2 --negated 7 --num-per-class 20
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from train.evaluation.digits_text import DIGIT_WORDS, EVAL_TEMPLATE, caption, class_prompts, to_digits


def judge(module, negated: int, num_per_class: int, seed: int, **generate) -> dict:
    """negated_rate, other_accuracy and evaluations per sample of `module.generate(**generate)` on every digit."""
    from train.evaluation.classifier import load_digits_classifier
    from train.evaluation.evaluate import classify

    prompts, labels = class_prompts(EVAL_TEMPLATE, num_per_class)
    samples, nfe = module.generate(prompts, seed=seed, **generate)
    predicted = classify(load_digits_classifier(), to_digits(module.samples_to_images(samples)))[1].argmax(1)
    hit = predicted == labels
    neg = labels == negated
    return {"negated_rate": hit[neg].float().mean().item(), "other_accuracy": hit[~neg].float().mean().item(),
            "nfe": nfe}


def table(demo: Path, alphas: list[float], negated: int, num_per_class: int, seed: int, scale: float,
          steps: int, negative_template: str = EVAL_TEMPLATE) -> list[dict]:
    from train.runtime.checkpoint import load_method

    negative = caption(negative_template, negated)
    rows = []
    ckpt = lambda stage: demo / "text" / stage / "checkpoints" / "last.ckpt"  # noqa: E731
    teacher = load_method(ckpt("teacher"))
    for neg in (None, negative):
        rows.append({"model": "teacher (CFG)", "negative": neg or "-", "alpha": "-",
                     **judge(teacher, negated, num_per_class, seed, scale=scale, steps=steps, negative=neg)})
    for stage, settings in (("dmd", {}), ("guidance_distill", {"scale": scale, "steps": steps})):
        module = load_method(ckpt(stage))
        rows.append({"model": stage, "negative": "-", "alpha": "-", **judge(module, negated, num_per_class, seed,
                                                                            **settings)})
        for alpha in alphas:
            rows.append({"model": stage, "negative": negative, "alpha": alpha,
                         **judge(module, negated, num_per_class, seed, negative=negative, nasa_scale=alpha,
                                 **settings)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.nasa_digits", description=__doc__.split("\n")[0])
    p.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a demo folder with the text stages run")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="NASA scales")
    p.add_argument("--negated", type=int, default=7, choices=range(10), help="the digit in the negative prompt")
    p.add_argument("--negative-template", default=EVAL_TEMPLATE, help='the negative prompt, e.g. "{word}" alone')
    p.add_argument("--num-per-class", type=int, default=20)
    p.add_argument("--scale", type=float, default=2.0, help="w of the teacher and the w-input student")
    p.add_argument("--steps", type=int, default=8, help="sampler steps of the teacher and the w-input student")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = table(args.demo, args.alphas, args.negated, args.num_per_class, args.seed, args.scale, args.steps,
                 args.negative_template)
    print(f"negative prompt: {caption(args.negative_template, args.negated)!r} ({DIGIT_WORDS[args.negated]}), "
          f"{args.num_per_class} samples per digit, seed {args.seed}")
    print("| model | negative | NASA alpha | negated_rate | other_accuracy | NFE |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['negative']} | {r['alpha']} | {r['negated_rate']:.2f} | {r['other_accuracy']:.2f} "
              f"| {r['nfe']:g} |")


if __name__ == "__main__":
    main()
