"""Which labelled data set a model belongs to, recorded at fit time: the data module's reference (or, for a run whose
data gives no labelled images, its teacher's), and the data's class names filled into the class networks."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from data.reference import datamodule_reference

CHECKPOINT_ARGUMENTS = ("teacher", "student", "model")  # the method arguments that name the checkpoint a run starts from


def checkpoint_data(path: str | Path) -> dict | None:
    """The data reference a checkpoint file records (its guidedistill record's "data"), None when it records none or
    is not a readable checkpoint file (a pipeline folder, a ZeRO folder). Memory-mapped: the weights are not read."""
    import torch

    from train.runtime.checkpoint import CHECKPOINT_KEY

    path = Path(path)
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (mmap needs one), corrupt: the method's own loading says so
        return None
    record = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    return record.get("data") if isinstance(record, dict) else None


def _class_networks(module: Any) -> list:
    """Every class-conditional network of a module whose conditioner knows class names (teacher, student, EMA, ...)."""
    from models.conditioning import ClassConditioner

    def conditioner(m: Any) -> Any:
        try:
            return getattr(m, "conditioner", None)
        except NotImplementedError:  # a method module with no sampling network (its conditioner is its network's)
            return None

    return [m for m in module.modules() if isinstance(conditioner(m), ClassConditioner)]


def _fill_config_names(config: Any, names: list[str]) -> None:
    """Set class_names in every ClassConditionalUNet config (class_path + init_args) of `config` that has none."""
    if isinstance(config, dict):
        args = config.get("init_args")
        if str(config.get("class_path", "")).endswith("ClassConditionalUNet") and isinstance(args, dict) \
                and args.get("class_names") is None and args.get("num_classes", len(names)) == len(names):
            args["class_names"] = list(names)
        for value in config.values():
            _fill_config_names(value, names)
    elif isinstance(config, list):
        for value in config:
            _fill_config_names(value, names)


def fill_class_names(module: Any, datamodule: Any) -> None:
    """Give the module's class networks the data's class names (data.images.LabelledImageDataModule.class_names, the
    digits' "0".."9") where they have none, in the networks and in the module's config (so the checkpoint, the export
    and `sample --class NAME` know them); a network with other names than the data's is refused in one line."""
    names = getattr(datamodule, "class_names", None)
    if not names:
        return
    names = [str(n) for n in names]
    for net in _class_networks(module):
        conditioner = net.conditioner
        if conditioner.names is None:
            if conditioner.num_classes == len(names):
                conditioner.names = list(names)
        elif conditioner.names[:len(names)] != names:
            raise ValueError(f"the network's class_names {conditioner.names} are not the data's {names} (class ids "
                             f"follow the data's sorted class names); drop class_names from the config, or give them "
                             f"in the data's order")
    _fill_config_names(dict(module.hparams), names)


def record_data(module: Any, datamodule: Any) -> dict | None:
    """At fit time: fill the class names (fill_class_names) and return the data reference to record in the module's
    checkpoints: the data module's (data.reference.datamodule_reference), or, when it gives no labelled images
    (erasure step counters, prompts, data-free distillation), the one recorded by the checkpoint the run starts
    from (its teacher / student / model argument); None when there is none."""
    if datamodule is None:
        return None
    fill_class_names(module, datamodule)
    reference = datamodule_reference(datamodule)
    if reference is not None:
        return reference
    hparams = dict(getattr(module, "hparams", None) or {})
    for name in CHECKPOINT_ARGUMENTS:
        if isinstance(hparams.get(name), str):
            found = checkpoint_data(hparams[name])
            if found is not None:
                return found
    return None
