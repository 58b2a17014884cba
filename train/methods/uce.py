"""Closed-form concept erasure: Unified Concept Editing (UCE, Gandikota et al. 2024, arXiv 2308.14761) edits the
linear maps through which prompts enter a text-to-image network (a UNet's cross-attention keys and values, an MMDiT's
text projections) in one least-squares solve each (losses.uce), with no training loop: seconds instead of an hour,
LoRA-free, exported like the other erased models."""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from guidance.denoiser import Denoiser
from losses.uce import uce_weight
from models.conditioning import Conditioner
from train.methods.base import MethodModule
from train.methods.erasure_concepts import ErasureConcepts, load_prompt_model, resolve_concepts

Rows = Callable[[Sequence[str]], list[Tensor]]  # prompts -> one [k, D] block per prompt: the embeddings a layer reads
MMDIT_TOKENS, MMDIT_POOLED = "context_embedder", "time_text_embed.text_embedder.linear_1"
TOKEN_ROWS = ("last_word", "from_last_word")


def uce_projections(net: nn.Module, conditioner: Conditioner,
                    token_rows: str = "last_word") -> dict[str, tuple[nn.Linear, Rows]]:
    """{name: (layer, rows)}: the linear layers of `net` that UCE edits and, for each, the function giving the
    embeddings (its input rows c, one [k, D] block per prompt) of a list of prompts, from `conditioner`'s encoder.

    UCE's closed form (losses.uce, Eq. 7) pins W c for fixed inputs c, so it is exact for a linear map whose input is
    a function of the prompt alone (not of the timestep or the image): then the edited output at each erased and
    preserved embedding holds at every step and in every block.

    - UNet (SD 1.x/2.x, SDXL): every cross-attention key and value projection (attn2.to_k, attn2.to_v) reads the text
      encoder's output directly; rows (`token_rows`):
        "last_word": each prompt's last-word token (k = 1), as the authors' current code selects both
          (trainscripts/uce_sd_erase.py);
        "from_last_word": the last-word token and every position after it, the end-of-text token and the padding up
          to the encoder's length (PromptEncoder.from_last_word_embeddings; k = L - last-word position), as the
          original release did (train-scripts/train_erase.py, edit_model). CLIP is causal, so those states carry
          the whole prompt, and cross-attention reads the concept from them too (MACE, Lu et al. 2024, arXiv
          2403.06135, closed-form cross-attention refinement, pins the tokens after the concept word for the same
          reason): the last word alone leaves it there. An erased row is paired with its guide's row at the same
          offset from the guide's last word (the empty prompt's "last word" is its start token), the longer of the
          two blocks truncated to the shorter (`ClosedFormErasure.embeddings`); every anchor row is preserved.
    - MMDiT (SD3/3.5, Flux; found by its `context_embedder`): the text tokens pass through `context_embedder` and then,
      in every block, the timestep-modulated norm1_context (and, after the first block, joint attention with the
      image tokens) before add_k_proj / add_v_proj, whose inputs therefore have no fixed c to solve for. The maps
      whose input is fixed per prompt are the two first ones, which this edits:
        `context_embedder` (token embeddings -> text stream): rows = the last-word token of each token stream
          (PromptEncoder.last_word_positions): T5's for Flux; CLIP's and T5's for SD3, whose joint sequence is CLIP's
          tokens zero-padded to T5's width followed by T5's, both through this one map (two rows per prompt, one
          without T5). T5's last word is the token before </s>, as in the authors' Flux script
          (trainscripts/uce_flux_edit.py); T5's encoder is bidirectional, so that token's embedding depends on the
          whole prompt, like CLIP's causal last word. One row per prompt and stream pairs each erased row with its
          guide's whatever their token counts (all of a concept's tokens would have no row-wise guide).
        `time_text_embed.text_embedder.linear_1` (pooled embedding -> added to the timestep embedding, which drives
          every block's adaptive-norm shift, scale and gate): rows = the pooled embedding. Erasure needs it: Flux's
          CLIP reaches the network only there, and SD3's pooled CLIP-L/G projections modulate every block, so a
          concept left in it survives an edit of the tokens alone. The authors' Flux script edits exactly these two
          layers; they publish none for SD3, whose same two layers play the same roles.
      Both layers have a bias b; it cancels in UCE's terms (W c + b = W_old g + b), so the weight alone is edited and b
      kept. SD3.5's dual-attention blocks have attn2.to_k / to_v of image self-attention: an MMDiT is never edited
      through attn2 names. token_rows "from_last_word" is refused here: T5's tokens are bidirectional, so its end and
      padding tokens are no summary of the prompt that other tokens are not (and SD3 would mix the two rules).

    Only the given rows are pinned: every other input x (a prompt's other tokens, padding) moves by
    (W - W_old) x = erase_scale sum_i (W_old g_i - W_old c_i) c_i^T G^-1 x (G the solve's Gram matrix), which is zero
    for x G^-1-orthogonal to every erased row. A network with none of these layers is refused in one line."""
    if token_rows not in TOKEN_ROWS:
        raise ValueError(f"token_rows must be one of {', '.join(TOKEN_ROWS)}, got {token_rows!r}")

    def tokens(prompts: Sequence[str]) -> list[Tensor]:
        if token_rows == "from_last_word":
            return conditioner.encoder.from_last_word_embeddings(prompts)
        return list(conditioner.encoder.last_word_embeddings(prompts))

    def pooled(prompts: Sequence[str]) -> list[Tensor]:
        return list(conditioner.encoder.encode(prompts)["pooled_projections"][:, None])

    linear = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    if any(n.endswith(MMDIT_TOKENS) for n in linear):
        if token_rows != "last_word":
            raise ValueError(f"token_rows {token_rows!r} is for a UNet's causal CLIP tokens; an MMDiT's "
                             f"context_embedder reads T5's bidirectional tokens (SD3, Flux): use token_rows: last_word")
        return {n: (m, tokens if n.endswith(MMDIT_TOKENS) else pooled) for n, m in linear.items()
                if n.endswith((MMDIT_TOKENS, MMDIT_POOLED))}
    unet = {n: (m, tokens) for n, m in linear.items() if ".attn2." in f".{n}" and n.endswith(("to_k", "to_v"))}
    if not unet:
        raise ValueError("UCE edits the linear maps prompts enter through: a text UNet's cross-attention attn2.to_k / "
                         "to_v (SD 1.x/2.x, SDXL) or an MMDiT's context_embedder and pooled text projection (SD3, "
                         "Flux); this network has none: use train.methods.erasure.ConceptErasure")
    return unet


