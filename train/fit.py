"""`python -m train fit` / `validate`: LightningCLI over a YAML config, with the run folder, W&B mode, resume checks,
interrupt checkpoints and training diagnostics set up the same way for every method."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def finish_wandb() -> None:
    """Close the W&B run a fit opened, so its config and summary are written (also offline)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def upgraded_configs(argv: list[str], folder: Path) -> list[str]:
    """argv with each --config whose model section is of an earlier layout (class paths, flat arguments:
    runtime.checkpoint.upgrade_config) replaced by an up-to-date copy written into `folder`, so a run's own
    config.yaml resumes it after an upgrade."""
    import yaml

    from train.runtime.checkpoint import upgrade_config
    from train.runtime.config import read_yaml

    out = list(argv)
    for i, (flag, value) in enumerate(zip(argv, argv[1:])):
        if flag not in ("--config", "-c"):
            continue
        cfg = read_yaml(value)
        model = cfg.get("model")
        if not isinstance(model, dict) or "class_path" not in model:
            continue
        hparams = upgrade_config({"_class_path": model["class_path"], **(model.get("init_args") or {})})
        new = {"class_path": hparams.pop("_class_path"), "init_args": hparams}
        if new != {"class_path": model["class_path"], "init_args": model.get("init_args") or {}}:
            path = folder / f"upgraded-{i}-{Path(value).name}"
            path.write_text(yaml.safe_dump({**cfg, "model": new}, sort_keys=False))
            print(f"note: {value} names {model['class_path']} in an earlier layout; read as {path}", file=sys.stderr)
            out[i + 1] = str(path)
    return out


