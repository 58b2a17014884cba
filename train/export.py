"""`python -m train export`: a training checkpoint -> a diffusers model folder, LoRA weights or one safetensors file.

The network adapter writes itself (models: `save_diffusers`, `save_lora`, `card_code`); this command adds what the
method knows (guidedistill.json: method, parameterisation, schedule, the sampling recipe, the conditioner, a one-step
generator's times; the model card) and writes the target safely:

- diffusers:   what from_pretrained loads (class models: `unet/` + a DDIM "trailing" `scheduler/`, LCMScheduler for
               latent consistency models; text models: the base pipeline folder with the trained network), LoRA
               adapters merged, `w_embedding/` for guidance-distilled students, `guidedistill.json` and a model card
               `README.md` whose code samples the folder with diffusers alone;
- lora:        the adapters for the frozen base (class models: peft's adapter files for the teacher's UNet; text
               models: diffusers' own LoRA file for `pipe.load_lora_weights`), plus `w_embedding/`, the meta and card;
- safetensors: the sampling network's state dict (LoRA merged), the metadata under the key "guidedistill".

Only an earlier export is ever replaced (with `force`), never a folder holding the source checkpoint or the current
directory; the new export is written next to the target and renamed into place (replace_atomically).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import struct
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import lightning as L
import torch

from guidance.denoiser import Denoiser
from models.diffusers_export import cpu_state, plain_network
from models.param_select import lora_adapter
from train.model_card import model_card
from train.runtime.checkpoint import load_method

FORMATS = ("diffusers", "lora", "safetensors")
META_KEY = "guidedistill"  # guidedistill.json in a folder; this metadata key in a safetensors file


# ------------------------------------------------------------------------------------------------ what is exported

def generator_table(module) -> dict:
    """The one-step generator's times t, network times and alpha(t), sigma(t), as float32 values exactly as
    OneStepDistillation.run_generator uses them."""
    times = module.generator_times.float()
    sched = module.sampling_denoiser().schedule
    a, s = sched.alpha_sigma(times)
    return {"steps": len(times), "t": times.tolist(), "timesteps": sched.net_time(times).tolist(),
            "alpha": a.tolist(), "sigma": s.tolist()}


def export_meta(module, den: Denoiser, fmt: str, metrics: dict | None) -> dict:
    """guidedistill.json: the method, schedule, network and conditioner descriptions and how to sample the export."""
    hp = dict(module.hparams) if module.hparams else {}
    recipe = module.recipe()
    meta = {"method": module.method_name, "format": fmt, "parameterization": den.parameterization,
            "schedule": den.schedule.describe(), "guidance_convention": "D_u + w * (D_c - D_u)",
            **den.net.describe(), "conditioning": den.net.conditioner.describe(), "sampling": recipe.describe()}
    if meta["sampling"]["recipe"] == "generator":
        meta["generator"] = generator_table(module)
        # the network timesteps the export's LCMScheduler is set to (models.diffusers_export.generator_scheduler)
        meta["sampling"]["timesteps"] = meta["generator"]["timesteps"]
        # the scale it was distilled at; PG-SB distils a range of w
        meta["distilled_guidance_scale"] = recipe.scale if recipe.scale is not None else hp.get("pg_sb_range")
    meta["metrics"], meta["training_config"] = metrics, hp or None
    return meta


def check_lora_base(module, net: torch.nn.Module) -> None:
    """LoRA weights are only useful on the network they were trained on: check that the adapted network's base
    weights still equal the frozen teacher's (erasure: `frozen`, guidance distillation and one-step: `teacher`; a
    LoRA fake score's adapters in the one-step teacher's network are left out, and a teacher held in a lower
    frozen_dtype is compared with the base rounded to it)."""
    lora_adapter(net)  # no adapters: the one-line error saying so
    frozen = next((d for d in (getattr(module, "frozen", None), getattr(module, "teacher", None))
                   if isinstance(d, Denoiser)), None)
    base = _base_weights(net)
    ref = _base_weights(frozen.net) if frozen is not None else {}
    if base.keys() != ref.keys() or any(not torch.equal(v.to(ref[k].dtype), ref[k]) for k, v in base.items()):
        raise ValueError(f"the {module.method_name!r} network's base weights are not its frozen teacher's (they were "
                         f"trained too), so its LoRA weights alone do not reproduce it; export --format diffusers")


def _base_weights(net: torch.nn.Module) -> dict:
    """The diffusers network's weights without LoRA adapters, under their original names."""
    return {k.replace(".base_layer.", "."): v for k, v in net.unet.state_dict().items() if ".lora_" not in k}


