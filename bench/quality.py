"""Quality on the digits default (or any labelled data: each model is judged by the feature network of the data it
was trained on): FD, class accuracy, precision/recall, erased-class rate and network evaluations per sample for the
teacher, the guidance-distilled students, the one-step students and the erased models, read from trained
checkpoints (nothing is trained here).

Checkpoints are looked up under `--runs DIR` in the layout `python -m train demo --out DIR` writes
(`DIR/<stage>/checkpoints/last.ckpt`; progressive rounds `DIR/progressive/checkpoints/round_<k>_<n>steps.ckpt`)
and can be given one by one with `--ckpt ROW=PATH` (repeatable; ROW is a row name below). A row whose
checkpoint is absent stays in the table, marked absent, with the path it looked for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.report import Table

# row -> (group, path under --runs, sampler steps; None: the model's own). Teacher and erased models sample
# with CFG (2 evaluations per step), students with one evaluation per step, one-step generators once.
ROWS: dict[str, tuple[str, str, int | None]] = {
    "teacher": ("teacher (CFG)", "teacher/checkpoints/last.ckpt", 50),
    "guidance_distill": ("guidance-distilled", "guidance_distill/checkpoints/last.ckpt", 50),
    "progressive_8": ("guidance-distilled", "progressive/checkpoints/round_*_8steps.ckpt", 8),
    "progressive_4": ("guidance-distilled", "progressive/checkpoints/round_*_4steps.ckpt", 4),
    "progressive_2": ("guidance-distilled", "progressive/checkpoints/round_*_2steps.ckpt", 2),
    "progressive_1": ("guidance-distilled", "progressive/checkpoints/round_*_1steps.ckpt", 1),
    "lcm_4": ("consistency", "lcm/checkpoints/last.ckpt", 4),
    "lcm_1": ("consistency", "lcm/checkpoints/last.ckpt", 1),
    "dmd": ("one-step", "dmd/checkpoints/last.ckpt", None),
    "dmd_pgsb": ("one-step", "dmd_pgsb/checkpoints/last.ckpt", None),
    "fdistill_js": ("one-step", "fdistill_js/checkpoints/last.ckpt", None),
    "fdistill_js_pgsb": ("one-step", "fdistill_js_pgsb/checkpoints/last.ckpt", None),
    "fdistill_fkl": ("one-step", "fdistill_fkl/checkpoints/last.ckpt", None),
    "sid": ("one-step", "sid/checkpoints/last.ckpt", None),
    "erase_one": ("erased", "erase_one/checkpoints/last.ckpt", 50),
    "erase_two": ("erased", "erase_two/checkpoints/last.ckpt", 50),
    "erase_toward": ("erased", "erase_toward/checkpoints/last.ckpt", 50),
}
COLUMNS = [("row", "row"), ("model", "model"), ("steps", "steps"), ("nfe", "evaluations / sample"),
           ("fd", "FD"), ("accuracy", "class accuracy"), ("precision", "precision"), ("recall", "recall"),
           ("erased_rate", "erased-class rate"), ("checkpoint", "checkpoint")]


def parse_ckpts(items: list[str]) -> dict[str, str]:
    """`ROW=PATH` flags -> {row: path}, refusing unknown rows with the list of known ones."""
    out = {}
    for item in items or []:
        row, sep, path = item.partition("=")
        if not sep or row not in ROWS:
            raise ValueError(f"--ckpt takes ROW=PATH with ROW one of {', '.join(ROWS)}; got {item!r}")
        out[row] = path
    return out


def locate(row: str, runs: Path | None, given: dict[str, str]) -> tuple[Path | None, str]:
    """(checkpoint or None, where it was looked for)."""
    if row in given:
        path = Path(given[row])
        return (path if path.exists() else None), str(path)
    if runs is None:
        return None, f"--ckpt {row}=PATH"
    pattern = ROWS[row][1]
    hits = sorted(runs.glob(pattern))
    return (hits[-1] if hits else None), str(runs / pattern)


def describe(module) -> str:
    """What a checkpoint holds, in the table's words (read from the rebuilt module)."""
    name = module.method_name
    if name == "teacher":
        return f"teacher, {module.denoiser.parameterization}-prediction, CFG"
    if name == "guidance_distillation":
        return f"w-conditioned student of {module.distilled_guider}"
    if name == "progressive_distillation":
        n = module.recipe().default_steps
        return f"progressive w-student, {n} step{'s' if n != 1 else ''}"
    if name == "consistency_distillation":
        return f"LCM, w {'input' if module.w_input else 'baked in'}, {module.solver_steps}-point solver grid"
    if name == "onestep":
        kind = module.objective.kind
        first = (f"SiD alpha {module.objective.alpha:g}" if kind == "sid" else
                 "DMD" if module.divergence == "reverse_kl" else f"f-distill {module.divergence}")
        bits = [first,
                f"{module.fake_score.mode} fake score"]
        bits += [f"GAN {module.gan_weight:g}"] if module.gan_weight else []
        bits += [f"PG-SB w~U[{module.pg_sb_range[0]:g}, {module.pg_sb_range[1]:g}]"] if module.pg_sb_range else []
        return ", ".join(bits)
    if name == "erasure":
        alts = [a for a in module.spec.alternatives if a is not None]
        how = f"toward {alts}" if alts else f"ESD eta {module.eta:g}"
        return f"erased {module.erased_requests()}, {how}, {module.hparams.get('params') or 'esd-x'}"
    return name