def lightning_cli(argv: list[str] | None):
    """LightningCLI with the method and data module chosen by class_path in the config.

    Checkpoints go to <trainer.default_root_dir>/checkpoints and W&B files to <default_root_dir>/wandb
    unless the config says otherwise, so a run is one folder."""
    import lightning as L
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    import train.runtime.strategy  # noqa: F401  (registers the zero1/zero2/zero3 strategy names)
    from train.methods.base import MethodModule
    from train.runtime.checkpoint import check_resume, read_checkpoint, upgrade_config
    from train.runtime.interrupt import FinalCheckpoint, InterruptCheckpoint
    from train.runtime.progress import StepProgressBar
    from train.runtime.run_folder import AtomicCheckpointIO, RunFolder, is_main_process
    from train.runtime.tracking import TrainingDiagnostics

    claimed: list[RunFolder] = []  # the run folder this command holds, released when it ends

    class SaveAndLogConfig(SaveConfigCallback):
        """Write config.yaml to the run folder and log the whole resolved config to every logger (W&B)."""

        def save_config(self, trainer, pl_module, stage) -> None:
            for logger in trainer.loggers:
                logger.log_hyperparams({"config": self.config.as_dict()})

    class GuidedCLI(LightningCLI):
        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            cfg = self.config.get(self.config.get("subcommand") or "") or self.config
            ckpt = cfg.get("ckpt_path")
            if ckpt in ("best", "hpc"):
                raise ValueError(f"--ckpt_path {ckpt} is not supported; pass the checkpoint file to resume (e.g. "
                                 f"<run folder>/checkpoints/last.ckpt) or `last`")
            if ckpt == "last":  # Lightning's "last": this run folder's last.ckpt, checked like any other
                root = Path(cfg.trainer.get("default_root_dir") or "runs/default")
                ckpt = cfg.ckpt_path = str(root / "checkpoints" / "last.ckpt")
                if not Path(ckpt).exists():
                    raise ValueError(f"--ckpt_path last: {root} has no checkpoints/last.ckpt to resume; pass the "
                                     f"checkpoint file, or drop --ckpt_path to start a new run")
            if ckpt and not Path(ckpt).is_dir():
                read_checkpoint(ckpt)  # missing, corrupt, truncated or foreign: one line, before anything is built
            steps = cfg.trainer.get("max_steps")
            if steps is not None and (steps == 0 or steps < -1):
                raise ValueError(f"trainer.max_steps={steps} trains nothing; give the number of optimizer steps to train "
                                 f"(or -1 with trainer.max_epochs)")
            self.requested_model = cfg.model.as_dict() if cfg.get("model") else None

        def _parse_ckpt_path(self) -> None:
            """A resumed run's model is the checkpoint's (Lightning reads its hyper-parameters into the config); a
            checkpoint of an earlier layout is brought up to date first (runtime.checkpoint.upgrade_config)."""
            sub = self.config.get("subcommand")
            ckpt = self.config[sub].get("ckpt_path") if sub else None
            if not ckpt or not Path(ckpt).is_file():
                return
            import torch

            hparams = upgrade_config(torch.load(ckpt, weights_only=True, map_location="cpu").get("hyper_parameters", {}))
            hparams.pop("_instantiator", None)
            if not hparams:
                return
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            if cfg.get("ckpt_path") and self.requested_model and Path(cfg.ckpt_path).is_file():
                check_resume(cfg.ckpt_path, self.requested_model, cfg.model.as_dict())  # the checkpoint's model wins
            root = cfg.trainer.get("default_root_dir") or "runs/default"
            if self.subcommand == "fit" and is_main_process():  # refused before the model is built; held once it is
                self.run_folder = RunFolder(root, bool(cfg.get("ckpt_path")), bool(cfg.get("reuse_run_folder")))
                self.run_folder.check()
            logger = cfg.trainer.get("logger")
            mode = cfg.get("wandb") or os.environ.get("WANDB_MODE") or "offline"
            os.environ["WANDB_MODE"] = mode
            for lg in logger if isinstance(logger, list) else [logger]:
                if lg is not None and not isinstance(lg, bool) and "Wandb" in str(lg.get("class_path", "")):
                    # the mode decides, passed to wandb.init; WandbLogger(offline=True) would force offline over it
                    lg.init_args["offline"], lg.init_args["mode"] = False, mode
                    if lg.init_args.get("save_dir") in (None, "."):
                        lg.init_args["save_dir"] = root  # created with the trainer (RunFolder.claim), not before

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--wandb", choices=("offline", "online", "disabled"), default=None,
                                help="W&B mode of a WandbLogger (default: $WANDB_MODE, else offline)")
            parser.add_argument("--self_contained_checkpoints", type=bool, default=False,
                                help="checkpoints also hold the frozen networks the method reads from its config's "
                                     "paths (teacher, model, student, weak_teacher), so they load where those files "
                                     "are gone; without it they hold a fingerprint of each instead and loading reads "
                                     "them from their paths (train.runtime.frozen)")
            parser.add_argument("--reuse_run_folder", type=bool, default=False,
                                help="start a new run in a default_root_dir that already holds one (its files are "
                                     "kept; config.yaml and last.ckpt are replaced); without it such a folder is "
                                     "refused unless the run resumes it (--ckpt_path)")

        def before_fit(self) -> None:
            self.model.check_data(self.datamodule)  # images / classes the network cannot take, before any file
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            self.model.self_contained_checkpoints = bool(cfg.get("self_contained_checkpoints"))

        def instantiate_trainer(self, **kwargs):
            folder = getattr(self, "run_folder", None)
            if folder is not None:
                folder.claim()
                claimed.append(folder)
            else:
                cfg = self.config[self.subcommand] if self.subcommand else self.config
                Path(cfg.trainer.get("default_root_dir") or "runs/default").mkdir(parents=True, exist_ok=True)
            trainer = super().instantiate_trainer(**kwargs)
            for cb in trainer.checkpoint_callbacks:
                if cb.dirpath is None:
                    cb.dirpath = os.path.realpath(Path(trainer.default_root_dir) / "checkpoints")
                if isinstance(cb, ModelCheckpoint):  # one run per folder: last.ckpt is always the latest, never last-v1
                    cb._enable_version_counter = False
            if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
                trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # written beside the target, then renamed
            if not trainer.loggers and any(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks):
                raise ValueError("LearningRateMonitor needs a logger: remove it from trainer.callbacks or set "
                                 "trainer.logger (with a logger, learning rates are logged as train/lr/<network> anyway)")
            chosen = self._get(self.config, "trainer", default={}).get("callbacks") or []
            rich_chosen = any("RichProgressBar" in str(getattr(c, "class_path", c)) for c in
                              (chosen if isinstance(chosen, list) else [chosen]))
            trainer.callbacks = [  # Lightning's default bar (Rich's when rich is installed) counts epochs: ours steps
                StepProgressBar() if type(cb) is TQDMProgressBar or (type(cb) is RichProgressBar and not rich_chosen)
                else cb for cb in trainer.callbacks]
            if not any(isinstance(cb, InterruptCheckpoint) for cb in trainer.callbacks):
                trainer.callbacks.append(InterruptCheckpoint())  # SIGTERM / Ctrl+C: write last.ckpt, then stop
            if not any(isinstance(cb, FinalCheckpoint) for cb in trainer.callbacks):
                trainer.callbacks.append(FinalCheckpoint())  # last.ckpt at the final step, whatever the trigger
            if trainer.loggers and not any(isinstance(cb, TrainingDiagnostics) for cb in trainer.callbacks):
                trainer.callbacks.append(TrainingDiagnostics())  # learning rates and gradient norms per network
            return trainer

    no_exit = {"exit_on_error": False}  # parse errors raise ArgumentError; main prints them as one line
    import tempfile

    scratch = tempfile.TemporaryDirectory(prefix="guidedistill-config-")
    given = sys.argv[1:] if argv is None else argv
    upgraded = upgraded_configs(given, Path(scratch.name))
    argv = upgraded if upgraded != given else argv  # None from the shell: LightningCLI reads sys.argv itself
    try:
        return GuidedCLI(MethodModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         args=argv, save_config_callback=SaveAndLogConfig, save_config_kwargs={"overwrite": True},
                         auto_configure_optimizers=False,
                         parser_kwargs={**no_exit, **{name: no_exit for name in LightningCLI.subcommands()}})
    finally:
        for folder in claimed:
            folder.release()
        scratch.cleanup()
