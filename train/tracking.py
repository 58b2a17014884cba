"""Experiment tracking beyond the methods' own losses: learning rates and gradient norms of every trainable
network (`TrainingDiagnostics`, added by the CLI whenever a logger is set) and the exported model as a W&B
artifact (`ExportArtifact`, opt-in)."""
from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import torch


def optimizer_names(trainer: L.Trainer, pl_module) -> list[str]:
    """A short name per optimizer: the network it trains ('denoiser', 'student', 'generator', 'fake_score',
    'disc_head'), from the module's `trainable_networks()` (listed in optimizer order), else from the
    attribute that holds the optimizer's first parameter."""
    try:
        names = [n.removesuffix(".net") for n in pl_module.trainable_networks()]
    except NotImplementedError:  # e.g. progressive distillation, which does not name its networks
        names = []
    if len(names) == len(trainer.optimizers):
        return names
    owner = {id(p): n.split(".")[0] for n, p in pl_module.named_parameters()}
    return [next((owner[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in owner), f"optimizer{i}")
            for i, opt in enumerate(trainer.optimizers)]


class TrainingDiagnostics(L.Callback):
    """Log `train/lr/<network>` (the learning rate of each optimizer) and `train/grad_norm/<network>` (the L2
    norm of the gradient of the weights each optimizer updates, before clipping) for any method module.

    Networks are named by `optimizer_names` (the one-step module: generator, fake_score, disc_head). The
    gradient norm is taken after every backward pass over the weights that require grad at that moment, so a
    manual-optimization module that freezes the other networks during an update (train.onestep) reports each
    network after its own update; with several backward passes in one step the last one is logged. Under the
    multi-engine DeepSpeed strategy the gradients live in the engines, whose own norms are logged after each
    step instead.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.names = optimizer_names(trainer, pl_module)

    def on_after_backward(self, trainer: L.Trainer, pl_module) -> None:
        if getattr(pl_module, "strategy_clips", False):
            return
        for name, opt in zip(self.names, trainer.optimizers):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.requires_grad and p.grad is not None]
            if grads:
                pl_module.log(f"train/grad_norm/{name}", torch.nn.utils.get_total_norm(grads, 2.0).detach().float())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name, opt in zip(self.names, trainer.optimizers):
            pl_module.log(f"train/lr/{name}", float(opt.param_groups[0]["lr"]))
        if getattr(pl_module, "strategy_clips", False):
            for full_name in pl_module.trainable_networks():
                norm = trainer.strategy.grad_norm(full_name)
                if norm is not None:
                    pl_module.log(f"train/grad_norm/{full_name.removesuffix('.net')}", norm)


class ExportArtifact(L.Callback):
    """At the end of training, export the model (`python -m train export`'s formats, with the last validation
    metrics in its model card) to `<run>/export` and log it to W&B as an artifact of type "model".

    format: diffusers (a folder from_pretrained loads), lora or safetensors.
    name:   artifact name; default "<run name>-model".
    Offline runs keep the artifact in the run folder; `wandb sync` uploads it with the rest of the run.
    Without a W&B logger the callback does nothing.
    """

    def __init__(self, format: str = "diffusers", name: str | None = None):
        from train.export import FORMATS

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
            from train.export import export

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
