"""The guidance-scale embedding: a w-conditioned student network initialised to equal its teacher exactly.

Meng et al. 2023 ("On Distillation of Guided Diffusion Models", arXiv 2210.03142, sec. 4.1) feed the
guidance scale w to the student through "a Fourier embedding of w, added to the time embedding", the
way the timestep is embedded (Ho et al. 2020). Here the embedding ends in a ZERO-initialised linear
projection, so at initialisation the added term is exactly 0.0 and the student's output equals the
teacher's bit for bit (x + 0.0 == x for every float); training then only has to learn the guidance.

How w enters a diffusers UNet (UNet2DModel, UNet2DConditionModel): their forward computes
`emb = unet.time_embedding(time_proj(t))` and then adds the class/text embeddings to `emb`. A forward
hook on `unet.time_embedding` adds w_mlp(sinusoidal(w)) to that output [B, D]; the wrapper sets the
per-batch w embedding just before calling the UNet and clears it right after. The UNet itself is left
untouched, so its weights still load into a plain diffusers model, and the w-embedding weights live
beside it (`w_embedding.*`), described by `describe()["w_embedding"]` for export.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from guidance.guided import GuidedDenoiser
from guidance.guiders import Conditional, Guider
from models.adapters import ConditionalNetwork


def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[B] -> [B, dim] float32: [cos(x f_i), sin(x f_i)], f_i = max_period^(-i / (dim/2)), i < dim/2
    (the transformer position code of Vaswani et al. 2017, as used for diffusion times by Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


class GuidanceScaleEmbedding(nn.Module):
    """w [B] -> [B, out_dim]: Linear(SiLU(Linear(sinusoidal(w * w_scale)))), last projection zero-initialised.

    embed_dim:  size of the sinusoidal code of w.
    out_dim:    size of the network's time embedding (the vector the result is added to).
    hidden_dim: width of the MLP (defaults to out_dim).
    w_scale:    w is multiplied by this before the sinusoidal code, so the scales of interest (w ~ 0..15)
                spread over the same range of phases as diffusion timesteps (0..1000); LCM uses 1000 too.
    """

    def __init__(self, embed_dim: int, out_dim: int, hidden_dim: int | None = None, w_scale: float = 1000.0):
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.embed_dim, self.out_dim, self.hidden_dim, self.w_scale = embed_dim, out_dim, hidden_dim, w_scale
        self.linear_1 = nn.Linear(embed_dim, hidden_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_dim, out_dim)
        nn.init.zeros_(self.linear_2.weight)  # zero init: the student starts as the teacher (Meng et al. sec. 4.1)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, w: Tensor) -> Tensor:
        h = sinusoidal_embedding(w * self.w_scale, self.embed_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(h)))


def time_embedding_of(base: nn.Module) -> tuple[str, nn.Module, nn.Module]:
    """(name, module, its timestep MLP) of the module whose output [B, D] is the network's time embedding:
    `unet.time_embedding` of diffusers UNets (a TimestepEmbedding), else `unet.time_text_embed` of the SD3 / Flux
    transformers (timestep + pooled text (+ Flux guidance) embedding, summed into the vector that modulates every
    block, so a term added to its output enters exactly as one added to the timestep embedding)."""
    unet = getattr(base, "unet", None)
    for name in ("time_embedding", "time_text_embed"):
        module = getattr(unet, name, None)
        mlp = module if name == "time_embedding" else getattr(module, "timestep_embedder", None)
        if module is not None and hasattr(mlp, "linear_1") and hasattr(mlp, "linear_2"):
            return f"unet.{name}", module, mlp
    raise ValueError(f"WConditionedNetwork needs a network with a diffusers model at `.unet` that has a "
                     f"`time_embedding` (UNet2DModel, UNet2DConditionModel) or a `time_text_embed` (SD3, Flux "
                     f"transformers); {type(base).__name__} has neither")


class WConditionedNetwork(ConditionalNetwork):
    """A ConditionalNetwork that also takes the guidance scale w: net(x, t, {"cond": c, "w": w}) -> raw output.

    base:       the network to extend (a ConditionalNetwork with a diffusers model at `.unet`, e.g.
                models.adapters.ClassConditionalUNet, models.text_unet.TextConditionalUNet or the SD3 / Flux
                adapters, see time_embedding_of); it is used as given, so pass a copy of the teacher.
    embed_dim:  size of the sinusoidal code of w (default: the UNet's timestep-projection size,
                block_out_channels[0]).
    hidden_dim: width of the w MLP (default: the time-embedding size).
    w_scale:    see GuidanceScaleEmbedding.

    cond: {"cond": the base network's condition (e.g. labels [B], -1 = null), "w": scales [B] float}.
    `null_cond` nulls the base condition and keeps w, so an unconditional branch of a guider still sees the
    scale. w follows this project's CFG convention (D_u + w (D_c - D_u), w = 1 conditional).
    """

    def __init__(self, base: ConditionalNetwork, embed_dim: int | None = None, hidden_dim: int | None = None,
                 w_scale: float = 1000.0):
        super().__init__()
        self.hooked, hooked, timestep_mlp = time_embedding_of(base)
        out_dim = timestep_mlp.linear_2.out_features
        embed_dim = embed_dim or timestep_mlp.linear_1.in_features
        self.base = base
        self.w_embedding = GuidanceScaleEmbedding(embed_dim, out_dim, hidden_dim, w_scale)
        self._pending: Tensor | None = None  # w embedding of the current forward, read by the hook
        hooked.register_forward_hook(self._add_w_embedding)

    # The hook is a bound method, so `copy.deepcopy(wrapper)` (EMA, frozen round teachers) re-binds it to the copy.
    def _add_w_embedding(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if self._pending is None:
            raise RuntimeError("the UNet of a WConditionedNetwork was called directly; call the wrapper with "
                               "cond={'cond': ..., 'w': ...}")
        return output + self._pending.to(output.dtype)  # Meng et al. sec. 4.1: w embedding added to the time embedding

    @property
    def unet(self) -> nn.Module:
        return self.base.unet

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    # what the wrapped adapter is: its conditioner, sample shape, folders and discriminator tap
    @property
    def conditioner(self):
        return self.base.conditioner

    @property
    def pretrained(self) -> str | None:
        return self.base.pretrained

    @property
    def vae_folder(self) -> str | None:
        return self.base.vae_folder

    @property
    def feature_layer(self) -> str:
        return f"base.{self.base.feature_layer}"

    def sample_shape(self) -> tuple[int, int, int]:
        return self.base.sample_shape()

    def forward(self, x: Tensor, t: Tensor, cond: dict, **kwargs) -> Tensor:
        w = torch.as_tensor(cond["w"], device=x.device, dtype=torch.float32)
        w = w.expand(x.shape[0]) if w.ndim == 0 else w
        self._pending = self.w_embedding(w)
        try:
            return self.base(x, t, cond["cond"], **kwargs)
        finally:
            self._pending = None

    def null_cond(self, cond: dict) -> dict:
        return {"cond": self.base.null_cond(cond["cond"]), "w": cond["w"]}

    def drop_cond(self, cond: dict, p: float, generator: torch.Generator | None = None, u: Tensor | None = None) -> dict:
        return {"cond": self.base.drop_cond(cond["cond"], p, generator, u), "w": cond["w"]}

    # --- export: the base's files plus w_embedding/ (models.diffusers_export.save_w_embedding) ---------------------
    def save_diffusers(self, folder: Path, schedule, parameterization: str, sampling: dict | None = None) -> dict:
        """The base network's diffusers export (its weights alone sample as if w's term were zero) + w_embedding/."""
        return self._with_w_embedding(folder, self.base.save_diffusers(folder, schedule, parameterization, sampling))

    def save_lora(self, folder: Path, schedule, parameterization: str, base_checkpoint: str | None = None,
                  sampling: dict | None = None) -> dict:
        """The base network's LoRA export + w_embedding/ (no LoRA loader has a place for a new embedding)."""
        return self._with_w_embedding(folder, self.base.save_lora(folder, schedule, parameterization, base_checkpoint,
                                                                  sampling))

    def card_code(self, meta: dict) -> str:
        """The base's card code; meta["w_embedding"] makes it add the w-embedding's forward hook."""
        return self.base.card_code(meta)

    def _with_w_embedding(self, folder: Path, info: dict) -> dict:
        from models.diffusers_export import save_w_embedding

        hooked = f"{info['network']}.{self.hooked.split('.', 1)[1]}"  # e.g. pipe.unet.time_embedding
        save_w_embedding(self.w_embedding, folder / "w_embedding", f"the output of {hooked}")
        why = self.base.W_EMBEDDING_NOTE.format(cls=self.base.describe()["diffusers_class"], hooked=hooked)
        return {**info, "contents": f"{info['contents']} `w_embedding/`: the student's guidance-scale embedding.",
                "w_embedding": {**self.describe()["w_embedding"], "in_unet": False,
                                "weights": "w_embedding/ (diffusers TimestepEmbedding weights)", "why": why}}

    def describe(self) -> dict:
        e = self.w_embedding
        return {**self.base.describe(), "w_embedding": {
            "embed_dim": e.embed_dim, "hidden_dim": e.hidden_dim, "out_dim": e.out_dim, "w_scale": e.w_scale,
            "code": "sinusoidal [cos, sin], max_period 10000", "mlp": "linear_1 -> SiLU -> linear_2",
            "added_to": f"{self.hooked} output", "condition_keys": ["cond", "w"],
            "w_convention": "D_u + w (D_c - D_u)"}}


class WInputGuided(GuidedDenoiser):
    """A guided denoiser for w-conditioned students: the scale w is an INPUT of the network, not a rule.

    `guide(x_t, t, cond, w)` passes {"cond": cond, "w": w} to the network; with the default guider
    ("conditional") that is ONE network evaluation per step, so `guidance.samplers.sample` and
    `guidance.guided.teacher_target` work unchanged on a student (nfe per sample == steps).
    """

    def __init__(self, denoiser, guider: Guider | None = None):
        super().__init__(denoiser, guider or Conditional())

    def guide(self, x_t: Tensor, t: Tensor, cond: Any, w: Tensor | float, neg_cond: Any = None, state: Any = None):
        w_vec = torch.as_tensor(w, dtype=torch.promote_types(x_t.dtype, torch.float32), device=x_t.device)
        w_vec = w_vec.expand(x_t.shape[0]) if w_vec.ndim == 0 else w_vec
        return super().guide(x_t, t, {"cond": cond, "w": w_vec}, w, neg_cond, state)
