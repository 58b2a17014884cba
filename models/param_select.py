"""Which parameters a fine-tuning updates: ESD-x / ESD-u / all, LoRA adapters (peft) and SalUn saliency masks.

ESD (Gandikota et al. 2023, arXiv 2303.07345, sec. 4) trains either the cross-attention layers only (ESD-x,
erasure tied to the prompt) or everything else (ESD-u, erasure of the concept from the whole model).
A class-conditional UNet (models.adapters.ClassConditionalUNet) has no cross-attention: its condition enters
only through the class embedding `unet.class_embedding` (one row per class, the last row the null class),
so that embedding plays the cross-attention role here: ESD-x trains it alone, ESD-u everything but it.
Text-conditioned diffusers UNets name their cross-attention `attn2`; SD3 / Flux transformers have joint attention
whose text-stream projections (`add_q_proj`, `add_k_proj`, `add_v_proj`, `to_add_out`) play that role.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

SELECTIONS = ("esd-x", "esd-u", "all", "lora")


MMDIT_TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def conditioning_parameter_names(net: nn.Module) -> list[str]:
    """Names of the parameters through which the condition enters `net`: the class embedding of a
    class-conditional UNet, else the cross-attention (`attn2`) of a text-conditioned one, else the text-stream
    projections of an MMDiT's joint attention (SD3 / Flux: the text tokens' queries, keys, values and output,
    the counterpart of cross-attention there, since image queries attend to text keys and values)."""
    names = [n for n, _ in net.named_parameters()]
    found = [n for n in names if ".class_embedding." in f".{n}"]
    if not found:
        found = [n for n in names if ".attn2." in f".{n}"]
    if not found:  # MMDiT (SD3, Flux): joint attention; the text stream's projections are where the prompt enters
        found = [n for n in names if any(f".attn.{k}." in f".{n}" for k in MMDIT_TEXT_PROJECTIONS)]
    if not found:
        raise ValueError(f"{type(net).__name__} has neither a class embedding (`class_embedding`), cross-attention "
                         f"(`attn2`) nor joint-attention text projections (`attn.add_k_proj`, ...), so ESD-x / ESD-u "
                         f"are undefined for it; use params='all' or 'lora'")
    return found


def select_parameters(net: nn.Module, mode: str) -> list[str]:
    """Set requires_grad on `net` for selection `mode` and return the trainable names, in order.

    esd-x: conditioning parameters only (`conditioning_parameter_names`); esd-u: every other parameter;
    all: everything. (LoRA is `add_lora`, which adds its own parameters.)
    """
    if mode not in ("esd-x", "esd-u", "all"):
        raise ValueError(f"unknown parameter selection {mode!r}; choose one of {', '.join(SELECTIONS)}")
    cond = set(conditioning_parameter_names(net)) if mode != "all" else set()
    keep = {"esd-x": lambda n: n in cond, "esd-u": lambda n: n not in cond, "all": lambda n: True}[mode]
    for n, p in net.named_parameters():
        p.requires_grad_(keep(n))
    return [n for n, p in net.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------- LoRA (peft)

def _lora_root(net: nn.Module) -> nn.Module:
    """The diffusers model inside an adapter (`net.unet`), else `net` itself."""
    return getattr(net, "unet", net)


def lora_target_modules(net: nn.Module) -> list[str]:
    """Names (relative to the diffusers model) of every nn.Linear and nn.Conv2d: where LoRA goes by default."""
    return [n for n, m in _lora_root(net).named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


def add_lora(net: nn.Module, rank: int = 1, alpha: float | None = None, targets: list[str] | None = None,
             dropout: float = 0.0) -> list[str]:
    """Inject LoRA adapters (Hu et al. 2022, arXiv 2106.09685: W + (alpha / r) B A, B zero-initialised) into the
    diffusers model of `net` with peft, freeze everything else, and return the trainable names.

    rank 1 gives SPM's one-dimensional adapters (Lyu et al. 2024, arXiv 2312.16145, sec. 3.2).
    alpha: LoRA scaling numerator (default = rank, i.e. scale 1); targets: module names relative to the
    diffusers model (default `lora_target_modules`: all linear and conv layers); dropout: LoRA dropout.
    The base weights move to `<module>.base_layer.weight`, so a checkpoint of a LoRA'd network rebuilds by
    calling add_lora again with the same arguments before loading.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = lora_target_modules(net) if targets is None else list(targets)
    if not targets:
        raise ValueError(f"{type(net).__name__} has no linear or conv layers to put LoRA adapters on; pass targets=")
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=targets)
    for p in net.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, _lora_root(net))
    return [n for n, p in net.named_parameters() if p.requires_grad]


