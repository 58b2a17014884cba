"""Negative-Away Steer Attention (NASA; Nguyen et al. 2024, SNOOPI, arXiv 2412.02687): a negative prompt honoured in
ONE network evaluation, the cross-attention layers of a diffusers UNet returning Attn(Q, K+, V+) - alpha Attn(Q, K-, V-),
through attention processors swapped in for a block (`negative_away_attention`), as models.pag_attention swaps PAG's."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from models.attention_io import attention_output, attention_tokens


def cross_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every cross-attention layer of `model` (a UNet's `attn2`: queries from the image tokens, keys
    and values from the text). Joint (MMDiT) attention, self-attention and class-conditioned networks have none."""
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and m.is_cross_attention]


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"the NASA scale alpha must be a finite value >= 0 (0: the negative prompt has no effect), "
                         f"got {alpha}")
    return alpha


class NegativeAwaySteerAttention:
    """Processor of a cross-attention layer with NASA (SNOOPI, arXiv 2412.02687, Negative-Away Steer Attention):

        Z_NASA = Z+ - alpha Z-,   Z+- = softmax(Q K+-^T / sqrt(d)) V+-   (per head)

    Q from the layer's image tokens; K+, V+ from the condition the network is called with (the positive prompt's
    encoder_hidden_states), K-, V- from `negative` [B, L-, D] (the negative prompt's, projected by the same to_k / to_v).
    The combination is taken on the attention features, before the layer's output projection (to_out), as the paper
    writes it on Z; norms, residual and rescale are the layer's own, as diffusers' AttnProcessor2_0 applies them, so
    alpha = 0 is that processor's output bit for bit. The network's batch must be the negative's B (one negative per
    sample: NASA replaces an unconditional branch, it is not batched with one)."""

    def __init__(self, negative: Tensor, alpha: float):
        self.negative, self.alpha = negative, check_alpha(alpha)

    def _attend(self, attn, query: Tensor, context: Tensor) -> Tensor:
        """softmax(Q K^T / sqrt(d)) V of query [B, H, N, d] against context tokens [B, L, D] -> [B, N, H d]."""
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        b, heads = query.shape[0], attn.heads
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // heads
        key = key.view(b, -1, heads, head_dim).transpose(1, 2)
        value = value.view(b, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        z = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        return z.transpose(1, 2).reshape(b, -1, heads * head_dim).to(query.dtype)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("NASA acts on cross-attention without an attention mask: this layer was called "
                             + ("without text tokens" if encoder_hidden_states is None else "with a mask"))
        if encoder_hidden_states.shape[0] != self.negative.shape[0]:
            raise ValueError(f"NASA holds {self.negative.shape[0]} negative conditions but the network was called on a "
                             f"batch of {encoder_hidden_states.shape[0]}: give one negative per sample, and sample with "
                             f"one evaluation per step (no CFG branches)")
        hidden_states, residual, shape = attention_tokens(attn, hidden_states, temb)
        query = attn.to_q(hidden_states)
        b, heads = query.shape[0], attn.heads
        query = query.view(b, -1, heads, query.shape[-1] // heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        z = self._attend(attn, query, encoder_hidden_states)
        # SNOOPI (arXiv 2412.02687), NASA: Z_NASA = Z+ - alpha Z-, then the layer's output projection
        z = z - self.alpha * self._attend(attn, query, self.negative.to(encoder_hidden_states))
        return attention_output(attn, z, residual, shape)


@contextmanager
def negative_away_attention(model: nn.Module, negative: Tensor, alpha: float) -> Iterator[None]:
    """Inside the block, every cross-attention layer of `model` (cross_attention_modules) runs NASA against the negative
    text tokens `negative` [B, L, D] (the negative prompt's encoder_hidden_states) with scale `alpha`; the processors
    are restored after. A model without cross-attention layers is a ValueError."""
    chosen = cross_attention_modules(model)
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no cross-attention layers for NASA to act on")
    saved = [(m, m.processor) for _, m in chosen]
    processor = NegativeAwaySteerAttention(negative, alpha)
    try:
        for m, _ in saved:
            m.processor = processor
        yield
    finally:
        for m, proc in saved:
            m.processor = proc
