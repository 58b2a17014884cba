"""The commands that sample a checkpoint: `python -m train sample` (a grid and an .npz) and `python -m train evaluate`
(metrics as JSON, with erasure metrics and adversarial prompts), from the flags train.cli's parser defines. Nothing
heavy is imported at module level (the parser imports this module for --help)."""
from __future__ import annotations

import json
import os
from pathlib import Path

def parse_params(items: list[str]) -> dict:
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


def _load(args):
    """The checkpoint's method module, placed on --device with its networks in --dtype (train.runtime.devices), and
    the RequestSets the flags ask for (checked before anything is sampled; the device and dtype before loading)."""
    from train.evaluation.requests import prompt_rows, request_sets
    from train.runtime.checkpoint import load_method
    from train.runtime.devices import place_for_sampling, sampling_device, sampling_dtype

    device = sampling_device(args.device)
    dtype = sampling_dtype(args.dtype, device)
    module = load_method(args.ckpt)
    module.sampling_recipe(getattr(args, "nasa_scale", None), getattr(args, "negtome_scale", None)).resolve(
        getattr(args, "scale", None), args.steps, args.sampler, args.guider, parse_params(args.param), args.eta,
        args.negative is not None)
    sets = request_sets(module, args.classes, prompt_rows(args.prompt, args.prompts, args.prompt_categories,
                                                          args.max_prompts),
                        args.class_prompts, args.num_per_class, args.num_per_prompt, getattr(args, "concepts", None),
                        getattr(args, "concept_prompts", None), file_seeds=args.seed is None)
    if args.negative is not None:
        module.conditioner.parse(args.negative)
    return place_for_sampling(module, device, dtype), sets


def cmd_sample(args) -> None:
    import numpy as np
    import torch

    from train.evaluation.images import save_grid
    from train.evaluation.requests import generate_images, joined, takes_guidance

    module, sets = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for rs in sets for r in rs.requests]
    nrow = args.num_per_class if all(rs.labels is not None for rs in sets) else args.num_per_prompt
    guidance = joined(sets, "guidance") if args.scale is None else None  # a prompt file's own scales
    if guidance is not None and not takes_guidance(module, guidance, args.steps, args.sampler, args.guider,
                                                   parse_params(args.param), args.eta, args.negative is not None,
                                                   args.nasa_scale, args.negtome_scale):
        guidance = None
    images, nfe = generate_images(module, rows, args.scale, args.steps, args.sampler, args.guider, args.seed or 0,
                                  args.negative, args.eta, parse_params(args.param), nasa_scale=args.nasa_scale,
                                  negtome_scale=args.negtome_scale, noise_seeds=joined(sets, "noise_seeds"),
                                  guidance=guidance)
    save_grid(images, out / "grid.png", nrow=nrow)
    labelled = {"labels": torch.cat([rs.labels for rs in sets]).numpy()} if all(rs.labels is not None for rs in sets) else {}
    np.savez(out / "samples.npz", images=images.numpy(), requests=np.array([str(r) for r in rows]),
             nfe_per_sample=nfe, **labelled)
    named = getattr(module.conditioner, "name", None)  # a class model's class names: "2 (triangle)"
    listed = list(dict.fromkeys(f"{r} ({named(r)})" if named and isinstance(r, int) and named(r) != str(r) else str(r)
                                for r in rows))
    (out / "requests.txt").write_text("".join(f"row {i}: {r}\n" for i, r in enumerate(listed)), encoding="utf-8")
    print(f"wrote {out / 'grid.png'} (one row per request, listed in {out / 'requests.txt'}) and {out / 'samples.npz'} "
          f"({len(rows)} samples, {nfe:g} network evaluations each)")