def lora_layers(net: nn.Module) -> list[nn.Module]:
    """The peft tuner layers inside `net`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


def set_adapters(net: nn.Module, enabled: bool) -> None:
    """Switch every LoRA adapter of `net` on or off (off: exactly the base network)."""
    layers = lora_layers(net)
    if not layers:
        raise ValueError(f"{type(net).__name__} has no LoRA adapters; add them with add_lora first")
    for m in layers:
        m.enable_adapters(enabled)


@contextlib.contextmanager
def adapters_disabled(net: nn.Module) -> Iterator[nn.Module]:
    """Context in which `net` runs as its base network (adapters off); they are switched back on after."""
    set_adapters(net, False)
    try:
        yield net
    finally:
        set_adapters(net, True)


def merge_lora(net: nn.Module) -> nn.Module:
    """A copy of `net` with every LoRA adapter merged into its base weight (W + (alpha / r) B A) and the peft
    wrappers removed: a plain network with the original parameter names (what a diffusers export writes)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    net = copy.deepcopy(net)
    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
    return net


def lora_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The adapter weights in peft's format (`get_peft_model_state_dict`), keys relative to the diffusers model."""
    return lora_adapter(net)[1]


def lora_adapter(net: nn.Module) -> tuple:
    """(LoraConfig, weights) of the adapter in `net`, as peft saves them for the diffusers model `net.unet`:
    keys such as 'down_blocks.0.resnets.0.conv1.lora_A.weight', so that `set_peft_model_state_dict` or
    `PeftModel.from_pretrained` puts them onto a plain copy of that model. Works wherever the adapters were
    injected (on the diffusers model, as `add_lora` does, or on a wrapper around it)."""
    from peft import get_peft_model_state_dict

    root = _lora_root(net)
    owner = next((m for m in net.modules() if getattr(m, "peft_config", None)), None)
    prefix = next((n for n, m in owner.named_modules() if m is root), None) if owner is not None else None
    if owner is None or prefix is None or not lora_layers(root):
        raise ValueError(f"{type(net).__name__} has no LoRA adapters on its diffusers model; train with LoRA "
                         f"(params: lora, lora_rank > 0) or export the whole network instead")
    prefix = f"{prefix}." if prefix else ""
    state = get_peft_model_state_dict(owner)
    return owner.peft_config["default"], {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------- SalUn saliency

def saliency_masks(grads: list[Tensor], top_k: float) -> list[Tensor]:
    """SalUn's weight saliency map (Fan et al. 2024, arXiv 2310.12508, Eq. 6, m = 1(|g| >= gamma)) with gamma
    chosen so that exactly round(top_k * N) of the N entries are kept: the largest |g| over ALL tensors
    together (one global threshold, as the paper's top-k% masks). grads: tensors of any shapes; returns bool
    masks of the same shapes. Ties at the threshold are broken by position, so the count is exact."""
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"saliency top_k is a fraction in (0, 1], got {top_k}")
    flat = torch.cat([g.detach().abs().flatten().float() for g in grads])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, round(top_k * flat.numel()), sorted=False).indices] = True
    return [m.view_as(g) for m, g in zip(keep.split([g.numel() for g in grads]), grads)]


class SaliencyMask(nn.Module):
    """Gradient mask over a list of parameters: after `fit`, `attach` registers hooks that multiply each
    parameter's gradient by its mask, so only the salient weights change (SalUn, arXiv 2310.12508, Eq. 7).

    params: the trainable parameters (the hooks find them by position). Masks are bool buffers `mask_<i>`
    saved with the module, plus `fitted`, so a resumed run keeps the mask it started with. Use an optimizer
    without decoupled weight decay (masked weights get zero gradients, but AdamW would still decay them).
    """

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self._params = list(params)  # plain list: the parameters belong to the network, not to this module
        self._hooks: list = []
        for i, p in enumerate(self._params):
            self.register_buffer(f"mask_{i}", torch.zeros(p.shape, dtype=torch.bool, device=p.device))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def masks(self) -> list[Tensor]:
        return [getattr(self, f"mask_{i}") for i in range(len(self._params))]

    @torch.no_grad()
    def fit(self, grads: list[Tensor], top_k: float) -> None:
        """Set the masks from gradients of the forgetting loss (one per parameter, in order)."""
        if len(grads) != len(self._params):
            raise ValueError(f"got {len(grads)} gradients for {len(self._params)} parameters")
        for m, k in zip(self.masks(), saliency_masks(grads, top_k)):
            m.copy_(k)
        self.fitted.fill_(True)

    def attach(self) -> None:
        """Register the gradient hooks (idempotent). The mask is looked up at call time, so moving the module
        to another device keeps the hooks valid."""
        self.detach()
        for i, p in enumerate(self._params):
            self._hooks.append(p.register_hook(lambda g, i=i: g * getattr(self, f"mask_{i}").to(g.dtype)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def fraction(self) -> float:
        """Fraction of the entries kept."""
        ms = self.masks()
        return sum(int(m.sum()) for m in ms) / max(1, sum(m.numel() for m in ms))
