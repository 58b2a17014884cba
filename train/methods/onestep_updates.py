"""OneStepDistillation's manual optimisation of several networks: one AdamW per trainable network, backward passes
that train only the updated network, per-network clipping and the NaN/inf policy, auxiliary optimizer steps that do
not advance the step count."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from train.runtime.nonfinite import nonfinite_gradient, nonfinite_terms
from train.runtime.optim import adamw_with_warmup


class OneStepUpdates:
    """Mixin of train.methods.onestep.OneStepDistillation (it provides generator, fake_score, disc_head, optim_args,
    lrs, _all_trainable, _generator_weights and MethodModule's NaN/inf guard)."""

    def _backward(self, terms: dict[str, Tensor], opts: list, param_groups: list[list], phase: str) -> bool:
        """Check every term, backprop their sum, clip each network's gradient; on NaN/inf apply the module's
        NaN/inf policy (train.runtime.nonfinite): False (update skipped) or a NonFiniteError."""
        bad = nonfinite_terms(terms)
        if not bad:
            for k, v in terms.items():
                self.log(f"train/{k}", v.detach(), prog_bar=k == "dmd")
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            self.manual_backward(sum(terms.values()))
            if not self.strategy_clips:  # under ZeRO the engines hold the reduced gradients, clip them and
                # skip an update whose gradient norm is NaN/inf (reported by train.runtime.strategy.EnginePrecision)
                for params in param_groups:
                    bad = bad or nonfinite_gradient(params, terms)
                    torch.nn.utils.clip_grad_norm_(params, self.optim_args.grad_clip or math.inf)
        if bad:
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            self.nonfinite_guard.handle(int(self.global_step), phase, bad)
            return False
        return True

    @contextmanager
    def _updating(self, param_groups: list[list]) -> Iterator[None]:
        """Inside the block only `param_groups` (the networks this update trains) require grad among the
        trainable weights, so a backward pass computes and reduces no gradient for the others."""
        updated = {id(p) for params in param_groups for p in params}
        frozen = [p for p in self._all_trainable if id(p) not in updated]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _aux_step(self, opt) -> None:
        """Step a fake-score / discriminator optimizer through the strategy (precision and strategy hooks
        apply) but not through its LightningOptimizer wrapper, whose step advances trainer.global_step."""
        self.trainer.strategy.optimizer_step(opt.optimizer, closure=_no_closure)

    def trainable_networks(self):
        nets = {"generator.net": self.generator.net, "fake_score.net": self.fake_score.net}
        if self.disc_head is not None:
            nets["disc_head"] = self.disc_head
        return nets

    def gradient_clip(self, name: str) -> float | None:
        return self.optim_args.grad_clip or 0.0

    def configure_optimizers(self):
        o = self.optim_args

        def adamw(params, lr):
            return adamw_with_warmup(params, lr, o.weight_decay, o.warmup_steps, tuple(o.betas))

        lr_gen, lr_fake, lr_disc = self.lrs
        out = [adamw(self._generator_weights, lr_gen), adamw(self.fake_score.trainable_parameters(), lr_fake)]
        if self.disc_head is not None:
            out.append(adamw(self.disc_head.parameters(), lr_disc))
        return out


def _no_closure() -> None:
    return None
