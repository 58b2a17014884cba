"""The guider contract: which branches a rule needs, and how it combines their predictions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from guidance.parameterization import Prediction

SPACES = ("x0", "eps", "v", "flow")


@dataclass(frozen=True)
class Branch:
    """One network evaluation a guider needs.

    name:    key of its Prediction in the dict handed to `Guider.combine`.
    cond:    "cond" (the positive condition), "null" (the network's null condition), "uncond" (the
             negative condition when the caller gives one, else null), or "neg:i" (the i-th of several
             negative conditions).
    model:   "main", or "weak" (autoguidance's second network).
    perturb: None, or the name of a perturbation the network applies (e.g. "pag"); perturbed branches
             are never batched with others.
    """

    name: str
    cond: str = "cond"
    model: str = "main"
    perturb: str | None = None


@dataclass
class GuideContext:
    """What a guider may look at beside the branch predictions.

    x_t [B, C, H, W]; t [B]; sigma, alpha [B, 1, 1, 1]; w [B] (per-sample scale in this project's
    convention, see guidance.guiders.cfg); cond as given by the caller; state: the guider's
    per-trajectory state (None outside a sampler loop).
    """

    x_t: Tensor
    t: Tensor
    alpha: Tensor
    sigma: Tensor
    w: Tensor
    cond: Any = None
    state: Any = None
    extras: dict = field(default_factory=dict)

    def scale(self, like: Tensor) -> Tensor:
        """w reshaped to broadcast against `like` [B, ...]."""
        return bcast(self.w, like)


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """Per-sample values [B] (or a scalar) reshaped to [B, 1, ..., 1] in like's dtype."""
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


class Guider:
    """Base class. Subclasses set `name`, document their parameters in `__init__`, and implement
    `branches` and `combine`. `space` is the parameterisation the rule is written in; for affine rules
    (branch weights summing to 1) every space gives the same D.
    """

    name: ClassVar[str] = ""
    stateful: ClassVar[bool] = False

    def __init__(self, space: str = "x0"):
        if space not in SPACES:
            raise ValueError(f"{type(self).__name__}: space must be one of {', '.join(SPACES)}, got {space!r}")
        self.space = space

    def branches(self, state: Any = None) -> list[Branch]:
        raise NotImplementedError

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext) -> tuple[Prediction, Any]:
        """Combine branch predictions into the guided Prediction; returns (prediction, new state)."""
        raise NotImplementedError

    def init_state(self, batch_size: int) -> Any:
        """Fresh per-trajectory state (None for stateless rules)."""
        return None

    def read(self, preds: dict[str, Prediction], name: str) -> Tensor:
        """A branch's prediction in this guider's space."""
        return preds[name].read(self.space)

    def build(self, y: Tensor, like: Prediction) -> Prediction:
        """A Prediction from a value in this guider's space."""
        return Prediction.from_space(y, self.space, like)

    def describe(self) -> dict:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}