@torch.no_grad()
def evaluate(module, steps: int | None, scale: float, num_per_class: int, seed: int = 0) -> dict[str, Any]:
    """FD, accuracy, precision/recall over the classes a model keeps, and for erased models the erased-class
    rate (the fraction of samples requested as an erased class that the feature network assigns to it), in the
    feature space of the network trained on the model's own labelled data (train.evaluation.labelled.data_of)."""
    from train.evaluation.classifier import load_feature_network
    from train.evaluation.digits_text import erased_digits
    from train.evaluation.evaluate import classify, reference_features
    from train.evaluation.labelled import check_generates, data_of
    from train.evaluation.metrics import frechet_distance, precision_recall

    data = data_of(module)
    check_generates(module, data)  # before anything is sampled
    labels = torch.tensor(module.conditioner.enumerate()).repeat_interleave(num_per_class)
    if module.recipe().name == "generator":  # its guidance is distilled in: it takes no scale
        scale = None
    images, nfe = module.generate(labels, scale, steps, seed=seed)
    steps = module.recipe().resolve(scale, steps).steps
    clf = load_feature_network(data)
    feats, logits = classify(clf, images)
    erased = torch.tensor(erased_digits(module), dtype=torch.long)
    kept = ~torch.isin(labels, erased)
    ref = reference_features(clf, "validation", data)
    if len(erased):  # references of the kept classes only
        real, real_labels = data.split_tensors("validation")
        ref = classify(clf, real[~torch.isin(real_labels, erased)])[0]
    pred = logits.argmax(1)
    precision, recall = precision_recall(ref, feats[kept])
    return {"steps": steps, "nfe": nfe, "fd": frechet_distance(feats[kept], ref),
            "accuracy": (pred[kept] == labels[kept]).double().mean().item(), "precision": precision, "recall": recall,
            "erased_rate": (pred[~kept] == labels[~kept]).double().mean().item() if len(erased) else None,
            "samples": len(labels), "data": data.name}


def run(runs: Path | None, given: dict[str, str], scale: float, num_per_class: int, log=print) -> list[Table]:
    from train.runtime.checkpoint import load_method

    rows = []
    for row, (group, _, steps) in ROWS.items():
        path, where = locate(row, runs, given)
        if path is None:
            rows.append({"row": row, "group": group, "model": "absent", "checkpoint": f"absent: {where}",
                         "status": "absent"})
            continue
        log(f"[bench] quality: {row} ({path})")
        try:
            module = load_method(path)
            result = evaluate(module, steps, scale, num_per_class)
        except Exception as e:  # an unreadable or foreign checkpoint: say so in its row, go on with the others
            rows.append({"row": row, "group": group, "model": f"error: {str(e).splitlines()[0][:120]}",
                         "checkpoint": str(path), "status": "error"})
            continue
        rows.append({"row": row, "group": group, "model": describe(module), "checkpoint": str(path),
                     "status": "ok", **result})
    found = sum(r["status"] == "ok" for r in rows)
    datas = sorted({r["data"] for r in rows if r.get("data")}) or ["the embedded digits"]
    notes = [f"CFG scale w = {scale:g} (D_u + w (D_c - D_u)) for every guided model and every w-student; "
             f"{num_per_class} samples per class, DDIM from seed 0; FD, precision and recall in the feature space of "
             f"the network trained on each model's data ({'; '.join(datas)}) against that data's held-out images",
             "erased models: FD, accuracy, precision and recall over the classes they keep (references of those "
             "classes only); erased-class rate: the fraction of samples requested as an erased class that the "
             "classifier still assigns to it",
             f"{found} of {len(rows)} checkpoints found; give the others with --runs DIR (the layout of "
             "`python -m train demo --out DIR`) or --ckpt ROW=PATH"]
    title = "the digits default" if datas == ["the embedded digits (1x8x8, 10 classes)"] else "the models' data"
    return [Table(f"Quality on {title} (w = {scale:g}, {num_per_class} samples per class and model)",
                  COLUMNS, rows, notes)]