class ClosedFormErasure(MethodModule):
    """UCE: the student is a copy of the model whose text-reading projections (`uce_projections`: a UNet's
    cross-attention to_k / to_v, an MMDiT's context_embedder and pooled text projection) get UCE's closed-form
    weights (losses.uce.uce_weight) once, at the run's single step (trainer.max_steps: 1), so the checkpoint, `sample`,
    `evaluate` and `export` treat it as any erased model. Several concepts are erased in the same solve.

    model:          the model to edit: a diffusers pipeline folder of SD 1.x/2.x, SDXL, SD3/3.5 or Flux, or a text
                    teacher checkpoint of one.
    concepts:       what to erase, as for ConceptErasure (data.concepts: a spec path or mapping, or a list of prompts);
                    every prompt of a concept gives each edited layer its rows (last-word tokens, pooled embedding).
    targets:        the guide of each concept (one prompt per concept: its outputs replace the concept's); default:
                    each concept's `alternative` in the spec, else the empty prompt (UCE's guide for objects).
    anchors:        prompts whose outputs are preserved (UCE's preserve concepts; shorthand for the spec's anchors).
    token_rows:     which token embeddings of each prompt a UNet's keys and values are solved on (`uce_projections`):
                    "last_word" (the authors' current code) or "from_last_word" (the last word, end-of-text and padding
                    tokens: the original release's rows, which also reach what a causal encoder's later tokens carry).
    erase_scale, preserve_scale, lamb: the weights of UCE's three terms (authors' defaults 1, 1, 0.5).
    val_scale, val_steps: CFG scale and steps of validation samples; val_samples: as ConceptErasure's.
    model_config:   the model's config, filled in automatically (a self-contained checkpoint rebuilds when `model`
                    has moved).
    """

    method_name = "uce"

    def __init__(self, model: str, concepts: str | dict | list, targets: list | None = None,
                 anchors: list | None = None, token_rows: str = "last_word", erase_scale: float = 1.0,
                 preserve_scale: float = 1.0, lamb: float = 0.5, val_scale: float = 2.0, val_steps: int = 20,
                 val_samples: int = 50, model_config: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        if erase_scale < 0 or preserve_scale < 0 or lamb <= 0:
            raise ValueError(f"erase_scale and preserve_scale must be >= 0 and lamb > 0, got {erase_scale}, "
                             f"{preserve_scale}, {lamb}")
        frozen, config, unread = load_prompt_model(model, model_config, "SD 1.x/2.x, SDXL, SD3, Flux",
                                                   "UCE edits the projections prompts enter the network through")
        self.hparams["model_config"] = config
        self.frozen = frozen
        self.register_frozen(frozen.net, model, unread)  # left out of checkpoints (MethodModule.register_frozen)
        conditioner = frozen.net.conditioner
        self.spec: ErasureConcepts = resolve_concepts(concepts, targets, anchors, conditioner)
        self.student = Denoiser(copy.deepcopy(frozen.net), frozen.schedule, frozen.parameterization, frozen.sigma_data)
        self.student.requires_grad_(False)
        self.projections = uce_projections(self.student.net, conditioner, token_rows)
        self.layers = {name: layer for name, (layer, _) in self.projections.items()}
        self.erase_scale, self.preserve_scale, self.lamb = erase_scale, preserve_scale, lamb
        self.val_scale, self.val_steps, self.val_samples = val_scale, val_steps, val_samples
        self.register_buffer("edited", torch.zeros((), dtype=torch.bool))
        self.automatic_optimization = False

    # --- what is erased ----------------------------------------------------------------------------
    def erased_requests(self) -> list:
        return [r for r, _ in self.spec.erased]

    def concept_names(self) -> list[str]:
        return list(self.spec.names)

    def sampling_denoiser(self) -> Denoiser:
        return self.student

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()
        return self

    # --- the edit --------------------------------------------------------------------------------
    @torch.no_grad()
    def embeddings(self, rows: Rows) -> tuple[Tensor, Tensor, Tensor]:
        """(erase [n_e, D], guide [n_e, D], preserve [n_p, D]): the rows (`uce_projections`, a block per prompt) of
        every erased prompt, of its concept's guide (the alternative, or the empty prompt) in the same order, and of
        the anchors. Row j of an erased prompt's block is paired with row j of its guide's, the longer block truncated
        to the shorter (blocks that start at the last word: the same offset from each one's last word)."""
        erased = self.spec.erased
        guides = [self.spec.alternatives[i] if self.spec.alternatives[i] is not None else self.conditioner.null_request
                  for _, i in erased]
        pairs = [(e[:min(len(e), len(g))], g[:min(len(e), len(g))])
                 for e, g in zip(rows([r for r, _ in erased]), rows(guides))]
        erase, guide = torch.cat([e for e, _ in pairs]), torch.cat([g for _, g in pairs])
        anchors = list(self.spec.anchors)
        preserve = torch.cat(rows(anchors)) if anchors else erase.new_zeros(0, erase.shape[1])
        return erase, guide, preserve

    def frozen_weights(self) -> dict[str, torch.Tensor]:
        """The frozen model's weight of every edited layer, by the layer's name."""
        frozen = dict(self.frozen.net.named_modules())
        return {name: frozen[name].weight for name in self.layers}

    @torch.no_grad()
    def apply_edit(self) -> None:
        """Replace the weight of every layer of `uce_projections` in the student by UCE's solution from the frozen
        model's and the layer's rows (gathered once per kind of rows: a UNet's layers share theirs)."""
        gathered: dict[Rows, tuple[Tensor, Tensor, Tensor]] = {}
        frozen = self.frozen_weights()
        for name, (layer, rows) in self.projections.items():
            if rows not in gathered:
                gathered[rows] = self.embeddings(rows)
            erase, guide, preserve = gathered[rows]
            w_old = frozen[name]
            dev = w_old.device
            layer.weight.copy_(uce_weight(w_old, erase.to(dev, w_old.dtype), guide.to(dev, w_old.dtype),
                                          preserve.to(dev, w_old.dtype), self.erase_scale, self.preserve_scale,
                                          self.lamb))
        self.edited.fill_(True)

    # --- the one step ------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.max_steps != 1:
            raise ValueError(f"UCE is one closed-form edit: set trainer.max_steps: 1 (got {self.trainer.max_steps})")

    def training_step(self, batch, batch_idx):
        if not bool(self.edited):
            self.apply_edit()
        frozen = self.frozen_weights()
        moved = max((layer.weight - frozen[n]).abs().max().item() for n, layer in self.layers.items())
        self.log("train/edited_layers", float(len(self.layers)))
        self.log("train/max_weight_change", moved)
        self.optimizers().step()  # no gradients: advances the step counter, so the checkpoint is written

    def validation_step(self, batch, batch_idx):
        return None

    def trainable_networks(self):
        return {}

    def configure_optimizers(self):
        return torch.optim.SGD([layer.weight for layer in self.layers.values()], lr=0.0)
