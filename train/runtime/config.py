"""Building methods and data modules from YAML/dict configs, with messages that say what to fix."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message says what to change."""


def read_yaml(path: str | Path) -> dict:
    """Parse a YAML config file into a dict, with one-line errors for missing or malformed files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file such as configs/digits/teacher.yaml")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping (model:, data:, trainer:), not {type(cfg).__name__}")
    return cfg


def instantiate(config: dict, base: type | None = None) -> Any:
    """Build an object from {"class_path": ..., "init_args": {...}} (nested class_paths included).

    Method modules built this way record the config as their hyper-parameters (as LightningCLI does),
    so their checkpoints can be rebuilt by `sample`, `evaluate` and `export` without any pickling.
    """
    import lightning as L
    from jsonargparse import ArgumentParser
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    base = base or L.LightningModule
    if not isinstance(config, dict) or "class_path" not in config:
        raise ConfigError("a component config needs 'class_path' (e.g. train.methods.teacher.TeacherPretraining) and 'init_args'")
    hparams = {"_class_path": config["class_path"], **(config.get("init_args") or {})}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "obj", fail_untyped=False)
    try:
        cfg = parser.parse_object({"obj": {"class_path": config["class_path"], "init_args": config.get("init_args") or {}}})
    except Exception as e:  # jsonargparse reports unknown classes and fields here
        raise ConfigError(f"invalid config for {config['class_path']}: {_first_line(e)}") from None
    with _given_hyperparameters_context(hparams=hparams, instantiator="lightning.pytorch.cli.instantiate_module"):
        return parser.instantiate_classes(cfg).obj


def user_message(e: BaseException) -> str:
    """One line for a user error. jsonargparse wraps a constructor's error in a union report
    ("Does not validate against any of the Union subtypes ... Errors: - <the real message>") and a value of the wrong
    type in nested "Parser key" lines; pick the real message (with the full key of a wrongly typed value) out of it."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keys = re.findall(r'Parser key "([^"]+)":', text)
    typed = re.search(r"Expected a <class '([\w.]+)'>\. Got value: (.*)", text)
    if keys and typed and typed.group(1) != "NoneType":  # a value of the wrong type, maybe inside a class's init_args
        key = ".init_args.".join(dict.fromkeys(keys))  # each nested key is inside the class of the one before
        return f"{key}: expected {typed.group(1)}, got {typed.group(2).strip()!r}"
    key = re.match(r'Parser key "([^"]+)":', lines[0]) if lines else None
    for i, ln in enumerate(lines):
        if ln.startswith("- ") and "Expected a <class 'NoneType'>" not in ln:
            if ln.endswith(":") and i + 1 < len(lines):  # "- Problem with given class_path 'x':" + the reason below
                ln = f"{ln} {lines[i + 1]}"
            return f"{key.group(1)}: {ln[2:]}" if key else ln[2:]
    return lines[0] if lines else type(e).__name__


def _first_line(e: Exception) -> str:
    return user_message(e)
