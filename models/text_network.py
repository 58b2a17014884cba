"""The null text condition shared by every text-conditioned adapter: empty-prompt embeddings held as
buffers, `null_cond` and `drop_cond` over text condition dicts (see models.text_encoders)."""
from __future__ import annotations

import torch
from torch import Tensor

from models.adapters import ConditionalNetwork


class TextConditionalNetwork(ConditionalNetwork):
    """Base of the text adapters (UNet2DConditionModel, SD3 and Flux transformers).

    `_set_null(null_cond, keys)` stores the null condition's entries `keys` (batch size 1) as
    non-persistent buffers `null_<key>`, so the module's state dict stays exactly the diffusers network's.
    Other entries of a condition (SDXL time_ids, Flux's guidance) are left as they are by null_cond/drop_cond.
    """

    _null_keys: list[str]

    def _set_null(self, null_cond: dict[str, Tensor], keys: tuple[str, ...], dtype: torch.dtype) -> None:
        missing = [k for k in keys if k not in null_cond]
        if missing:
            raise ValueError(f"the null condition lacks {missing}; it needs {list(keys)} (build it with the prompt "
                             f"encoder of the same model family, `PromptEncoder.null(1)`)")
        self._null_keys = list(keys)
        for k in keys:
            v = null_cond[k]
            if v.shape[0] != 1:
                raise ValueError(f"null_cond[{k!r}] must have batch size 1, got shape {tuple(v.shape)}")
            self.register_buffer(f"null_{k}", v.detach().to(dtype), persistent=False)

    def null_cond(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """The condition with its text entries replaced by the null text (batch size kept)."""
        b = cond[self._null_keys[0]].shape[0]
        out = dict(cond)
        for k in self._null_keys:
            null = getattr(self, f"null_{k}")
            null = null.expand(b, *null.shape[1:])
            out[k] = null.to(cond[k].dtype) if k in cond else null
        return out

    def drop_cond(self, cond: dict[str, Tensor], p: float, generator: torch.Generator | None = None,
                  u: Tensor | None = None) -> dict[str, Tensor]:
        """Replace the text of a random fraction p of samples by the null text (Ho & Salimans 2022, Algorithm 1);
        `u` [B]: the uniform draws to use (drop where u < p) instead of drawing them here."""
        if p <= 0:
            return cond
        ref = cond[self._null_keys[0]]
        if u is None:
            u = torch.rand(ref.shape[0], generator=generator, device=generator.device if generator else ref.device)
        drop = (u < p).to(ref.device)
        null = self.null_cond(cond)
        out = dict(cond)
        for k in self._null_keys:
            out[k] = torch.where(drop.reshape(-1, *([1] * (cond[k].ndim - 1))), null[k], cond[k])
        return out
