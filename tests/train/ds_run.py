"""Fit one tiny method, optionally under the multi-engine DeepSpeed strategy; run as a script by
tests/train/test_deepspeed.py (Lightning's launcher re-runs it once per extra process).

Writes to --root: losses.rank<r>.json (every train/ metric per batch index), weights.pt (rank 0: the
trainable networks' full weights at the end, gathered under ZeRO-3) and checkpoints/ (one per step).

    python tests/train/ds_run.py --method teacher --teacher T.ckpt --stage 2 --devices 2 --steps 4 --root R
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.ema import gathered_weights  # noqa: E402
from train.methods.base import MethodModule  # noqa: E402
from train.runtime.config import instantiate, read_yaml  # noqa: E402

TINY_TEACHER = ROOT / "tests" / "configs" / "tiny_teacher.yaml"


class TwoNetworks(MethodModule):
    """A deterministic two-network method (no random draws): a classifier A trained on the digits and a head
    B on A's intermediate features (taken by a forward aborted after the layer, as the one-step module's
    discriminator does), one loss reaching both, two optimizers. With no randomness its losses and weights
    under ZeRO on N processes must equal a single-process run on the same global batch."""

    class _Stop(Exception):
        pass

    def __init__(self, lr: float = 1e-4, nan_at: int = -1):
        super().__init__()
        self.nan_at = nan_at  # batch whose loss is made NaN (the engines must skip that update)
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(),
                               nn.Flatten(), nn.Linear(512, 10))
        self.b = nn.Linear(512, 1)
        self.lr = lr
        self.automatic_optimization = False

    def features(self, x):
        out = {}

        def hook(module, inputs, output):
            out["f"] = output
            raise self._Stop

        handle = self.a[2].register_forward_hook(hook)
        try:
            self.a(x)
        except self._Stop:
            pass
        finally:
            handle.remove()
        return out["f"].flatten(1)

    def training_step(self, batch, batch_idx):
        x, labels = batch
        opt_a, opt_b = self.optimizers()
        loss = nn.functional.cross_entropy(self.a(x), labels) + (self.b(self.features(x)) ** 2).mean()
        if batch_idx == self.nan_at:
            loss = loss * float("nan")
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        self.trainer.strategy.optimizer_step(opt_b.optimizer, closure=lambda: None)
        opt_a.step()
        self.log("train/loss", loss.detach())

    def trainable_networks(self):
        return {"a": self.a, "b": self.b}

    def check_data(self, datamodule) -> None:
        """Not a diffusion network: nothing to check against the digits' image size."""

    def configure_optimizers(self):
        return [torch.optim.AdamW(self.a.parameters(), lr=self.lr), torch.optim.AdamW(self.b.parameters(), lr=self.lr)]


def build(method: str, teacher: str | None, batch: int, nan_at: int = -1, frozen_dtype: str = "float32"):
    """(module, datamodule) of a tiny run of `method`."""
    from data.digits import DigitsDataModule
    from data.steps import ErasureSteps

    digits = DigitsDataModule(batch_size=batch)
    if method == "two_networks":
        return TwoNetworks(nan_at=nan_at), digits
    if method == "teacher":
        return instantiate(read_yaml(TINY_TEACHER)["model"]), digits
    if method == "guidance_distillation":
        return instantiate({"class_path": "train.methods.guidance_distillation.GuidanceDistillation",
                            "init_args": {"teacher": teacher, "w_min": 1.0, "w_max": 5.0, "lr": 1e-3,
                                          "warmup_steps": 1, "ema_decay": 0.5}}), digits
    if method == "consistency":  # LCM: the guided teacher's solver step, the EMA target network, w as an input
        return instantiate({"class_path": "train.methods.consistency.ConsistencyDistillation",
                            "init_args": {"teacher": teacher, "w_min": 1.0, "w_max": 5.0, "solver_steps": 10,
                                          "lr": 1e-3, "warmup_steps": 1, "target_decay": 0.5}}), digits
    if method == "progressive":  # --teacher: a stage-1 checkpoint; 8 -> 4 -> 2 -> 1 steps, a round boundary per step
        return instantiate({"class_path": "train.methods.progressive.ProgressiveDistillation",
                            "init_args": {"student": teacher, "start_steps": 8, "end_steps": 1, "steps_per_round": 1,
                                          "lr": 1e-3, "warmup_steps": 1, "ema_decay": 0.5}}), digits
    if method == "onestep":  # generator, LoRA fake score and discriminator (f-distill JS + GAN): three engines
        return instantiate({"class_path": "train.methods.onestep.OneStepDistillation",
                            "init_args": {"teacher": teacher,  # rate 0.5: the running means of r carry over steps
                                          "objective": {"divergence": "jensen_shannon", "ratio_ema_rate": 0.5},
                                          "discriminator": {"gan_weight": 0.1, "hidden": 16},
                                          "fake_score": {"updates": 2, "rank": 4},
                                          "ema_decay": 0.9, "frozen_dtype": frozen_dtype}}), digits
    if method == "onestep_lora_generator":  # a LoRA generator (only its adapters in the generator engine), LoRA fake score
        return instantiate({"class_path": "train.methods.onestep.OneStepDistillation",
                            "init_args": {"teacher": teacher, "generator": {"lora_rank": 2, "lora_alpha": 4.0},
                                          "fake_score": {"updates": 2, "rank": 4},
                                          "ema_decay": 0.9, "frozen_dtype": frozen_dtype}}), digits
    if method == "sid":  # SiD-LSG: both scores differentiated through x_t, the LoRA fake score guided (kappa_1, kappa_2)
        return instantiate({"class_path": "train.methods.onestep.OneStepDistillation",
                            "init_args": {"teacher": teacher, "guidance_scale": 2.0,
                                          "objective": {"kind": "sid", "lsg_fake_scale": 2.0, "lsg_train_scale": 1.5},
                                          "fake_score": {"updates": 2, "rank": 4},
                                          "ema_decay": 0.9, "frozen_dtype": frozen_dtype}}), digits
    if method == "erasure":  # ESD's on-policy x_t: the student's own partial trajectories, drawn through per_sample
        return instantiate({"class_path": "train.methods.erasure.ConceptErasure",
                            "init_args": {"model": teacher, "concepts": [3], "params": "esd-u", "lr": 1e-3,
                                          "batch_size": batch // 2, "trajectory_steps": 3,
                                          "val_samples": 0}}), ErasureSteps(steps_per_epoch=10)
    raise ValueError(f"unknown method {method!r}")


