"""Few-shot text-encoder unlearning (Fuchi & Takagi 2024, "Erasing Concepts from Text-to-Image Diffusion Models with
Few-shot Unlearning", BMVC 2024, arXiv 2405.07288): the losses through which only the TEXT ENCODER tau_phi of a frozen
text-to-image UNet is trained, from a few images x0 of the concept and prompts c naming it.

The paper's objective (the authors' code, fmp453/few-shot-erasing train.py: `loss = -F.mse_loss(model_pred, target)`,
the Textual Inversion loss with its sign flipped) is gradient ASCENT on the denoising loss of the concept's images:

    L_ascent(phi) = - E_{x0, c, t, eps} || y_theta(x_t, t, tau_phi(c)) - y*(x0, eps, t) ||^2

y the frozen UNet's raw output and y* its exact target (eps for eps-prediction, v = alpha eps - sigma x0 for
v-prediction: the code's `get_target_noise`). Two project additions, off in the reference configuration:

    L_toward   = E || y_theta(x_t, t, tau_phi(c)) - sg[y_theta(x_t, t, tau_0(a))] ||^2   the concept prompt denoises as
                 the frozen encoder tau_0's anchor/alternative prompt a does (the ConceptErasure "toward" target,
                 All but One, arXiv 2312.12807, moved onto the text side);
    L_preserve = E || tau_phi(p) - tau_0(p) ||^2   preserved prompts p keep the frozen encoder's embeddings.
"""
from __future__ import annotations

from torch import Tensor


def ascent_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Fuchi & Takagi 2024's loss per sample [B]: minus the mean squared error over C, H, W between the network's raw
    output pred [B, C, H, W] and its exact denoising target [B, C, H, W] (same parameterisation); minimising it
    ascends the denoising loss of the concept's images under its prompts."""
    return -(pred.float() - target.float()).square().flatten(1).mean(1)


def toward_loss(pred: Tensor, anchor_pred: Tensor) -> Tensor:
    """Per-sample [B] mean squared error over C, H, W between the raw output pred [B, C, H, W] under the edited
    encoder's concept prompt and the frozen model's raw output anchor_pred [B, C, H, W] (no gradient) under the
    frozen encoder's anchor prompt at the same x_t, t."""
    return (pred.float() - anchor_pred.detach().float()).square().flatten(1).mean(1)


def embedding_preservation(edited: Tensor, frozen: Tensor) -> Tensor:
    """Per-prompt [B] mean squared difference over tokens and width between the edited encoder's hidden states
    edited [B, L, D] and the frozen encoder's frozen [B, L, D] (no gradient) for preserved prompts."""
    return (edited.float() - frozen.detach().float()).square().flatten(1).mean(1)
