"""The perturbed pass of perturbed-attention guidance (PAG, Ahn et al. 2024, arXiv 2403.17377): selected
self-attention maps of a diffusers network replaced by the identity, through attention processors swapped in for
one forward (`perturbed_self_attention`)."""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention_io import attention_output, attention_tokens


def _is_self_attention(module: nn.Module) -> bool:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return isinstance(module, (Attention, AttentionModuleMixin)) and not getattr(module, "is_cross_attention", False)


def pag_layer_modules(model: nn.Module, layers: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of the self-attention layers of `model` that PAG perturbs, selected as diffusers' PAG pipelines
    select them (pipelines/pag/pag_utils.py): each entry of `layers` is a regular expression searched in the module
    names ("mid" = every self-attention of a UNet's mid block, "blocks.1" = transformer block 1), where an entry
    ending in a number matches only that index ("blocks.1" is not "blocks.10"). Cross-attention is never selected.
    An entry that selects nothing is a ValueError listing the self-attention layers there are."""
    attention = [(n, m) for n, m in model.named_modules() if _is_self_attention(m)]
    out: dict[str, nn.Module] = {}
    for layer in layers:
        last = layer.split(".")[-1]
        found = [(n, m) for n, m in attention if re.search(layer, n)
                 and not (last.isnumeric() and n.split(".")[-1].isnumeric() and n.split(".")[-1] != last)]
        if not found:
            names = ", ".join(n for n, _ in attention[:8]) + (", ..." if len(attention) > 8 else "")
            raise ValueError(f"PAG layer {layer!r} matches no self-attention layer of {type(model).__name__} ({names}); "
                             f"set the network's pag_layers to patterns of these names (e.g. 'mid' or 'blocks.0')")
        out.update(found)
    return list(out.items())


def identity_mask(n_image: int, n_text: int, image_first: bool, device) -> Tensor:
    """Boolean attention mask [1, 1, S, S] (True: may attend), S = n_image + n_text: every query attends every key
    except that an image token attends, among the image tokens, to itself only (the image-image block of the
    attention map becomes the identity; its attention to the text and the text rows are unchanged), as diffusers'
    PAGJointAttnProcessor2_0 perturbs MMDiT joint attention."""
    s = n_image + n_text
    mask = torch.ones(s, s, dtype=torch.bool, device=device)
    img = slice(0, n_image) if image_first else slice(n_text, s)
    mask[img, img] = torch.eye(n_image, dtype=torch.bool, device=device)
    return mask[None, None]


def _norm(norm: nn.Module | None, x: Tensor) -> Tensor:
    return x if norm is None else norm(x)


class IdentitySelfAttention:
    """Processor of a plain self-attention layer (a UNet's `attn1`, SD3.5's image-only `attn2`) with the attention
    map replaced by the identity: softmax(Q K^T / sqrt(d)) V -> I V = V (Ahn et al. 2024, perturbed self-attention),
    so the layer returns its output projection of the values, with the layer's own norms, residual and rescale."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        hidden_states, residual, shape = attention_tokens(attn, hidden_states, temb)
        return attention_output(attn, attn.to_v(hidden_states), residual, shape)


class IdentityJointAttention:
    """Processor of SD3's joint (MMDiT) attention, image tokens first then text tokens, with the image-image block of
    the attention map replaced by the identity (`identity_mask`); query/key norms applied as the model's own
    processor applies them. Returns (image tokens, text tokens) as diffusers' JointAttnProcessor2_0 does; a call
    without text tokens is plain self-attention (IdentitySelfAttention)."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is None:
            return IdentitySelfAttention()(attn, hidden_states)
        b, n = hidden_states.shape[:2]

        def heads(x: Tensor) -> Tensor:  # [B, L, H d] -> [B, H, L, d]
            return x.view(b, x.shape[1], attn.heads, -1).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck, cv = heads(attn.add_k_proj(encoder_hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))
        q, k = _norm(attn.norm_q, q), _norm(attn.norm_k, k)
        cq, ck = _norm(attn.norm_added_q, cq), _norm(attn.norm_added_k, ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        mask = identity_mask(n, encoder_hidden_states.shape[1], image_first=True, device=q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        image, text = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


class IdentityFluxAttention:
    """Flux's attention (text tokens first, then image tokens; double blocks get them as two inputs, single blocks
    as one concatenated sequence of `text_tokens` + image tokens) run by the layer's own processor with
    `identity_mask`: the image-image block of the attention map is the identity (rotary embeddings and query/key
    norms as the model applies them)."""

    def __init__(self, inner, text_tokens: int):
        self.inner, self.text_tokens = inner, text_tokens

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb=None):
        if encoder_hidden_states is not None:
            n_text, n_image = encoder_hidden_states.shape[1], hidden_states.shape[1]
        else:
            n_text, n_image = self.text_tokens, hidden_states.shape[1] - self.text_tokens
        mask = identity_mask(n_image, n_text, image_first=False, device=hidden_states.device)
        return self.inner(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


@contextmanager
def perturbed_self_attention(model: nn.Module, layers: Sequence[str], text_tokens: int = 0) -> Iterator[None]:
    """Inside the block, the self-attention layers of `model` selected by `layers` (pag_layer_modules) run with the
    identity attention map: a UNet's self-attention (IdentitySelfAttention), SD3's joint attention
    (IdentityJointAttention), Flux's double- and single-block attention (IdentityFluxAttention; text_tokens: the
    text sequence length, which its single blocks do not receive separately). The processors are restored after."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    chosen = pag_layer_modules(model, layers)
    saved = [(m, m.processor) for _, m in chosen]
    try:
        for m, proc in saved:
            if isinstance(m, FluxAttention):
                m.processor = IdentityFluxAttention(proc, text_tokens)
            elif getattr(m, "added_kv_proj_dim", None) is not None:
                m.processor = IdentityJointAttention()
            else:
                m.processor = IdentitySelfAttention()
        yield
    finally:
        for m, proc in saved:
            m.processor = proc