# ------------------------------------------------------------------------------------------------ writers

def write_folder(den: Denoiser, meta: dict, tmp: Path, files: dict) -> Path:
    """guidedistill.json and the model card beside the files the network wrote (`files`: what it says of them)."""
    meta = {**meta, **files}
    (tmp / "guidedistill.json").write_text(json.dumps(meta, indent=2, default=str))
    (tmp / "README.md").write_text(model_card(meta, den.net.card_code(meta)))
    return tmp


def write_diffusers(den: Denoiser, meta: dict, tmp: Path) -> Path:
    return write_folder(den, meta, tmp, den.net.save_diffusers(tmp, den.schedule, den.parameterization,
                                                               sampling=meta["sampling"]))


def write_lora(den: Denoiser, meta: dict, tmp: Path) -> Path:
    hp = meta.get("training_config") or {}
    base = hp.get("teacher") or hp.get("model")  # the checkpoint (or pipeline folder) of the frozen base
    return write_folder(den, meta, tmp, den.net.save_lora(tmp, den.schedule, den.parameterization, base,
                                                          sampling=meta["sampling"]))


def write_safetensors(den: Denoiser, meta: dict, tmp: Path) -> Path:
    from safetensors.torch import save_file

    if "w_embedding" in meta:
        meta = {**meta, "w_embedding": {**meta["w_embedding"], "in_unet": False, "weights": "keys w_embedding.*"}}
    target = tmp / "model.safetensors"
    save_file(cpu_state(plain_network(den.net).state_dict()), target,
              metadata={META_KEY: json.dumps(meta, default=str)})
    return target


WRITERS: dict[str, Callable] = {"diffusers": write_diffusers, "lora": write_lora, "safetensors": write_safetensors}


# ------------------------------------------------------------------------------------------------ the command

def export(ckpt: str | os.PathLike, out: str | os.PathLike, fmt: str = "diffusers", force: bool = False,
           metrics: dict | None = None) -> Path:
    """Export the sampling network of a checkpoint in format `fmt`; returns the written path. An existing `out` is
    replaced only when it is an earlier export and `force` is set (check_target)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(os.path.abspath(out))
    recover_interrupted(out)
    check_target(out, Path(ckpt), force)
    module = load_method(ckpt)
    den = module.sampling_denoiser()
    if fmt == "lora":
        check_lora_base(module, den.net)
    meta = export_meta(module, den, fmt, metrics)
    return replace_atomically(out, lambda tmp: WRITERS[fmt](den, meta, tmp))


# ------------------------------------------------------------------------------------------------ the target

def is_export(path: Path) -> bool:
    """An earlier export: a folder holding guidedistill.json, or a safetensors file with the "guidedistill" metadata."""
    if path.is_dir():
        return (path / f"{META_KEY}.json").is_file()
    return path.is_file() and META_KEY in safetensors_metadata(path)


def safetensors_metadata(path: Path) -> dict:
    """The `__metadata__` of a safetensors file's header ({} for anything else); reads only the header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if n <= 100_000_000 else None  # safetensors caps headers at 100 MB
    except (OSError, ValueError, struct.error):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def check_target(out: Path, ckpt: Path, force: bool) -> None:
    """Refuse, with one line saying why and what to pass, a target that export may not replace: anything but an
    earlier export (and that only with `force`), and never the source checkpoint, the current directory or a folder
    holding either."""
    if not os.path.lexists(out):
        return
    new = out / "export" if out.is_dir() else out.with_name(f"{out.stem}-export{out.suffix}")
    if out.is_symlink():
        raise FileExistsError(f"export target {out} is a symbolic link; pass a new --out (e.g. {new})")
    real = out.resolve()
    for path, what in ((ckpt.resolve(), "the checkpoint being exported"), (Path.cwd().resolve(), "the current directory")):
        if real == path or real in path.parents:
            raise FileExistsError(f"export target {out} {'is' if real == path else 'holds'} {what} ({path}) and is never "
                                  f"replaced; pass a new --out (e.g. {new})")
    if not is_export(real):
        kind = "folder without guidedistill.json" if out.is_dir() else "file without guidedistill metadata"
        raise FileExistsError(f"export target {out} exists and is not an earlier export (a {kind}), so it is never "
                              f"replaced, even with --force; pass a new --out (e.g. {new})")
    if not force:
        raise FileExistsError(f"export target {out} holds an earlier export; pass --force to replace it, or a new --out")


