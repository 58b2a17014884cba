"""Prompt encoders: CLIP text encoders (Stable Diffusion 1.x/2.x, SDXL's pair) turning prompts into the
text condition dict of models.text_unet, with embeddings cached per prompt.

A text condition is a plain dict of tensors with batch first, so guidance.conditions.cond_cat/split/index
batch it like any other condition:

    encoder_hidden_states [B, L, D]  the token embeddings cross-attention reads (every text model);
    text_embeds           [B, P]     SDXL: the pooled, projected embedding of the second encoder;
    time_ids              [B, 6]     SDXL micro-conditioning (original size, crop top-left, target size),
                                     added by the network adapter when the condition lacks it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

ENCODER_KINDS = ("clip", "sdxl")


def encode_clip(tokenizer, text_encoder: nn.Module, prompts: list[str], hidden_layer: int | None = None) -> tuple[Tensor, Tensor]:
    """(hidden [B, L, D], pooled [B, P]) for prompts through one CLIP text encoder.

    Tokens are padded and truncated to the tokenizer's model_max_length, as the Stable Diffusion
    pipelines do. hidden_layer None: the last hidden state (after the final LayerNorm; SD 1.x/2.x);
    an index k: hidden_states[k] without the final LayerNorm (SDXL reads -2, the penultimate layer).
    pooled: the projected text embedding for CLIPTextModelWithProjection, else the pooler output.
    """
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    ids = tokens.input_ids.to(_device(text_encoder))
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):  # what the SD pipelines do for such encoders
        mask = tokens.attention_mask.to(ids.device)
    out = text_encoder(ids, attention_mask=mask, output_hidden_states=hidden_layer is not None)
    hidden = out.last_hidden_state if hidden_layer is None else out.hidden_states[hidden_layer]
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return hidden, pooled


class PromptEncoder(nn.Module):
    """Prompts -> text condition dicts, with a per-prompt cache.

    kind:                  "clip" (one encoder: SD 1.x/2.x) or "sdxl" (two encoders, penultimate layers
                           concatenated along D, pooled projection of the second as text_embeds).
    tokenizers, encoders:  one or two of each, in the pipeline's order (tokenizer/text_encoder, then _2).
    zeros_for_empty:       SDXL's `force_zeros_for_empty_prompt`: the null condition is all zeros instead of
                           the embedding of "" (what diffusers' SDXL pipeline does without a negative prompt).
    cache:                 keep every prompt's embedding (detached, on the CPU) so a prompt is encoded once;
                           `clear_cache()` empties it.

    The encoders are frozen (eval, requires_grad False): prompt embeddings are inputs, not trained.
    """

    def __init__(self, kind: str, tokenizers: Sequence, encoders: Sequence[nn.Module], zeros_for_empty: bool = False,
                 cache: bool = True):
        super().__init__()
        if kind not in ENCODER_KINDS:
            raise ValueError(f"unknown prompt encoder kind {kind!r}; choose one of {', '.join(ENCODER_KINDS)}")
        need = 1 if kind == "clip" else 2
        if len(tokenizers) != need or len(encoders) != need:
            raise ValueError(f"a {kind!r} prompt encoder takes {need} tokenizer(s) and {need} text encoder(s), "
                             f"got {len(tokenizers)} and {len(encoders)}")
        self.kind, self.zeros_for_empty, self.use_cache = kind, zeros_for_empty, cache
        self.tokenizers = list(tokenizers)
        self.encoders = nn.ModuleList(encoders)
        self.encoders.eval().requires_grad_(False)
        self._cache: dict[str, dict[str, Tensor]] = {}

    @classmethod
    def from_pretrained(cls, path: str, kind: str | None = None, dtype: torch.dtype | None = None,
                        cache: bool = True) -> "PromptEncoder":
        """Load tokenizer(s) and text encoder(s) from a local pipeline folder in diffusers layout
        (tokenizer/, text_encoder/[, tokenizer_2/, text_encoder_2/]). kind defaults to "sdxl" when
        text_encoder_2/ exists, else "clip". Nothing is downloaded (local_files_only)."""
        from pathlib import Path

        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        root = Path(path)
        if not (root / "text_encoder").is_dir():
            raise FileNotFoundError(f"{path} has no text_encoder/ folder; give a pipeline folder in diffusers layout "
                                    f"(model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/)")
        kind = kind or ("sdxl" if (root / "text_encoder_2").is_dir() else "clip")
        kw = dict(local_files_only=True, **({"dtype": dtype} if dtype is not None else {}))
        toks = [CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)]
        encs = [CLIPTextModel.from_pretrained(root / "text_encoder", **kw)]
        if kind == "sdxl":
            toks.append(CLIPTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True))
            encs.append(CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", **kw))
        zeros = kind == "sdxl" and _model_index(root).get("force_zeros_for_empty_prompt", True)
        return cls(kind, toks, encs, zeros_for_empty=bool(zeros), cache=cache)

    @property
    def device(self) -> torch.device:
        return _device(self.encoders[0])

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> dict[str, Tensor]:
        if self.kind == "clip":
            hidden, _ = encode_clip(self.tokenizers[0], self.encoders[0], prompts)
            return {"encoder_hidden_states": hidden}
        hiddens, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            h, p = encode_clip(tok, enc, prompts, hidden_layer=-2)  # SDXL reads the penultimate layer
            hiddens.append(h)
            pooled = p  # the second encoder's projected embedding
        return {"encoder_hidden_states": torch.cat(hiddens, -1), "text_embeds": pooled}

    def encode(self, prompts: str | Sequence[str]) -> dict[str, Tensor]:
        """Text condition dict for a batch of prompts ([B, L, D] hidden states, + [B, P] text_embeds for SDXL),
        on the encoders' device. Cached prompts are not re-encoded."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        if not self.use_cache:
            return self._encode_uncached(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            out = self._encode_uncached(missing)
            for i, p in enumerate(missing):
                self._cache[p] = {k: v[i].detach().cpu() for k, v in out.items()}
        dev = self.device
        return {k: torch.stack([self._cache[p][k] for p in prompts]).to(dev) for k in self._cache[prompts[0]]}

    def null(self, batch_size: int = 1) -> dict[str, Tensor]:
        """The null (unconditional) text condition: the embedding of "" or, with zeros_for_empty, zeros."""
        empty = self.encode([""] * batch_size)
        if self.zeros_for_empty:
            return {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty

    def forward(self, prompts: str | Sequence[str]) -> dict[str, Tensor]:
        return self.encode(prompts)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _model_index(root) -> dict:
    import json

    p = root / "model_index.json"
    return json.loads(p.read_text()) if p.is_file() else {}
