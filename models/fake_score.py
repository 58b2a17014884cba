"""The fake score of distribution matching: a trainable full copy of the teacher, or a LoRA (peft) on
the frozen teacher that shares its base weights (adapters off = teacher, adapters on = fake score)."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from guidance.denoiser import Denoiser
from models.frozen_dtype import run_frozen_in

FAKE_SCORE_MODES = ("lora", "copy")
# Module-name suffixes peft matches in diffusers UNets: ResNet convs and time projections, attention
# projections, the time MLP, the first/last convs and the resamplers' convs.
DEFAULT_LORA_TARGETS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0",
                        "linear_1", "linear_2", "conv_in", "conv_out", "conv")


def lora_layers(net: nn.Module) -> list[nn.Module]:
    """peft LoRA layers (BaseTunerLayer) inside `net`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_enabled(net: nn.Module, enabled: bool) -> Iterator[None]:
    """Turn every LoRA layer of `net` on or off for the block, then restore each layer's previous state.

    Flips peft's `_disable_adapters` flag directly: peft's public `enable_adapters(False)` also sets
    requires_grad False on the adapter weights (and `True` re-enables it), which would fight with the
    optimizer toggling of manual optimization on every teacher call.
    """
    layers = lora_layers(net)
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = not enabled
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b


class AdaptersOff(nn.Module):
    """A view of a LoRA-injected network that always runs with its adapters off (= the frozen base).

    The wrapped network is NOT registered as a submodule (its weights belong to the FakeScore), so
    state dicts and parameter lists hold it once. Attributes (num_classes, unet, null_cond, ...) fall
    through to the wrapped network.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        object.__setattr__(self, "_base", net)

    def forward(self, *args, **kwargs) -> Tensor:
        with adapters_enabled(self._base, False):
            return self._base(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_base"), name)


class FakeScore(Denoiser):
    """The fake score (the generator distribution's denoiser), itself a Denoiser on the teacher's schedule
    and parameterisation, and the owner of the teacher view it is compared against.

    teacher:        the frozen teacher Denoiser (its network is modified in place in LoRA mode).
    mode:           "lora": LoRA adapters injected into the teacher's network (base weights shared and
                    frozen; `self.teacher` runs with adapters off, `self` with adapters on);
                    "copy": an independent trainable deep copy of the teacher's network (DMD/DMD2).
    rank, alpha:    LoRA rank and scaling alpha (scale alpha / rank); alpha defaults to rank.
    target_modules: module-name suffixes to adapt (default: every conv/linear of a diffusers UNet).
    frozen_dtype:   dtype of the frozen weights (models.frozen_dtype.run_frozen_in): the teacher's network in
                    "copy" mode, the shared base (everything but the LoRA weights) in "lora" mode; trainable
                    weights stay float32. Default float32.
    LoRA B matrices start at zero, so the fake score starts exactly equal to the teacher in both modes.
    """

    def __init__(self, teacher: Denoiser, mode: str = "lora", rank: int = 8, alpha: float | None = None,
                 target_modules: list[str] | tuple[str, ...] | None = None, frozen_dtype: torch.dtype = torch.float32):
        if mode not in FAKE_SCORE_MODES:
            raise ValueError(f"fake score mode must be one of {', '.join(FAKE_SCORE_MODES)}, got {mode!r}")
        teacher.requires_grad_(False).eval()
        if mode == "copy":
            net = copy.deepcopy(teacher.net).requires_grad_(True)
        else:
            if rank <= 0:
                raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
            net = _inject_lora(teacher.net, rank, alpha or rank, tuple(target_modules or DEFAULT_LORA_TARGETS))
        run_frozen_in(teacher.net, frozen_dtype)  # after the copy was taken; in LoRA mode the base of `net`
        super().__init__(net, teacher.schedule, teacher.parameterization, teacher.sigma_data)
        self.mode = mode
        if mode == "copy":
            self.teacher = teacher  # registered: its frozen weights are saved with the fake score
        else:
            self.teacher = Denoiser(AdaptersOff(net), teacher.schedule, teacher.parameterization, teacher.sigma_data)
        self.train()  # applies the mode rules below to the new modules (LoRA layers, the teacher view)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the fake-score optimizer updates: the whole copy, or the LoRA weights only."""
        return [p for p in self.net.parameters() if p.requires_grad]

    @contextmanager
    def adapters(self, enabled: bool) -> Iterator[None]:
        """LoRA mode: run the block with the adapters on (fake score) or off (teacher). No-op for a copy."""
        if self.mode == "copy":
            yield
            return
        with adapters_enabled(self.net, enabled):
            yield

    def train(self, mode: bool = True) -> "FakeScore":
        super().train(mode)
        self.teacher.eval()  # the frozen teacher never leaves eval mode
        if self.mode == "lora":
            self.net.eval()  # shared with the teacher, so it stays in eval mode (LoRA trains fine in eval mode)
        return self


def _inject_lora(net: nn.Module, rank: int, alpha: float, targets: tuple[str, ...]) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    try:
        net = inject_adapter_in_model(config, net)
    except ValueError as e:
        raise ValueError(f"LoRA fake score: none of the target modules {list(targets)} exist in the network "
                         f"({str(e).splitlines()[0][:160]}); set lora_targets to names of its Linear/Conv2d layers") from None
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    return net
