"""Unified Concept Editing (UCE; Gandikota, Orgad, Belinkov, Materzynska, Bau 2024, arXiv 2308.14761, sec. 3, Eq. 7):
the closed-form edit of a linear projection W [out, in] of text embeddings (a cross-attention key or value).

UCE minimises, over W,

    erase_scale    * sum_i || W c_i - v_i* ||^2          erased embeddings c_i map to v_i* = W_old g_i (a guide's output)
  + preserve_scale * sum_j || W c_j - W_old c_j ||^2     preserved embeddings keep their outputs
  + lamb           * || W - W_old ||_F^2                 stay near the original

whose minimiser is

    W = (lamb W_old + erase_scale sum_i v_i* c_i^T + preserve_scale sum_j W_old c_j c_j^T)
        (lamb I + erase_scale sum_i c_i c_i^T + preserve_scale sum_j c_j c_j^T)^-1.

The authors' code (rohitgandikota/unified-concept-editing, trainscripts/uce_sd_erase.py) applies it to every
cross-attention to_k and to_v of the UNet, with one embedding per prompt: the text encoder's output at the prompt's
last word token, and defaults erase_scale 1, preserve_scale 1, lamb 0.5.
"""
from __future__ import annotations

import torch
from torch import Tensor


def uce_objective(w: Tensor, w_old: Tensor, erase: Tensor, guide: Tensor, preserve: Tensor, erase_scale: float = 1.0,
                  preserve_scale: float = 1.0, lamb: float = 0.5) -> Tensor:
    """The objective above (a scalar) at W = w: erase [n_e, in] the erased embeddings c_i, guide [n_e, in] their
    guides' embeddings g_i (targets W_old g_i), preserve [n_p, in] the preserved ones c_j."""
    target = guide @ w_old.T
    return (erase_scale * (erase @ w.T - target).square().sum()
            + preserve_scale * ((preserve @ w.T) - (preserve @ w_old.T)).square().sum()
            + lamb * (w - w_old).square().sum())


def uce_weight(w_old: Tensor, erase: Tensor, guide: Tensor, preserve: Tensor | None = None, erase_scale: float = 1.0,
               preserve_scale: float = 1.0, lamb: float = 0.5) -> Tensor:
    """UCE's edited weight [out, in] (the minimiser of `uce_objective`), computed in float64 and returned in w_old's
    dtype. w_old [out, in]; erase, guide [n_e, in] (row i of guide is the guide of row i of erase); preserve
    [n_p, in] or None. lamb > 0 keeps the system invertible."""
    if erase.shape != guide.shape or erase.shape[-1] != w_old.shape[1]:
        raise ValueError(f"erase {tuple(erase.shape)} and guide {tuple(guide.shape)} must both be [n, {w_old.shape[1]}]")
    if lamb <= 0:
        raise ValueError(f"lamb must be > 0 (it keeps the least-squares system invertible), got {lamb}")
    w0, c, g = w_old.double(), erase.double(), guide.double()
    p = preserve.double() if preserve is not None and len(preserve) else c.new_zeros(0, w0.shape[1])
    lhs = lamb * w0 + erase_scale * (g @ w0.T).T @ c + preserve_scale * (w0 @ p.T) @ p
    gram = lamb * torch.eye(w0.shape[1], dtype=torch.float64, device=w0.device) + erase_scale * c.T @ c \
        + preserve_scale * p.T @ p
    return torch.linalg.solve(gram, lhs.T).T.to(w_old.dtype)  # gram is symmetric: W = lhs gram^-1
