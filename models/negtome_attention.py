"""Negative Token Merging (NegToMe; Singh et al. 2024, arXiv 2412.01339): inside a UNet's self-attention layers each
image token is pushed away from its best-matching token of a reference image (the batch's first sample), through
attention processors swapped in for a block (`negative_token_merging`), as models.pag_attention swaps PAG's."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention_io import attention_output, attention_tokens

# The authors' defaults (1jsingh/negtome, src/negtome/pipeline_negtome_flux.py, NegtomeArgs): merging_alpha 0.9,
# merging_threshold 0.65, applied while the network time is in [merging_t_end, merging_t_start] = [900, 1000]
THRESHOLD = 0.65
WINDOW = (900.0, 1000.0)


def negative_token_merge(tokens: Tensor, alpha: float, threshold: float = THRESHOLD) -> Tensor:
    """NegToMe on tokens [B, N, D] with sample 0 the reference: for every token x of samples 1..B-1, its best match
    r = ref[argmax_j cos(x, ref_j)] among the reference's N tokens; where that cosine exceeds `threshold`,
    x <- x + alpha (x - r) = (1 + alpha) x - alpha r (arXiv 2412.01339, negative token merging: the linear
    extrapolation away from the matched source token, as the authors' `negtome` writes it); other tokens and the
    reference itself are returned unchanged. Returns [B, N, D]."""
    ref = tokens[:1]
    cos = F.normalize(tokens[1:], dim=-1) @ F.normalize(ref, dim=-1).transpose(1, 2)  # [B-1, N, N_ref]
    best, index = cos.max(-1)
    matched = ref[0][index]  # [B-1, N, D]
    pushed = torch.where((best > threshold)[..., None], (1 + alpha) * tokens[1:] - alpha * matched, tokens[1:])
    return torch.cat([tokens[:1], pushed])


class _Clock:
    """The network time of the current forward (set by a pre-hook on the network; t [B], all rows equal in sampling)."""

    t: float | None = None


class NegToMeSelfAttention:
    """Processor of a UNet self-attention layer (`attn1`) with NegToMe applied to its attention output before the
    output projection (where the authors' Flux processor applies it, "after attention computation") while the network
    time is inside `window`; otherwise, and for alpha = 0, diffusers' AttnProcessor2_0 computation unchanged."""

    def __init__(self, alpha: float, threshold: float, window: tuple[float, float], clock: _Clock):
        self.alpha, self.threshold, self.window, self.clock = alpha, threshold, window, clock

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("NegToMe acts on self-attention without an attention mask")
        hidden_states, residual, shape = attention_tokens(attn, hidden_states, temb)
        b, heads = hidden_states.shape[0], attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = k.shape[-1] // heads
        q, k, v = (u.view(b, -1, heads, d).transpose(1, 2) for u in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        z = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        z = z.transpose(1, 2).reshape(b, -1, heads * d).to(q.dtype)
        t = self.clock.t
        if self.alpha and b > 1 and t is not None and self.window[0] <= t <= self.window[1]:
            z = negative_token_merge(z, self.alpha, self.threshold)  # arXiv 2412.01339, NegToMe
        return attention_output(attn, z, residual, shape)


def self_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the plain self-attention layers of `model` (a UNet's `attn1`; not joint MMDiT attention)."""
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and not m.is_cross_attention
            and getattr(m, "added_kv_proj_dim", None) is None]


def check_negtome(alpha: float, threshold: float, window: tuple[float, float]) -> None:
    if not math.isfinite(float(alpha)) or alpha < 0:
        raise ValueError(f"the NegToMe scale alpha must be a finite value >= 0 (0: no effect; the authors' 0.9), "
                         f"got {alpha}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"the NegToMe threshold is a cosine similarity in [-1, 1] (the authors' 0.65), got {threshold}")
    if not window[0] <= window[1]:
        raise ValueError(f"the NegToMe window is (earliest, latest) network time with earliest <= latest, got {window}")


@contextmanager
def negative_token_merging(model: nn.Module, alpha: float, threshold: float = THRESHOLD,
                           window: tuple[float, float] = WINDOW) -> Iterator[None]:
    """Inside the block, every self-attention layer of `model` (self_attention_modules) applies NegToMe with the first
    sample of each forward's batch as the reference, while the network time t (the second argument of `model`'s
    forward, read by a pre-hook) is in `window`; the processors are restored and the hook removed after."""
    check_negtome(alpha, threshold, window)
    chosen = self_attention_modules(model)
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no UNet self-attention layers for NegToMe to act on")
    clock = _Clock()

    def read_time(module, args):
        t = torch.as_tensor(args[1])
        clock.t = float(t.reshape(-1)[0])

    hook = model.register_forward_pre_hook(read_time)
    saved = [(m, m.processor) for _, m in chosen]
    processor = NegToMeSelfAttention(float(alpha), float(threshold), window, clock)
    try:
        for m, _ in saved:
            m.processor = processor
        yield
    finally:
        hook.remove()
        for m, proc in saved:
            m.processor = proc
