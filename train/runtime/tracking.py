"""Experiment tracking beyond the methods' own losses: learning rates and gradient norms of every trainable
network (`TrainingDiagnostics`, added by the CLI whenever a logger is set). The exported model as a W&B artifact
is train.export.ExportArtifact."""
from __future__ import annotations

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
    manual-optimization module that freezes the other networks during an update (train.methods.onestep) reports each
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
