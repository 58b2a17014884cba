"""Which labelled data set a model was trained on: a data module's reference (class path + init args) and back."""
from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

# init arguments that only pace loading or choose what a batch holds (data.digits' images: false), not which data set
LOADING_ONLY = ("batch_size", "num_workers", "images")


def gives_labelled_images(datamodule: Any) -> bool:
    """True for a data module of labelled images that evaluation can read: it has `split_tensors(split)`,
    `class_names`, `image_size` and `channels` (data.digits.DigitsDataModule, data.images.LabelledImageDataModule)."""
    return all(hasattr(datamodule, a) for a in ("split_tensors", "class_names", "image_size", "channels"))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def datamodule_reference(datamodule: Any) -> dict | None:
    """{"class_path", "init_args"} that rebuild `datamodule` (build_datamodule), or None for a data module that gives
    no labelled images (gives_labelled_images: prompts, erasure step counters).

    init_args: the module's saved hyper-parameters (LightningDataModule.save_hyperparameters), else its constructor's
    parameters read from the attributes of the same name; a relative local `path` is made absolute (so a model
    evaluated from another folder still finds its data). batch_size and num_workers are left out."""
    if not gives_labelled_images(datamodule):
        return None
    cls = type(datamodule)
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
    hparams = dict(getattr(datamodule, "hparams", None) or {})
    if hparams:
        args = {k: v for k, v in hparams.items() if not k.startswith("_")}
    else:
        args = {n: getattr(datamodule, n) for n in params if hasattr(datamodule, n)}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    args = {k: v for k, v in args.items() if k not in LOADING_ONLY and (takes_any or k in params)}  # a subclass's own
    path = args.get("path")
    if isinstance(path, str) and os.path.exists(os.path.expanduser(path)):
        args["path"] = os.path.abspath(os.path.expanduser(path))
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": _plain(args)}


def describe_reference(reference: dict) -> str:
    """One line naming a data reference: class name and the init args that differ from the class's defaults, e.g.
    LabelledImageDataModule(path='/data/shapes', image_size=16)."""
    module_name, _, name = reference["class_path"].rpartition(".")
    try:
        params = inspect.signature(getattr(importlib.import_module(module_name), name).__init__).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        params = {}
    args = ", ".join(f"{k}={v!r}" for k, v in (reference.get("init_args") or {}).items()
                     if k not in params or params[k].default != v)
    return f"{name}({args})"


def build_datamodule(reference: dict) -> Any:
    """The data module a reference names, set up (its images listed and checked). A class that no longer imports, or
    arguments it no longer takes, is a ValueError saying which data set the model was trained on."""
    module_name, _, name = reference["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"the model was trained on {describe_reference(reference)}, whose class does not import here "
                         f"({e})") from None
    try:
        datamodule = cls(**(reference.get("init_args") or {}))
        datamodule.setup("fit")
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"the model was trained on {describe_reference(reference)}, which cannot be read here: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return datamodule