def use_sgd(module: L.LightningModule, momentum: float = 0.9, lr_factor: float = 100.0) -> None:
    """Train `module` with SGD + momentum in place of each AdamW its configure_optimizers returns (same parameter
    groups and schedules, learning rates times `lr_factor`: Adam's steps are about the learning rate, SGD's the
    learning rate times gradients of about 1e-2, so the weights move about as far).

    The equality tests compare weights trained on 2 processes with weights trained on 1. Adam's step
    m / (sqrt(v) + eps) has the size of the learning rate whatever the gradient, so where a gradient is near zero a
    float reduction-order difference between the runs (which depends on the CPU) becomes a full-size difference in
    the weights. SGD's update is linear in the gradient, so the weights differ by the learning rate times the
    gradients' rounding difference on every machine; momentum keeps an optimizer state for the resume tests."""
    configure = module.configure_optimizers

    def swap(opt):
        if isinstance(opt, dict):
            out = {**opt, "optimizer": swap(opt["optimizer"])}
            sched = opt.get("lr_scheduler")
            if sched is not None:
                inner = sched["scheduler"] if isinstance(sched, dict) else sched
                new = torch.optim.lr_scheduler.LambdaLR(out["optimizer"], inner.lr_lambdas)
                out["lr_scheduler"] = {**sched, "scheduler": new} if isinstance(sched, dict) else new
            return out
        if isinstance(opt, (list, tuple)):
            return [swap(o) for o in opt]
        groups = [{"params": g["params"], "lr": lr_factor * g.get("initial_lr", g["lr"])} for g in opt.param_groups]
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)

    module.configure_optimizers = lambda: swap(configure())


class Record(L.Callback):
    """Per-rank train/ metrics of every batch, and the trainable networks' full weights at the end."""

    def __init__(self, root: Path):
        self.root, self.rows = root, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows[trainer.fit_loop.epoch_loop.total_batch_idx] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}

    def on_train_start(self, trainer, pl_module):
        self.save_weights(trainer, pl_module, "weights0.pt")

    def on_train_end(self, trainer, pl_module):
        (self.root / f"losses.rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))
        (self.root / f"skipped.rank{trainer.global_rank}.json").write_text(json.dumps(pl_module.nonfinite_guard.skipped))
        self.save_weights(trainer, pl_module, "weights.pt")

    def save_weights(self, trainer, pl_module, file: str) -> None:
        """The trainable networks' full weights (gathered under ZeRO-3), written by rank 0 to `file`."""
        weights = {}
        for name, net in pl_module.trainable_networks().items():
            with gathered_weights(net):
                weights.update({f"{name}.{k}": v.detach().clone().cpu() for k, v in net.state_dict().items()})
        if trainer.is_global_zero:
            torch.save(weights, self.root / file)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", required=True)
    p.add_argument("--teacher")
    p.add_argument("--stage", type=int, default=0, help="ZeRO stage; 0: no DeepSpeed")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="batch size per process")
    p.add_argument("--root", required=True)
    p.add_argument("--ckpt", help="resume from this checkpoint")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--offload", action="store_true", help="optimizer states (and at stage 3 weights) on CPU")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--nan-at", type=int, default=-1, help="two_networks: the batch whose loss is NaN")
    p.add_argument("--frozen-dtype", default="float32", help="onestep: dtype of the frozen teacher / LoRA base")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="sgd: SGD with momentum in place of every AdamW (the weight-equality tests, see use_sgd)")
    args = p.parse_args()

    torch.set_num_threads(1)
    from train.runtime.strategy import MultiEngineDeepSpeed

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    module, data = build(args.method, args.teacher, args.batch, args.nan_at, args.frozen_dtype)
    if args.optimizer == "sgd":
        use_sgd(module)
    strategy = MultiEngineDeepSpeed(stage=args.stage, offload_optimizer=args.offload,
                                    offload_parameters=args.offload and args.stage == 3,
                                    activation_checkpointing=args.checkpointing) if args.stage else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
                        precision=args.precision,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=str(root),
                        callbacks=[Record(root), ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1,
                                                                 save_top_k=-1, save_last=True,
                                                                 filename="{step}")])
    trainer.fit(module, data, ckpt_path=args.ckpt)


if __name__ == "__main__":
    main()
