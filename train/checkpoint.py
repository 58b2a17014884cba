"""Reading guidedistill checkpoints safely (weights_only) and rebuilding the method they hold."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from train.base import CHECKPOINT_KEY, MethodModule
from train.config import ConfigError, instantiate


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says what to do."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) with one-line errors for missing, corrupt and foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass the .ckpt written by `python -m train fit` "
                              f"(e.g. runs/<name>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to unpickle safely means the file is unusable as a checkpoint
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read (corrupt, truncated, or not a torch file): "
                              f"{str(e).strip().splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not a guidedistill checkpoint (no {CHECKPOINT_KEY!r} entry); "
                              f"pass a checkpoint written by `python -m train fit`")
    return ckpt


def load_method(path: str | os.PathLike, expect: str | None = None) -> MethodModule:
    """Rebuild the method module stored in a checkpoint and load its weights (eval mode, CPU).

    expect: a method name ('teacher', ...) the caller needs; another kind is refused with a message."""
    ckpt = read_checkpoint(path)
    meta = ckpt[CHECKPOINT_KEY]
    if expect is not None and meta.get("method") != expect:
        raise CheckpointError(f"{str(path)!r} holds a {meta.get('method')!r} checkpoint; this command needs a {expect!r} one")
    cfg = meta.get("config")
    if not cfg:
        raise CheckpointError(f"{str(path)!r} was written by a module built in Python without a config, so it cannot be "
                              f"rebuilt; build methods with train.config.instantiate or the CLI")
    cfg = {k: v for k, v in cfg.items() if k != "_instantiator"}
    class_path = cfg.pop("_class_path")
    try:
        module = instantiate({"class_path": class_path, "init_args": cfg})
    except ConfigError as e:
        raise CheckpointError(f"{str(path)!r}: its stored config no longer builds ({e})") from None
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r}: weights do not match the network its config builds "
                              f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})")
    module.eval()
    return module
