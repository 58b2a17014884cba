"""The input and output steps of a diffusers attention layer (as its AttnProcessor2_0 runs them), shared by this
project's attention processors (PAG, NASA, NegToMe), which change only what happens between them."""
from __future__ import annotations

from torch import Tensor


def attention_tokens(attn, hidden_states: Tensor, temb: Tensor | None = None) -> tuple[Tensor, Tensor, tuple]:
    """(tokens [B, N, C], residual, input shape): the layer's spatial norm, [B, C, H, W] -> [B, HW, C], group norm."""
    residual, shape = hidden_states, hidden_states.shape
    if getattr(attn, "spatial_norm", None) is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:  # [B, C, H, W] -> tokens [B, HW, C]
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, shape


def attention_output(attn, z: Tensor, residual: Tensor, shape: tuple) -> Tensor:
    """The layer's output from the attended tokens z [B, N, C]: output projection and dropout, back to the input
    shape, residual connection, rescale."""
    out = attn.to_out[1](attn.to_out[0](z))
    if len(shape) == 4:
        out = out.transpose(1, 2).reshape(shape)
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)