def _scratch_name(out: Path, role: str) -> Path:
    """The hidden sibling `.<name>.guidedistill-<role>-<pid>-<random>` of `out` (role: tmp or old)."""
    return out.with_name(f".{out.name}.{META_KEY}-{role}-{os.getpid()}-{secrets.token_hex(4)}")


def _stale_scratch(out: Path) -> list[tuple[str, Path]]:
    """(role, path) of the scratch siblings of `out` left by exports that are no longer running (killed)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{META_KEY}-(tmp|old)-(\d+)-[0-9a-f]+")
    found = []
    for p in out.parent.iterdir() if out.parent.is_dir() else ():
        m = pattern.fullmatch(p.name)
        if m and not _running(int(m.group(2))):
            found.append((m.group(1), p))
    return found


def _running(pid: int) -> bool:
    if pid == os.getpid():  # an export of this process that is running now cleans up after itself
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def recover_interrupted(out: Path) -> None:
    """Clean up after an earlier export of `out` that was killed: put a replaced export back when the new one never
    arrived (killed between the two renames), then delete its hidden temporary and old folders (only those)."""
    stale = _stale_scratch(out)
    old = [p for role, p in stale if role == "old"]
    if not os.path.lexists(out) and len(old) == 1:
        os.rename(old[0], out)
    for _, p in stale:
        if os.path.lexists(p):
            _remove(p)


def _normal_permissions(path: Path) -> None:
    """Folders 0777 and files 0666 less the umask (0755 / 0644 by default), as any other program writes them."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


@contextmanager
def _sigterm_as_exit():
    """Inside the block a SIGTERM exits through `finally` blocks (SystemExit 143) instead of killing the process where
    it stands, so no temporary folder is left; only where SIGTERM has its default action (not under Lightning)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def replace_atomically(out: Path, write: Callable[[Path], Path]) -> Path:
    """Call write(tmp) with an empty hidden folder next to `out`, then put what it returns (the folder or a file in
    it) at `out`: an existing `out` is renamed aside, the new one renamed in, the old one deleted. An error or a
    SIGTERM leaves `out` as it was and no hidden folder behind; a SIGKILL leaves them to the next export of `out`
    (recover_interrupted). The caller decides whether `out` may be replaced (check_target)."""
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _scratch_name(out, "tmp"), _scratch_name(out, "old")
    with _sigterm_as_exit():
        try:
            tmp.mkdir()
            result = write(tmp)
            _normal_permissions(result)
            if os.path.lexists(out):
                os.rename(out, old)
            try:
                os.rename(result, out)
            except BaseException:
                if os.path.lexists(old) and not os.path.lexists(out):
                    os.rename(old, out)  # the earlier export back in place
                raise
            return out
        finally:
            for p in (tmp, old):
                if os.path.lexists(p):
                    _remove(p)


# ------------------------------------------------------------------------------------------------ W&B

class ExportArtifact(L.Callback):
    """At the end of training, export the model (`python -m train export`'s formats, with the last validation
    metrics in its model card) to `<run>/export` and log it to W&B as an artifact of type "model".

    format: diffusers (a folder from_pretrained loads), lora or safetensors.
    name:   artifact name; default "<run name>-model".
    Offline runs keep the artifact in the run folder; `wandb sync` uploads it with the rest of the run.
    Without a W&B logger the callback does nothing.
    """

    def __init__(self, format: str = "diffusers", name: str | None = None):
        if format not in FORMATS:
            raise ValueError(f"ExportArtifact format must be one of {', '.join(FORMATS)}, got {format!r}")
        self.format, self.name = format, name

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if not loggers or trainer.interrupted:
            return
        root = Path(trainer.default_root_dir)
        tmp = root / ".export-checkpoint"
        ckpt = tmp / "final.ckpt"
        trainer.save_checkpoint(ckpt)  # every rank takes part (a ZeRO checkpoint is written by all of them)
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            out = export(ckpt, root / "export" if self.format != "safetensors" else root / "export.safetensors",
                         self.format, force=True, metrics=metrics or None)
            self._log(loggers[0], out, pl_module, trainer, metrics)
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.strategy.barrier()

    def _log(self, logger, path: Path, pl_module, trainer: L.Trainer, metrics: dict) -> None:
        import wandb

        run = logger.experiment
        name = self.name or f"{run.name or run.id}-model"
        artifact = wandb.Artifact(name, type="model", metadata={
            "method": pl_module.method_name, "format": self.format, "step": int(trainer.global_step), **metrics})
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        run.log_artifact(artifact, aliases=["latest", f"step{trainer.global_step}"])