def cmd_evaluate(args) -> None:
    from train.evaluation import format_table
    from train.evaluation.evaluate import feature_network_report
    from train.evaluation.requests import check_set, evaluate_set

    attack = _attack_settings(args)
    _check_erasure_flags(args)
    folder = _image_folder(args)
    module, sets = _load(args)
    if attack is not None:
        from train.evaluation.attack import check_attack

        check_attack(module, attack, sets, args.attack_concept)
    datas = [d for d in (check_set(module, rs) for rs in sets) if d is not None]  # shapes checked before sampling
    networks = [feature_network_report(d) for d in dict.fromkeys(datas)]  # trained (once, cached) before sampling
    if folder is not None:
        folder.claim()  # before anything is sampled
    rows, missing, reports = [], [], []
    for rs in sets:
        more, missing = evaluate_set(module, rs, args.scales or [None], args.steps, args.sampler, args.guider,
                                     parse_params(args.param), args.seed or 0, args.negative, args.eta,
                                     args.fid_weights, args.fid_reference, args.clip_model, nudenet=args.nudenet,
                                     nudity_threshold=args.nudity_threshold, nudity_classes=args.nudity_classes,
                                     concept_template=args.concept_template, batch_size=args.batch_size,
                                     save_images=folder)
        rows += more
        if attack is not None:
            reports.append(_attack_set(module, rs, attack, args, more, len(reports)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps({"checkpoint": str(args.ckpt), "rows": rows, "not_computed": missing,
                               "feature_network": networks, **({"attack": reports} if attack else {})}, indent=2))
    os.replace(tmp, out)
    columns = ["requests", "guider", "w", "sampler", "steps", "nfe_per_sample", "accuracy", "fd", "precision", "recall",
               "fid", "clip_score", "nudity_rate", "concept_accuracy", "erased_concept_accuracy",
               "other_concept_accuracy", "erased_rate", "erased_rate_attacked", "erased_rate_nearest_words",
               "other_accuracy", "other_fd"]
    print(format_table(rows, [c for c in columns if any(r.get(c) is not None for r in rows)]))
    for net in networks:
        accuracy = "-" if net["heldout_accuracy"] is None else f"{net['heldout_accuracy']:.4f}"
        print(f"feature network (FD, accuracy, precision/recall): trained on {net['data']}; held-out accuracy "
              f"{accuracy} on its {net['heldout_images']} held-out images")
    for line in missing:
        print(f"not computed: {line}")
    if folder is not None:
        print(f"wrote {folder.written} images to {folder.root} (listed in {folder.root / 'images.csv'})")
    print(f"wrote {out}")


def _image_folder(args):
    """--save-images as a train.evaluation.saved_images.ImageFolder (None without it), --batch-size checked."""
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.save_images is None:
        if args.overwrite_images:
            raise ValueError("--overwrite-images replaces an earlier --save-images folder: add --save-images DIR")
        return None
    from train.evaluation.saved_images import ImageFolder

    return ImageFolder(args.save_images, args.overwrite_images)


def _check_erasure_flags(args) -> None:
    """The erasure metrics' flags make sense together (before anything is loaded or sampled): their settings need
    their weights, --concepts needs --clip-model, a given --nudenet file is a NudeNet detector and a given
    --clip-model folder holds a CLIP model."""
    if args.nudenet is None and (args.nudity_threshold is not None or args.nudity_classes):
        raise ValueError("--nudity-threshold and --nudity-classes configure the nudity rate: add --nudenet PATH (a "
                         "NudeNet v3 detector ONNX file)")
    if not args.concepts and (args.concept_template is not None or args.concept_prompts is not None):
        raise ValueError("--concept-template and --concept-prompts need the concepts to classify: add --concepts NAME ...")
    if args.concepts and args.clip_model is None:
        raise ValueError("--concepts are told apart by zero-shot CLIP: add --clip-model FOLDER (a local transformers "
                         "CLIPModel and its CLIPProcessor)")
    if args.nudenet is not None:
        from train.evaluation.nudity import NudeDetector, check_classes

        NudeDetector(args.nudenet)  # missing, corrupt or not NudeNet's: one line now, not after sampling
        if args.nudity_classes:
            check_classes(args.nudity_classes)
    if args.concept_template is not None:
        from train.evaluation.zero_shot import concept_texts

        concept_texts(args.concepts, args.concept_template)
    if args.clip_model is not None:
        from train.evaluation.clip import load_clip

        load_clip(args.clip_model)  # a folder without a CLIP model: one line now, not after sampling


def _attack_settings(args):
    """--attack and its flags as train.evaluation.attack.AttackSettings (None without --attack); an --attack-* flag
    without --attack is an error."""
    flags = {"steps": args.attack_steps, "tokens": args.attack_tokens, "lr": args.attack_lr, "images": args.attack_images,
             "strength": args.attack_strength, "pairs": args.attack_pairs}
    if args.attack is None:
        given = [f"--attack-{k}" for k, v in flags.items() if v is not None] + (["--attack-concept"] if args.attack_concept
                                                                                 else [])
        if given:
            which = "ringabell" if args.attack_strength is not None or args.attack_pairs else "unlearndiffatk"
            raise ValueError(f"{', '.join(given)} configure an attack: add --attack {which}")
        return None
    from train.evaluation.attack import AttackSettings

    return AttackSettings(args.attack, seed=args.seed or 0, **{k: v for k, v in flags.items() if v is not None})


def _attack_set(module, rs, settings, args, plain_rows: list[dict], index: int) -> dict:
    """Attack the prompts of the index-th RequestSet, add the erased rates before and after to its rows (`plain_rows`,
    one per scale, updated in place), write the attacked samples' grid beside --out (<stem>_attack.png, then
    <stem>_attack_1.png, ...); returns the attack's report."""
    from train.evaluation.attack import GRID_PER_PROMPT, evaluate_attack
    from train.evaluation.digits_text import erasure_columns
    from train.evaluation.images import save_grid

    rows, report, images = evaluate_attack(module, rs, settings, args.attack_concept, args.scales or [None], args.steps,
                                           args.sampler, args.guider, parse_params(args.param), args.seed or 0,
                                           args.negative, args.eta)
    for plain, attacked in zip(plain_rows, rows):
        before = erasure_columns(plain, report["classes"]).get("erased_rate") if report["classes"] else None
        plain.update({"erased_rate": before, **{k: v for k, v in attacked.items() if k.startswith("erased_rate_")},
                      "attack": attacked["attack"]})
    out = Path(args.out)
    grid = out.with_name(f"{out.stem}_attack{f'_{index}' if index else ''}.png")
    report["grid"] = str(save_grid(images, grid, nrow=GRID_PER_PROMPT)) if len(images) else None
    report["requests"] = rs.name
    return report
