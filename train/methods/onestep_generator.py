"""OneStepDistillation's generator network: a full trainable copy of the teacher, or a copy whose weights stay the
teacher's with trained peft LoRA adapters (DMD2's SDXL LoRA generator, Yin et al. 2024, arXiv 2405.14867)."""
from __future__ import annotations

import copy

from torch import nn

from train.methods.guidance_distillation import LORA_TARGETS, inject_lora


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
