"""Concept erasure on text-to-image models: ESD / erase-toward with prompts from a concept spec (data.concepts),
cross-attention-only fine-tuning (ESD-x), anchor and unconditional preservation, x_t from the frozen model's
own trajectories."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from data.concepts import ConceptSet, load_concepts, parse_concepts
from guidance.conditions import cond_cat
from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser
from guidance.guiders import CFG
from losses.erasure import esd_target, preservation_target, regression_loss, toward_target
from models.adapters import NULL_LABEL, ConditionalNetwork
from train.methods.erasure import TrajectoryBank
from train.methods.erasure_base import ErasureMethod

TEXT_SELECTIONS = ("esd-x", "esd-u", "all", "lora")


class PromptTable(ConditionalNetwork):
    """A text network behind integer prompt ids: net(x, t, ids [B]) = text_net(x, t, cond of prompts[ids]), id -1 =
    the null text. It lets the class-id machinery (TrajectoryBank, the erasure targets' guided denoisers, which
    build the null branch with null_cond) run on prompts. `table`: the encoded prompts {key: [P, ...]}.
    The wrapped network is held outside the module tree (no weight registered twice)."""

    def __init__(self, net: ConditionalNetwork, table: dict[str, Tensor]):
        super().__init__()
        object.__setattr__(self, "text_net", net)
        self.table = table

    def lookup(self, ids: Tensor) -> dict[str, Tensor]:
        """Text condition dict [B, ...] of prompt ids [B] (-1: the null text; other entries, e.g. Flux's
        guidance, kept)."""
        cond = {k: v.to(ids.device)[ids.clamp(min=0)] for k, v in self.table.items()}
        if not bool((ids < 0).any()):
            return cond
        null = self.text_net.null_cond(cond)
        drop = ids < 0
        return {k: torch.where(drop.reshape(-1, *[1] * (v.ndim - 1)), null[k].to(v), v) if k in null else v
                for k, v in cond.items()}

    def forward(self, x: Tensor, t: Tensor, ids: Tensor, **kwargs) -> Tensor:
        return self.text_net(x, t, self.lookup(ids), **kwargs)

    def null_cond(self, ids: Tensor) -> Tensor:
        return torch.full_like(ids, NULL_LABEL)


class TextConceptErasure(ErasureMethod):
    """Concept erasure of a text-to-image model (ESD, Gandikota et al. 2023, arXiv 2303.07345): the student (a
    copy of the frozen model) regresses, for an erased prompt c, the frozen model guided at w = -eta (Eq. 6; or
    toward the concept's `alternative` prompt, All but One, arXiv 2312.12807), at x_t from the frozen model's own
    DDIM trajectories for c (ESD sec. 4); anchor prompts and the null prompt keep their frozen predictions
    (SPM anchoring, arXiv 2312.16145 sec. 3.3).

    Randomness: the erased prompt of a step is one draw shared by every process; the anchor prompts, times and
    trajectories are drawn per sample through MethodModule.per_sample (for the global batch, this process's rows),
    so a run on W processes x batch_size equals one process x W batch_size, draw for draw.

    model:            a pipeline folder in diffusers layout (or a text teacher checkpoint) to erase.
    concepts:         a concept spec (data.concepts): a YAML file path or the mapping itself
                      ({concepts: [{name, prompts, alternative}], anchors: [...]}).
    eta:              ESD negative-guidance strength (w = -eta).
    params:           esd-x (cross-attention only: `attn2` of a UNet, the text-stream attention projections of an
                      MMDiT; ESD-x, erasure tied to the prompt), esd-u (everything else), all, or lora (adapters
                      of rank lora_rank on every linear/conv layer).
    anchor_weight, uncond_weight: weights of the anchor and null-prompt preservation terms (0 = off).
    batch_size:       samples per term per step.
    trajectory_steps, trajectory_scale, bank_size: DDIM steps and CFG scale of the frozen trajectories x_t comes
                      from, trajectories kept per prompt.
    loss_space:       space of the regression (eps as ESD, x0, v, flow); None: the network's parameterisation.
    lr, weight_decay, warmup_steps: AdamW; ema_decay: EMA of the student used for sampling (0: off).
    model_config:     the frozen model's config, filled in automatically (the erased checkpoint rebuilds from it).
    nonfinite, max_skips: the NaN/inf policy (train.runtime.nonfinite).
    """

    method_name = "erasure"

    def __init__(self, model: str, concepts: str | dict, eta: float = 1.0, params: str = "esd-x",
                 anchor_weight: float = 1.0, uncond_weight: float = 0.0, batch_size: int = 1,
                 trajectory_steps: int = 50, trajectory_scale: float = 3.0, bank_size: int = 8,
                 loss_space: str | None = None, lora_rank: int = 1,
                 lora_alpha: float | None = None, lr: float = 1e-5, weight_decay: float = 0.0, warmup_steps: int = 0,
                 ema_decay: float = 0.0, val_scale: float = 3.0, val_steps: int = 20, val_samples: int = 0,
                 model_config: dict | None = None, nonfinite: str = "skip", max_skips: int = 10):
        super().__init__(nonfinite, max_skips)
        self.save_hyperparameters()
        if params not in TEXT_SELECTIONS:
            raise ValueError(f"params must be one of {', '.join(TEXT_SELECTIONS)}, got {params!r}")
        if eta < 0 or batch_size <= 0:
            raise ValueError(f"eta must be >= 0 and batch_size positive, got eta={eta}, batch_size={batch_size}")
        self.spec: ConceptSet = load_concepts(concepts) if isinstance(concepts, str) else parse_concepts(concepts)
        frozen = self._load_frozen(model, model_config)
        if getattr(frozen.net, "pretrained", None) is None:
            raise ValueError(f"{model!r} is not a text model loaded from a pipeline folder; erase class-conditional "
                             f"models with train.methods.erasure.ConceptErasure")
        self._make_student(frozen, params, lora_rank, lora_alpha, ema_decay)
        self.eta, self.anchor_weight, self.uncond_weight, self.batch_size = eta, anchor_weight, uncond_weight, batch_size
        self.space = loss_space or frozen.parameterization
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.val_scale, self.val_steps, self.val_samples = val_scale, val_steps, val_samples
        self._encode_prompts()
        self._bank_args = (trajectory_steps, trajectory_scale, bank_size)
        self.bank: TrajectoryBank | None = None

    def _encode_prompts(self) -> None:
        """Every prompt of the spec (erased, alternatives, anchors) encoded once, as non-persistent buffers."""
        self.prompts = list(dict.fromkeys([*self.spec.erased_prompts, *(c.alternative for c in self.spec.concepts
                                                                          if c.alternative), *self.spec.anchors]))
        table = self.encode(self.prompts, device="cpu")
        self._table_keys = list(table)
        for k, v in table.items():
            self.register_buffer(f"prompt_{k}", v.detach().cpu(), persistent=False)
        index = {p: i for i, p in enumerate(self.prompts)}
        # per erased prompt: its id and its concept's alternative id (-1: ESD's null target)
        self.erased = [(index[p], index[c.alternative] if c.alternative else NULL_LABEL)
                       for c in self.spec.concepts for p in c.prompts]
        self.anchor_ids = [index[a] for a in self.spec.anchors]

    def table(self) -> dict[str, Tensor]:
        return {k: getattr(self, f"prompt_{k}") for k in self._table_keys}

    def _by_id(self, den: Denoiser) -> Denoiser:
        """`den` taking prompt ids (PromptTable) instead of text condition dicts."""
        return Denoiser(PromptTable(den.net, self.table()), den.schedule, den.parameterization, den.sigma_data)

    # --- x_t, targets, losses ---------------------------------------------------------------------
    def _bank(self) -> TrajectoryBank:
        if self.bank is None:
            self.bank = TrajectoryBank(GuidedDenoiser(self._by_id(self.frozen), CFG()), self.sample_shape(),
                                       *self._bank_args)
        return self.bank

    def _groups(self, generator=None) -> list[tuple[str, Tensor, Tensor, Tensor, Tensor | None]]:
        """(term, x_t, t, prompt ids, alternative ids or None) per loss term; one erased prompt per step (the same
        on every process), anchors, t and trajectories per sample (MethodModule.per_sample)."""
        n, dev = self.batch_size, self.device
        k = int(torch.randint(0, len(self.erased), (1,), generator=generator))
        erased, alt = (torch.full((n,), i, device=dev) for i in self.erased[k])
        wanted: list[tuple[str, Tensor, Tensor | None]] = [("erase", erased, alt)]
        if self.anchor_ids and self.anchor_weight > 0:
            pick = self.per_sample(lambda m: torch.randint(0, len(self.anchor_ids), (m,), generator=generator), n)
            wanted.append(("anchor", torch.tensor(self.anchor_ids)[pick].to(dev), None))
        if self.uncond_weight > 0:
            wanted.append(("uncond", torch.full((n,), NULL_LABEL, device=dev), None))
        return [(term, *self._bank().draw(ids, generator, self.per_sample), ids, alt) for term, ids, alt in wanted]

    def _target(self, term: str, x_t: Tensor, t: Tensor, ids: Tensor, alt: Tensor | None) -> Tensor:
        frozen = self._by_id(self.frozen)
        if term != "erase":
            return preservation_target(frozen, x_t, t, ids, self.space)
        if bool((alt >= 0).all()):  # erase toward the concept's alternative prompt
            return toward_target(frozen, x_t, t, alt, 1.0, self.space)
        return esd_target(frozen, x_t, t, ids, self.eta, self.space)  # ESD Eq. 6

    def losses(self, batch: Any = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Mean regression loss per term ('erase', 'anchor', 'uncond'); one student forward for all terms. batch: the
        step index of data.steps.ErasureSteps, unused (x_t comes from the frozen model's trajectories)."""
        groups = self._groups(generator)
        x_t, t = torch.cat([g[1] for g in groups]), torch.cat([g[2] for g in groups])
        pred = self._by_id(self.student)(x_t, t, cond_cat([g[3] for g in groups])).read(self.space)
        out, i = {}, 0
        for term, xg, tg, ids, alt in groups:
            out[term] = regression_loss(pred[i:i + len(xg)], self._target(term, xg, tg, ids, alt)).mean()
            i += len(xg)
        return out
