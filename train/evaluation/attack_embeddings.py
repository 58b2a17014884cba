"""The prompt attacks' text-encoder side, shared by UnlearnDiffAtk (train.evaluation.unlearndiffatk) and Ring-A-Bell
(train.evaluation.ring_a_bell): an attacked prompt's result, the CLIP encoder of a text model, its states of prompts
with token embeddings inserted after the start token, discrete prompts evaluated as their token ids, and the encode
hook that samples with attacked states in place of prompts.

A discrete prompt is evaluated as its token ids: UnlearnDiffAtk's authors evaluate the id sequence
(OPTML-Group/Diffusion-MU-Attack src/attackers/text_grad_.py `run`: `task.eval(construct_id(proj_ids, ...))`, the text
decoded for the log only), and a decoded text need not encode back to the same ids (a byte-level vocabulary's partial
characters decode to U+FFFD), so the report gives the decoded text for people to read and whether it round-trips.
Shared text encoders are never modified: the states go through an explicit inputs_embeds path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass
class PromptAttack:
    """One attacked prompt: its learned soft tokens [k, D], the attacked text-encoder output [L, D], the loss of each
    step, the loss on the fixed probe draws with the plain prompt, the initial and the learned tokens, and the learned
    tokens' nearest vocabulary tokens: their ids, the text-encoder output [L, D] of the prompt with those ids (the
    discrete prompt, evaluated as ids), their tokens and decoded text, and whether the text encodes back to the ids.
    Ring-A-Bell's (objective "fitness"): no soft tokens ([0, D]), the concept-shifted embedding as the attacked states,
    the genetic search's best squared distance to it per generation, the plain prompt's, the first generation's best
    and the found prompt's, and the found prompt (the ids alone) as the nearest tokens."""

    prompt: str
    soft: Tensor
    states: Tensor
    loss_curve: list[float] = field(default_factory=list)
    loss_plain: float | None = None
    loss_initial: float | None = None
    loss_attacked: float | None = None
    nearest_ids: list[int] = field(default_factory=list)
    nearest_states: Tensor | None = None
    nearest_words: list[str] = field(default_factory=list)
    nearest_prompt: str | None = None
    nearest_roundtrip: bool | None = None
    objective: str = "loss"

    def report(self) -> dict:
        o = self.objective
        return {"prompt": self.prompt, f"{o}_curve": self.loss_curve, f"{o}_plain": self.loss_plain,
                f"{o}_initial": self.loss_initial, f"{o}_attacked": self.loss_attacked,
                "nearest_ids": self.nearest_ids, "nearest_words": self.nearest_words,
                "nearest_prompt": self.nearest_prompt, "nearest_words_roundtrip": self.nearest_roundtrip}


def clip_text_encoder(module) -> tuple[Any, Any]:
    """(tokenizer, CLIP text model) of a text module whose prompts go through one CLIP encoder (SD 1.x/2.x), or a
    ValueError saying what the attack takes."""
    conditioner = module.conditioner
    if conditioner.enumerate() is not None:
        raise ValueError("--attack attacks the prompts of a text-to-image model; this model takes class labels (its "
                         "condition is a class embedding, not a prompt): evaluate it without --attack")
    encoder = conditioner.encoder
    if encoder.kind != "clip":
        raise ValueError(f"--attack supports one-CLIP-encoder models (SD 1.x/2.x, the text digits "
                         f"pipeline); this model's prompt encoder is {encoder.kind!r}")
    return encoder.tokenizers[0], encoder.encoders[0]


def token_states(tokenizer, text_encoder, prompts: Sequence[str], soft: Tensor | None = None) -> Tensor:
    """The CLIP text encoder's last hidden states [B, L, D] of prompts with the soft token embeddings soft [k, D] (or
    [B, k, D], one set per prompt) inserted after the start token (UnlearnDiffAtk's `prefix_k`); the sequence keeps its
    length L (k padding positions drop off the end). soft None (or k = 0): exactly what the encoder gives the prompts
    (encode_clip), through an explicit inputs_embeds path that never modifies the (shared) encoder."""
    from transformers.masking_utils import create_causal_mask

    L = tokenizer.model_max_length
    tokens = tokenizer(list(prompts), padding="max_length", max_length=L, truncation=True, return_tensors="pt")
    tm = getattr(text_encoder, "text_model", text_encoder)
    dev = tm.embeddings.token_embedding.weight.device
    emb = tm.embeddings.token_embedding(tokens.input_ids.to(dev))
    mask = tokens.attention_mask.to(dev) if getattr(tm.config, "use_attention_mask", False) else None
    k = 0 if soft is None else soft.shape[-2]
    if k:
        longest = int(tokens.attention_mask.sum(1).max())
        if longest + k > L:
            raise ValueError(f"a prompt of {longest} tokens leaves no room for {k} attack tokens in {L}; shorten it or "
                             f"lower --attack-tokens")
        b = emb.shape[0]
        emb = torch.cat([emb[:, :1], soft.to(emb.dtype).expand(b, k, -1), emb[:, 1:L - k]], 1)  # [k, D] or [B, k, D]
        if mask is not None:
            mask = torch.cat([mask[:, :1], mask.new_ones(b, k), mask[:, 1:L - k]], 1)
    with torch.autocast(device_type=dev.type, enabled=False):
        hidden = tm.embeddings(inputs_embeds=emb)  # + position embeddings, as CLIPTextModel.forward
        causal = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=mask, cache=None)
        out = tm.encoder(inputs_embeds=hidden, attention_mask=causal, is_causal=True)
        return tm.final_layer_norm(out.last_hidden_state)


def vocabulary(tokenizer, text_encoder) -> tuple[Tensor, Tensor]:
    """(the text encoder's input token embeddings [V, D], the ids [V'] an attack may use: all but the special ones)."""
    vocab = getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding.weight
    special = set(tokenizer.all_special_ids)
    return vocab, torch.tensor([i for i in range(vocab.shape[0]) if i not in special])


def discrete_prompt(tokenizer, text_encoder, ids: Sequence[int], prompt: str = "") -> tuple[str, Tensor, bool]:
    """The hard prompt of vocabulary token ids [k] inserted after the start token of `prompt` ("": the ids alone):
    (its decoded text, for people to read; the text encoder's states [L, D] of the exact ids; whether the text encodes
    back to those ids). The states are token_states with the ids' own vocabulary rows as the inserted embeddings, so
    bit for bit the encoder's output of the id sequence [start, ids, prompt's tokens, end, padding]."""
    vocab = getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding.weight
    ids = [int(i) for i in ids]
    with torch.no_grad():
        states = token_states(tokenizer, text_encoder, [prompt], vocab[torch.tensor(ids, device=vocab.device)])[0]
    text = f"{tokenizer.decode(ids).strip()} {prompt}".strip()
    plain = tokenizer(prompt).input_ids
    return text, states, tokenizer(text, verbose=False).input_ids == plain[:1] + ids + plain[1:]  # any length


def attacked_encode(module, states: dict[str, Tensor]):
    """requests -> their condition, the rows of the prompts in `states` replaced by their text-encoder states [L, D]
    (an attack's: the attacked prompt's, or its hard prompt's; the encode hook of MethodModule.generate)."""

    def encode(requests):
        cond = module.encode(requests)
        rows = [i for i, r in enumerate(requests) if r in states]
        if not rows:
            return cond
        h = cond["encoder_hidden_states"].clone()
        for i in rows:
            h[i] = states[requests[i]].to(h)
        return {**cond, "encoder_hidden_states": h}

    return encode
