"""OneStepDistillation's generator: its network (a full trainable copy of the teacher, or a frozen copy with trained peft
LoRA adapters: DMD2's SDXL LoRA generator, Yin et al. 2024, arXiv 2405.14867) and its k-step chain (DMD2 sec. 4.5)."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from guidance.conditions import cond_device, cond_size
from guidance.denoiser import Denoiser
from guidance.noise import standard_normal
from train.methods.guidance_distillation import LORA_TARGETS, inject_lora
from train.methods.sampling import GeneratorSampling


def generator_network(teacher_net: nn.Module, rank: int, alpha: float | None, targets: list[str] | None) -> nn.Module:
    """A deep copy of `teacher_net`: all of it trainable (rank 0), or frozen with LoRA adapters of `rank` (alpha,
    default rank) on the `targets` layers (default LORA_TARGETS) as its only trainable weights; lora_B starts at zero,
    so either starts exactly as the teacher."""
    net = copy.deepcopy(teacher_net)
    if rank == 0:
        return net.requires_grad_(True)
    net.requires_grad_(False)
    targets = list(targets or LORA_TARGETS)
    try:
        inject_lora(net, rank, alpha, targets)
    except ValueError as e:
        raise ValueError(f"LoRA generator: none of the target modules {targets} exist in the network "
                         f"({str(e).splitlines()[0][:160]}); set generator.lora_targets to names of its Linear/Conv2d "
                         f"layers") from None
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    return net


def trainable_weights(net: nn.Module) -> list[nn.Parameter]:
    """What the generator's optimizer updates: the whole copy, or the LoRA weights only."""
    return [p for p in net.parameters() if p.requires_grad]


class GeneratorChain:
    """Mixin of train.methods.onestep.OneStepDistillation (it provides generator, ema, generator_times,
    generator_steps, pg_sb_range, guidance_scale and MethodModule's per_sample, noise_like and sample_shape): sampling
    with the generator, for training updates and for generate()."""

    def sampling_denoiser(self) -> Denoiser:
        g = self.generator
        return g if self.ema is None else Denoiser(self.ema.module, g.schedule, g.parameterization, g.sigma_data)

    def run_generator(self, den: Denoiser, z: Tensor, cond: Any, last: int | None = None, grad: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
        """x0 samples [B, C, H, W] from unit noise z [B, C, H, W] after steps 0..last of the generator.

        Step 0 denoises sigma(t_0) z at t_0 (x = G(z, c): the teacher-initialised denoiser's x0-prediction);
        step j > 0 re-noises the previous x0 to t_j with fresh noise and denoises again (DMD2 sec. 4.5).
        grad: keep the graph of the last step only (earlier steps are DMD2's no-grad backward simulation).
        """
        last = self.generator_steps - 1 if last is None else last
        b = z.shape[0]
        times = self.generator_times.to(z.device, z.dtype)
        x = None
        for j in range(last + 1):
            t = times[j].expand(b)
            if j == 0:
                x_in = z * den.schedule.sigma(times[:1]).to(z)
            else:
                noise = self.noise_like(z) if generator is None else standard_normal(z.shape, generator, z.device,
                                                                                      z.dtype)
                x_in = den.schedule.add_noise(x, noise, t)
            with torch.set_grad_enabled(grad and j == last):
                x = den(x_in, t, cond).x0
        return x

    def _train_sample(self, labels: Tensor, grad: bool) -> tuple[Tensor, int]:
        """Generator samples for a training update and the step j that made them: a random step of the k-step chain
        (k = 1: the one step), from the input at time generator_times[j]."""
        z = self.per_sample(lambda n: torch.randn(n, *self.sample_shape(), device=cond_device(labels)), cond_size(labels))
        last = int(torch.randint(self.generator_steps, ())) if self.generator_steps > 1 else 0
        return self.run_generator(self.generator, z, labels, last, grad), last

    def recipe(self) -> GeneratorSampling:
        """The generator at its own times (one evaluation per step); the guidance is distilled into it."""
        den = self.sampling_denoiser()
        return GeneratorSampling(lambda z, cond, gen: self.run_generator(den, z, cond, generator=gen),
                                 self.generator_steps, None if self.pg_sb_range else float(self.guidance_scale))

    def val_sampling(self) -> dict:
        return {}
