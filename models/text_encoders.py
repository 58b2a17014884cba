"""Prompt encoders: CLIP text encoders (Stable Diffusion 1.x/2.x, SDXL's pair) turning prompts into the
text condition dict of models.text_unet, with embeddings cached per prompt.

A text condition is a plain dict of tensors with batch first, so guidance.conditions.cond_cat/split/index
batch it like any other condition:

    encoder_hidden_states [B, L, D]  the token embeddings cross-attention reads (every text model);
    text_embeds           [B, P]     SDXL: the pooled, projected embedding of the second encoder;
    time_ids              [B, 6]     SDXL micro-conditioning (original size, crop top-left, target size),
                                     added by the network adapter when the condition lacks it;
    pooled_projections    [B, P]     SD3: both CLIP encoders' projected embeddings, concatenated; Flux: the
                                     CLIP pooler output (Flux's token embeddings are T5's alone).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

ENCODER_KINDS = ("clip", "sdxl", "sd3", "flux")
NUM_ENCODERS = {"clip": 1, "sdxl": 2, "sd3": 3, "flux": 2}


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

    kind:                  "clip" (one encoder: SD 1.x/2.x), "sdxl" (two encoders, penultimate layers
                           concatenated along D, pooled projection of the second as text_embeds) or "sd3"
                           (CLIP-L and CLIP-G penultimate layers concatenated along D and zero-padded to T5's
                           width, then T5's tokens appended along L; both pooled projections concatenated;
                           Esser et al. 2024, arXiv 2403.03206, sec. 5.2 / Fig. 2), or "flux" (CLIP-L's pooler
                           output as pooled_projections, T5's tokens as encoder_hidden_states).
    tokenizers, encoders:  one per encoder, in the pipeline's order (tokenizer/text_encoder, _2, _3); SD3's
                           T5 (third) may be None, and its tokens are then zeros, as diffusers does.
    t5_dim, max_sequence_length: SD3 only: the T5 embedding width (the transformer's joint_attention_dim)
                           and the number of T5 tokens (diffusers' max_sequence_length, 256 by default).
    zeros_for_empty:       SDXL's `force_zeros_for_empty_prompt`: the null condition is all zeros instead of
                           the embedding of "" (what diffusers' SDXL pipeline does without a negative prompt).
    cache:                 keep every prompt's embedding (detached, on the CPU) so a prompt is encoded once;
                           `clear_cache()` empties it.

    The encoders are frozen (eval, requires_grad False): prompt embeddings are inputs, not trained.
    """

    def __init__(self, kind: str, tokenizers: Sequence, encoders: Sequence[nn.Module | None], zeros_for_empty: bool = False,
                 cache: bool = True, t5_dim: int | None = None, max_sequence_length: int = 256):
        super().__init__()
        if kind not in ENCODER_KINDS:
            raise ValueError(f"unknown prompt encoder kind {kind!r}; choose one of {', '.join(ENCODER_KINDS)}")
        need = NUM_ENCODERS[kind]
        if len(tokenizers) != need or len(encoders) != need:
            raise ValueError(f"a {kind!r} prompt encoder takes {need} tokenizer(s) and {need} text encoder(s), "
                             f"got {len(tokenizers)} and {len(encoders)}")
        if kind == "flux" and encoders[1] is None:
            raise ValueError("a Flux prompt encoder needs its T5 encoder (text_encoder_2)")
        if kind == "sd3" and encoders[2] is None and t5_dim is None:
            raise ValueError("an SD3 prompt encoder without T5 needs t5_dim (the transformer's joint_attention_dim)")
        self.kind, self.zeros_for_empty, self.use_cache = kind, zeros_for_empty, cache
        self.t5_dim, self.max_sequence_length = t5_dim, max_sequence_length
        self.tokenizers = list(tokenizers)
        self.encoders = nn.ModuleList([e for e in encoders if e is not None])
        self.has_t5 = (kind == "sd3" and encoders[2] is not None) or kind == "flux"
        self.encoders.eval().requires_grad_(False)
        self._cache: dict[str, dict[str, Tensor]] = {}

    @classmethod
    def from_pretrained(cls, path: str, kind: str | None = None, dtype: torch.dtype | None = None,
                        cache: bool = True, max_sequence_length: int | None = None, use_t5: bool = True) -> "PromptEncoder":
        """Load tokenizer(s) and text encoder(s) from a local pipeline folder in diffusers layout
        (tokenizer/, text_encoder/[, tokenizer_2/, text_encoder_2/[, tokenizer_3/, text_encoder_3/]]). kind
        defaults to "sd3" when the folder has a transformer/, "sdxl" when it has text_encoder_2/, else "clip".
        use_t5=False runs SD3 without its T5 encoder (zeros in its place, diffusers' text_encoder_3=None).
        max_sequence_length: T5 tokens, default the pipelines' (SD3 256, Flux 512).
        Nothing is downloaded (local_files_only)."""
        import json
        from pathlib import Path

        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        root = Path(path)
        if not (root / "text_encoder").is_dir():
            raise FileNotFoundError(f"{path} has no text_encoder/ folder; give a pipeline folder in diffusers layout "
                                    f"(model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/)")
        index = _model_index(root)
        if kind is None:
            from models.pretrained import pipeline_family

            kind = pipeline_family(root)
        kw = dict(local_files_only=True, **({"dtype": dtype} if dtype is not None else {}))
        toks = [CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)]
        if kind == "flux":
            from transformers import AutoTokenizer, T5EncoderModel

            toks.append(AutoTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True))
            encs_flux = [CLIPTextModel.from_pretrained(root / "text_encoder", **kw),
                         T5EncoderModel.from_pretrained(root / "text_encoder_2", **kw)]
            return cls(kind, toks, encs_flux, cache=cache, max_sequence_length=max_sequence_length or 512)
        first = CLIPTextModelWithProjection if kind == "sd3" else CLIPTextModel
        encs: list = [first.from_pretrained(root / "text_encoder", **kw)]
        if kind in ("sdxl", "sd3"):
            toks.append(CLIPTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True))
            encs.append(CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", **kw))
        extra = {}
        if kind == "sd3":
            from transformers import AutoTokenizer, T5EncoderModel

            has_t5 = use_t5 and (root / "text_encoder_3").is_dir()
            toks.append(AutoTokenizer.from_pretrained(root / "tokenizer_3", local_files_only=True) if has_t5 else None)
            encs.append(T5EncoderModel.from_pretrained(root / "text_encoder_3", **kw) if has_t5 else None)
            joint = json.loads((root / "transformer" / "config.json").read_text())["joint_attention_dim"]
            extra = dict(t5_dim=joint, max_sequence_length=max_sequence_length or 256)
        zeros = kind == "sdxl" and index.get("force_zeros_for_empty_prompt", True)
        return cls(kind, toks, encs, zeros_for_empty=bool(zeros), cache=cache, **extra)

    @property
    def device(self) -> torch.device:
        return _device(self.encoders[0])

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> dict[str, Tensor]:
        """The encoders run in their own dtype, outside any autocast region (a bf16-mixed fit encodes its batches
        inside one): the embeddings, and so the per-prompt cache shared by the process, are the same whoever asks."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self._run_encoders(prompts)

    def _run_encoders(self, prompts: list[str]) -> dict[str, Tensor]:
        if self.kind == "clip":
            hidden, _ = encode_clip(self.tokenizers[0], self.encoders[0], prompts)
            return {"encoder_hidden_states": hidden}
        if self.kind == "flux":
            _, pooled = encode_clip(self.tokenizers[0], self.encoders[0], prompts)  # CLIPTextModel: pooler output
            return {"encoder_hidden_states": self._encode_t5(prompts, pooled), "pooled_projections": pooled}
        hiddens, pooled = [], []
        for tok, enc in zip(self.tokenizers[:2], self.encoders[:2]):
            h, p = encode_clip(tok, enc, prompts, hidden_layer=-2)  # SDXL and SD3 read the penultimate layer
            hiddens.append(h)
            pooled.append(p)
        clip = torch.cat(hiddens, -1)
        if self.kind == "sdxl":
            return {"encoder_hidden_states": clip, "text_embeds": pooled[1]}  # the second encoder's projection
        t5 = self._encode_t5(prompts, clip)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # CLIP widths zero-padded to T5's
        return {"encoder_hidden_states": torch.cat([clip, t5], -2), "pooled_projections": torch.cat(pooled, -1)}

    def _encode_t5(self, prompts: list[str], like: Tensor) -> Tensor:
        """T5 tokens [B, max_sequence_length, t5_dim] (SD3, Flux); zeros when SD3 runs without T5."""
        if not self.has_t5:
            return like.new_zeros(len(prompts), self.max_sequence_length, self.t5_dim)
        tok, enc = self.tokenizers[-1], self.encoders[-1]
        ids = tok(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                 add_special_tokens=True, return_tensors="pt").input_ids
        return enc(ids.to(_device(enc)))[0]

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

    def last_word_positions(self, prompts: Sequence[str]) -> Tensor:
        """[B, K] long: where each prompt's last word token (before the end-of-text token; the first token for "")
        sits on encoder_hidden_states' token axis, in each of its K token streams: CLIP's for clip and sdxl (whose
        two tokenizers split a prompt alike), CLIP's then T5's for sd3 (T5's only when it is loaded), T5's for flux.
        CLIP starts with a start token and T5 does not, but both end with an end token, so the last word is at
        length - 2 in either (length: the prompt's tokens, as the encoder pads and truncates them)."""
        prompts = list(prompts)
        clip = self.tokenizers[0]
        streams = [(clip, clip.model_max_length, 0)] if self.kind != "flux" else []
        if self.has_t5:
            streams.append((self.tokenizers[-1], self.max_sequence_length, clip.model_max_length if streams else 0))
        positions = []
        for tok, length, offset in streams:
            lengths = tok(prompts, padding="max_length", max_length=length, truncation=True,
                          return_tensors="pt").attention_mask.sum(1)
            positions.append(offset + (lengths - 2).clamp(min=0))
        return torch.stack(positions, 1)

    def last_word_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """encoder_hidden_states [B, K, D] at each prompt's `last_word_positions`: the embeddings per prompt that UCE
        edits with (arXiv 2308.14761; the authors' trainscripts/uce_sd_erase.py for CLIP, uce_flux_edit.py for T5)."""
        hidden = self.encode(prompts)["encoder_hidden_states"]
        index = self.last_word_positions(prompts).to(hidden.device)
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))

    def from_last_word_embeddings(self, prompts: Sequence[str]) -> list[Tensor]:
        """One [L - p, D] block per prompt: encoder_hidden_states from its last word token (p, `last_word_positions`)
        to the end of the sequence, i.e. the last word, the end-of-text token and the padding after it (L: the
        tokenizer's model_max_length); the rows the original UCE release edits with (arXiv 2308.14761; the authors'
        train-scripts/train_erase.py, edit_model). CLIP encoders only (clip, sdxl): CLIP is causal and the pipelines
        give it no attention mask, so every state from the last word on has read the whole prompt, and the UNet's
        cross-attention reads all of them. T5 (sd3, flux) is bidirectional: there the end and padding tokens are no
        more a summary of the prompt than any other token, and this is refused."""
        if self.kind not in ("clip", "sdxl"):
            raise ValueError(f"rows from the last word on are defined for causal CLIP token streams (clip, sdxl); this "
                             f"prompt encoder is {self.kind!r}, whose T5 tokens are bidirectional: use the last word")
        hidden = self.encode(prompts)["encoder_hidden_states"]
        start = self.last_word_positions(prompts)[:, 0].tolist()
        return [h[p:] for h, p in zip(hidden, start)]

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
