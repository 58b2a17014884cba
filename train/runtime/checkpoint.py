"""Reading guidedistill checkpoints safely (weights_only) and rebuilding the method they hold."""
from __future__ import annotations

import json
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from guidance.denoiser import Denoiser
from train.runtime.config import ConfigError, instantiate
from train.runtime.frozen import FROZEN_KEY, FrozenSourceError, fill_frozen
from train.runtime.strategy import convert_zero_checkpoint, is_zero_checkpoint


CHECKPOINT_KEY = "guidedistill"
CHECKPOINT_FORMAT = 1


def plain_config(obj: Any) -> Any:
    """JSON-able copy of a config (dicts, lists, numbers, strings; dataclasses as dicts); anything else becomes None.

    Lightning stores hyper-parameters with the checkpoint; keeping them plain is what lets checkpoints
    load with `torch.load(weights_only=True)`."""
    if isinstance(obj, dict):
        return {str(k): plain_config(v) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type):  # an argument group (train.methods.onestep_config)
        return {f.name: plain_config(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return None


def is_rebuildable(hparams: dict) -> bool:
    """True when hyper-parameters are a full config (built by the CLI or `train.runtime.config.instantiate`)."""
    groups = lambda o: plain_config(o) if is_dataclass(o) else None  # noqa: E731
    return "_class_path" in hparams and json.dumps(plain_config(hparams)) == json.dumps(hparams, default=groups)


# Where classes lived before train/ was split into methods/, runtime/ and evaluation/ (checkpoints written before
# then record these paths in their config)
LEGACY_CLASS_PATHS = {
    "train.teacher.TeacherPretraining": "train.methods.teacher.TeacherPretraining",
    "train.guidance_distillation.GuidanceDistillation": "train.methods.guidance_distillation.GuidanceDistillation",
    "train.progressive.ProgressiveDistillation": "train.methods.progressive.ProgressiveDistillation",
    "train.onestep.OneStepDistillation": "train.methods.onestep.OneStepDistillation",
    "train.erasure.ConceptErasure": "train.methods.erasure.ConceptErasure",
    "train.text_erasure.TextConceptErasure": "train.methods.erasure.ConceptErasure",
    "train.methods.text_erasure.TextConceptErasure": "train.methods.erasure.ConceptErasure",  # erasure unified
}

# TextConceptErasure's defaults where ConceptErasure's differ (its concept spec, anchors and every other argument are
# ConceptErasure's too); a config that recorded them all is unchanged
TEXT_ERASURE_DEFAULTS = {"uncond_weight": 0.0, "batch_size": 1, "trajectory_scale": 3.0, "bank_size": 8, "lr": 1e-5,
                         "val_scale": 3.0, "val_samples": 0}


# OneStepDistillation's flat arguments before its argument groups (train.methods.onestep_config): name -> (group, field)
ONESTEP_FLAT_ARGUMENTS = {
    "objective": ("objective", "kind"), "divergence": ("objective", "divergence"),
    "ratio_time_bins": ("objective", "ratio_time_bins"), "dmd_t_range": ("objective", "t_range"),
    "ca_t_range": ("objective", "ca_t_range"), "dm_t_range": ("objective", "dm_t_range"),
    "ca_weight": ("objective", "ca_weight"), "dm_weight": ("objective", "dm_weight"),
    "fake_score": ("fake_score", "mode"), "lora_rank": ("fake_score", "rank"), "lora_alpha": ("fake_score", "alpha"),
    "lora_targets": ("fake_score", "targets"), "fake_updates": ("fake_score", "updates"),
    "fake_p_uncond": ("fake_score", "p_uncond"), "lr_fake": ("fake_score", "lr"),
    "gan_weight": ("discriminator", "gan_weight"), "discriminator_features": ("discriminator", "features"),
    "discriminator_layer": ("discriminator", "layer"), "discriminator_hidden": ("discriminator", "hidden"),
    "disc_t_range": ("discriminator", "t_range"), "lr_disc": ("discriminator", "lr"),
    "generator_steps": ("generator", "steps"), "generator_times": ("generator", "times"), "lr": ("generator", "lr"),
    "betas": ("optimizer", "betas"), "weight_decay": ("optimizer", "weight_decay"),
    "warmup_steps": ("optimizer", "warmup_steps"), "grad_clip": ("optimizer", "grad_clip"),
    "erase_concepts": ("forget", "concepts"), "erase_eta": ("forget", "eta"), "erase_targets": ("forget", "targets"),
}


def upgrade_config(config: Any) -> Any:
    """A stored config with class paths of earlier layouts replaced by today's (LEGACY_CLASS_PATHS), recursively, and
    a OneStepDistillation config of flat arguments moved into its argument groups (group_onestep_arguments)."""
    if isinstance(config, dict):
        if str(config.get("_class_path")).endswith("text_erasure.TextConceptErasure"):
            config = {**TEXT_ERASURE_DEFAULTS, **config}
        config = {k: (LEGACY_CLASS_PATHS.get(v, v) if k in ("_class_path", "class_path") and isinstance(v, str)
                      else upgrade_config(v)) for k, v in config.items()}
        if config.get("_class_path") == "train.methods.onestep.OneStepDistillation":
            config = group_onestep_arguments(config)
        return config
    if isinstance(config, list):
        return [upgrade_config(v) for v in config]
    return config


def group_onestep_arguments(config: dict) -> dict:
    """A OneStepDistillation config with its flat arguments (ONESTEP_FLAT_ARGUMENTS) in their groups; the erase_*
    arguments become `forget`, null when erase_concepts was. A grouped config comes back unchanged."""
    flat = {k: v for k, v in config.items() if k in ONESTEP_FLAT_ARGUMENTS and not isinstance(v, dict)}
    if not flat:
        return config
    out = {k: v for k, v in config.items() if k not in flat}
    for key, value in flat.items():
        group, name = ONESTEP_FLAT_ARGUMENTS[key]
        out.setdefault(group, {})[name] = value
    if "forget" in out and out["forget"].get("concepts") is None:
        out["forget"] = None
    return out


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says what to do."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) with one-line errors for missing, corrupt and foreign files.

    A checkpoint directory of the multi-engine DeepSpeed strategy (ZeRO shards, train.runtime.strategy) is converted to
    the plain checkpoint a single-process run would have written (without optimizer state)."""
    path = Path(path)
    if is_pipeline_folder(path):
        return {CHECKPOINT_KEY: {"format": 1, "method": "teacher", "config": pipeline_teacher_config(path)},
                "state_dict": None}
    if is_zero_checkpoint(path):
        try:
            ckpt = convert_zero_checkpoint(path)
        except Exception as e:
            raise CheckpointError(f"ZeRO checkpoint {str(path)!r} cannot be converted (missing or corrupt shards?): "
                                  f"{_first_line(e)}") from None
    elif path.is_dir():
        inside = sorted(path.glob("checkpoints/last.ckpt")) + sorted(path.glob("*.ckpt"))
        hint = f"pass {inside[0]}" if inside else "pass the .ckpt file inside it (e.g. <run>/checkpoints/last.ckpt)"
        raise CheckpointError(f"{str(path)!r} is a folder, not a checkpoint; {hint}")
    elif not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass the .ckpt written by `python -m train fit` "
                              f"(e.g. runs/<name>/checkpoints/last.ckpt)")
    elif path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes: its writing was cut off); use an earlier "
                              f"checkpoint of the run")
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure to unpickle safely means the file is unusable as a checkpoint
            why = _first_line(e)
            if "weights_only" in why or "Weights only" in why:  # never pass on the advice to unpickle it unsafely
                why = "it is not a torch file of tensors and plain values (checkpoints load with weights_only=True)"
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be read (corrupt, truncated, or not a "
                                  f"guidedistill checkpoint): {why}") from None
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not a guidedistill checkpoint (no {CHECKPOINT_KEY!r} entry); "
                              f"pass a checkpoint written by `python -m train fit`")
    ckpt[CHECKPOINT_KEY]["config"] = upgrade_config(ckpt[CHECKPOINT_KEY].get("config"))
    return ckpt


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    """True for a diffusers pipeline folder (model_index.json), which methods take as their teacher directly."""
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


ADAPTERS = {"clip": "models.text_unet.TextConditionalUNet", "sdxl": "models.text_unet.TextConditionalUNet",
            "sd3": "models.text_transformer.SD3Transformer", "flux": "models.text_transformer.FluxTransformer"}


def pipeline_teacher_config(path: str | os.PathLike) -> dict:
    """The config (as a teacher checkpoint records it) of a TeacherPretraining module over a pipeline folder: the
    family's network adapter loaded from the folder, the schedule and parameterisation of its scheduler config
    (models.pretrained.schedule_from_pretrained; flow models train t logit-normal, Esser et al. 2024 sec. 3.1;
    Flux's dynamic shift for its default latent size), no EMA. Distillation and erasure configs name such a
    folder where they name a teacher checkpoint, so a text-to-image job has one `pretrained:` path."""
    from guidance.schedules import RectifiedFlow, VPCosine, VPLinear
    from models.pretrained import pipeline_family, schedule_from_pretrained

    path = str(Path(path).expanduser().absolute())
    family = pipeline_family(path)
    seq = None
    if family == "flux":
        from models.text_transformer import default_latent_size

        seq = (default_latent_size(Path(path)) // 2) ** 2  # packed 2x2 tokens
    sched, param = schedule_from_pretrained(path, image_seq_len=seq)
    if isinstance(sched, VPLinear):
        schedule = {"class_path": "guidance.schedules.VPLinear", "init_args": {
            "num_steps": sched.num_steps, "beta_start": sched.beta_start, "beta_end": sched.beta_end, "scaled": sched.scaled}}
    elif isinstance(sched, VPCosine):
        schedule = {"class_path": "guidance.schedules.VPCosine", "init_args": {"num_steps": sched.num_steps}}
    elif isinstance(sched, RectifiedFlow):
        schedule = {"class_path": "guidance.schedules.RectifiedFlow",
                    "init_args": {"shift": float(sched.shift), "logit_normal": True}}
    else:
        raise CheckpointError(f"{path}: no config for its schedule {type(sched).__name__}")
    return {"_class_path": "train.methods.teacher.TeacherPretraining",
            "net": {"class_path": ADAPTERS[family], "init_args": {"pretrained": path}},
            "schedule": schedule, "parameterization": param, "ema_decay": 0.0}


PATH_KEYS = ("pretrained", "teacher", "model", "student", "weak_teacher", "images")  # config keys that name files


def resolve_relative_paths(cfg: Any, bases: list[Path]) -> Any:
    """`cfg` with each relative path under PATH_KEYS that does not exist from the current directory but does from one
    of `bases` (the directory the run was trained in, then the checkpoint's ancestors) made absolute there, so a
    checkpoint whose config says `pretrained: runs/demo/text/pipeline` loads from any directory. Other values (and
    paths that exist here or nowhere) are left as they are."""
    if isinstance(cfg, dict):
        out = {}
        for key, value in cfg.items():
            if key in PATH_KEYS and isinstance(value, str) and value and not os.path.isabs(value) \
                    and not os.path.exists(value):
                found = next((base / value for base in bases if (base / value).exists()), None)
                out[key] = str(found) if found is not None else value
            else:
                out[key] = resolve_relative_paths(value, bases)
        return out
    if isinstance(cfg, list):
        return [resolve_relative_paths(v, bases) for v in cfg]
    return cfg


def load_method(path: str | os.PathLike, expect: str | None = None, ckpt: dict | None = None) -> Any:
    """Rebuild the method module stored in a checkpoint and load its weights (eval mode, CPU).

    The frozen networks a checkpoint left out (train.runtime.frozen) are those the rebuilt module read from their
    paths, once their fingerprints match the recorded ones; a checkpoint that holds them (written before, or with
    self-contained checkpoints) loads its own copies.

    expect: a method name ('teacher', ...) the caller needs; another kind is refused with a message.
    ckpt: `read_checkpoint(path)` when the caller has read it already (it is not read again).
    A diffusers pipeline folder reads as a teacher checkpoint (pipeline_teacher_config)."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    meta = ckpt[CHECKPOINT_KEY]
    if expect is not None and meta.get("method") != expect:
        raise CheckpointError(f"{str(path)!r} holds a {meta.get('method')!r} checkpoint; this command needs a {expect!r} one")
    cfg = meta.get("config")
    if not cfg:
        raise CheckpointError(f"{str(path)!r} was written by a module built in Python without a config, so it cannot be "
                              f"rebuilt; build methods with train.runtime.config.instantiate or the CLI")
    cfg = {k: v for k, v in cfg.items() if k != "_instantiator"}
    class_path = cfg.pop("_class_path")
    bases = [Path(meta["cwd"])] if meta.get("cwd") else []
    bases += list(Path(os.path.abspath(path)).parents)  # older checkpoints: the run folder's ancestors
    cfg = resolve_relative_paths(cfg, bases)
    try:
        module = instantiate({"class_path": class_path, "init_args": cfg})
    except (ConfigError, ValueError) as e:
        reason = str(e).strip().splitlines()
        hint = next((line.strip(" -") for line in reason if "does not exist" in line), reason[-1] if reason else "")
        raise CheckpointError(f"{str(path)!r}: its stored config no longer builds: {hint}"
                              + (f" (its relative paths are read from {meta['cwd']}, where it was trained)"
                                 if meta.get("cwd") else "")) from None
    module.data_reference = meta.get("data")  # the labelled data it was trained on (train.methods.data_record)
    if ckpt["state_dict"] is None:  # a pipeline folder: the network loaded its own weights
        return module.eval()
    try:  # frozen networks left out of the checkpoint: the rebuilt module read them (train.runtime.frozen)
        fill_frozen(module, getattr(module, "frozen_networks", []), meta.get(FROZEN_KEY) or [], ckpt["state_dict"])
    except FrozenSourceError as e:
        raise CheckpointError(f"{str(path)!r}: {e}") from None
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r}: weights do not match the network its config builds "
                              f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})")
    module.eval()
    return module


def check_resume(path: str | os.PathLike, requested: dict, resumed: dict) -> None:
    """Refuse to resume from `path` when the config asks for another model than the checkpoint holds.

    LightningCLI builds a resumed run's model from the checkpoint's hyper-parameters (`resumed`), replacing the
    config's model section (`requested`, both {class_path, init_args}) without a word; a different method, or any
    setting the config gives (not null) that the checkpoint overrides, is a CheckpointError saying what to do."""
    requested, resumed = (json.loads(json.dumps(c, default=str)) for c in (requested, resumed))  # tuples -> lists
    run_config = Path(path).resolve().parent.parent / "config.yaml"
    fix = (f"resume with the config it was trained with ({run_config if run_config.is_file() else 'its config.yaml'}) "
           f"or drop --ckpt_path to start a new run")
    if requested.get("class_path") != resumed.get("class_path"):
        raise CheckpointError(f"{str(path)!r} holds a {resumed.get('class_path')} checkpoint but the config trains "
                              f"{requested.get('class_path')}; {fix}")
    diffs = [f"{key}: {mine} in the config, {theirs} in the checkpoint"
             for key, mine, theirs in _differences(requested.get("init_args") or {}, resumed.get("init_args") or {})]
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise CheckpointError(f"{str(path)!r} was trained with other model settings than the config gives "
                              f"({'; '.join(diffs[:3])}{more}); a resumed run continues the checkpoint's model, so {fix}")


def _differences(mine: dict, theirs: dict, prefix: str = ""):
    """(dotted key, mine, theirs) for every setting of `mine` that is not null and differs in `theirs`."""
    for key, value in mine.items():
        other = theirs.get(key)
        if value is None or key not in theirs:
            continue
        if isinstance(value, dict) and isinstance(other, dict):
            yield from _differences(value, other, f"{prefix}{key}.")
        elif value != other:
            yield f"{prefix}{key}", value, other


def load_teacher(path: str | None, config: dict | None) -> tuple[Denoiser, dict | None, str | None]:
    """The frozen sampling Denoiser of a teacher checkpoint or pipeline folder (eval, requires_grad off), its stored
    config, and why it was not read from `path` (None when it was).

    `path` is read whenever it exists. When it does not, or cannot be loaded, and `config` (a teacher config recorded
    by an earlier run) is given, the teacher is rebuilt from the config with untrained weights: the caller's own
    checkpoint then supplies them (a self-contained one, or one written before frozen networks were left out of
    checkpoints), and a checkpoint that left them out is refused (train.runtime.frozen)."""
    unread = "does not exist"
    if path and (Path(path).is_file() or is_pipeline_folder(path)):
        try:
            ckpt = read_checkpoint(path)
            den = load_method(path, expect="teacher", ckpt=ckpt).sampling_denoiser()
            return den.requires_grad_(False).eval(), ckpt[CHECKPOINT_KEY].get("config"), None
        except CheckpointError as e:
            if not config:
                raise
            unread = f"cannot be loaded ({_first_line(e)})"
    if not config:
        raise FileNotFoundError(f"teacher checkpoint {path!r} does not exist; train one with `python -m train fit "
                                f"--config configs/digits/teacher.yaml` and pass its last.ckpt (or a diffusers pipeline "
                                f"folder) as --model.init_args.teacher")
    cfg = {k: v for k, v in config.items() if k not in ("_class_path", "_instantiator")}
    den = instantiate({"class_path": config["_class_path"], "init_args": cfg}).sampling_denoiser()
    return den.requires_grad_(False).eval(), config, unread
