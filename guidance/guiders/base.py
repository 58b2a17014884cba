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
    per-trajectory state (None outside a sampler loop). extras: "guided" (the GuidedDenoiser, for
    guiders that need a branch whose condition depends on other branches, e.g. GFCG) and "neg_cond".
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

    def point(self) -> Prediction:
        """A placeholder Prediction at (x_t, alpha, sigma) with x0 = x_t, used as `like` when a guider
        builds its output without any branch (e.g. CFG-Zero*'s zero-init steps). Float32 or wider."""
        dtype = torch.promote_types(self.x_t.dtype, torch.float32)
        x = self.x_t.to(dtype)
        a, s = bcast(self.alpha.reshape(-1), x), bcast(self.sigma.reshape(-1), x)
        return Prediction(x_t=x, alpha=a, sigma=s, x0=x, eps=x)


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """Per-sample values [B] (or a scalar) reshaped to [B, 1, ..., 1] in like's dtype."""
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product <a, b> over all non-batch dims: [B, ...] x [B, ...] -> [B, 1, ..., 1]."""
    return (a * b).sum(dim=tuple(range(1, a.ndim)), keepdim=True)


class Guider:
    """Base class. Subclasses set `name`, document their parameters in `__init__`, and implement
    `branches` and `combine`. `space` is the parameterisation the rule is written in; for affine rules
    (branch weights summing to 1) every space gives the same D.
    """

    name: ClassVar[str] = ""
    stateful: ClassVar[bool] = False
    overrides_eps: ClassVar[bool] = False  # True when the returned Prediction's eps is not (x_t - alpha x0)/sigma

    def __init__(self, space: str = "x0"):
        if space not in SPACES:
            raise ValueError(f"{type(self).__name__}: space must be one of {', '.join(SPACES)}, got {space!r}")
        self.space = space

    def branches(self, state: Any = None) -> list[Branch]:
        raise NotImplementedError

    def branches_at(self, state: Any, t: Tensor, alpha: Tensor, sigma: Tensor) -> list[Branch]:
        """Branches for a call at time t [B] (alpha, sigma [B, 1, ...]); gates written in t or sigma
        override this to skip branches (guidance interval). Defaults to `branches(state)`."""
        return self.branches(state)

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext) -> tuple[Prediction, Any]:
        """Combine branch predictions into the guided Prediction; returns (prediction, new state)."""
        raise NotImplementedError

    def init_state(self, batch_size: int) -> Any:
        """Fresh per-trajectory state (None for stateless rules)."""
        return None

    def to(self, device: torch.device | str) -> "Guider":
        """Move the networks this rule holds to `device`, where the sampler runs: an attribute that is an nn.Module or a
        bound method of one (classifier guidance's and GFCG's classifier) and inner guiders. Rules without networks are
        unchanged; a plain function that closes over a network must place that network itself. Returns self."""
        for value in vars(self).values():
            owner = getattr(value, "__self__", value)  # a bound method's module
            if owner is not self and isinstance(owner, (torch.nn.Module, Guider)):
                owner.to(device)
        return self

    def read(self, preds: dict[str, Prediction], name: str) -> Tensor:
        """A branch's prediction in this guider's space."""
        return preds[name].read(self.space)

    def build(self, y: Tensor, like: Prediction) -> Prediction:
        """A Prediction from a value in this guider's space."""
        return Prediction.from_space(y, self.space, like)

    def describe(self) -> dict:
        """JSON-able description: parameters, nested guiders described, callables by name."""
        out = {"name": self.name}
        for k, v in vars(self).items():
            if k.startswith("_"):
                continue
            if isinstance(v, Guider):
                v = v.describe()
            elif callable(v):
                v = getattr(v, "__qualname__", type(v).__name__)
            out[k] = v
        return out


class Wrapper(Guider):
    """A guider that modifies the result of an `inner` guider (rescale, interval, FlowChef).

    Branches, state and the eps override are the inner guider's; `combine` calls the inner guider
    first. Wrappers with `needs_cond` (rescale, interval measure against or fall back to D_c) require
    an inner guider with a "cond" branch and add it on calls where the inner one asks for none
    (CFG-Zero*'s zero-init steps).
    """

    needs_cond: ClassVar[bool] = True

    def __init__(self, inner: Guider, space: str = "x0"):
        super().__init__(space)
        if not isinstance(inner, Guider):
            raise ValueError(f"{type(self).__name__}: inner must be a Guider (build nested ones with "
                             f"build_guider(..., inner={{'name': 'cfg', ...}})), got {type(inner).__name__}")
        if self.needs_cond and not any(b.name == "cond" for b in inner.branches(None)):
            raise ValueError(f"{type(self).__name__}: inner guider {inner.name!r} has no 'cond' branch; "
                             f"wrap a guider that evaluates the conditional prediction")
        self.inner = inner

    def _with_cond(self, branches: list[Branch]) -> list[Branch]:
        if not self.needs_cond or any(b.name == "cond" for b in branches):
            return branches
        return [Branch("cond", "cond"), *branches]

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return self.inner.stateful

    @property
    def overrides_eps(self) -> bool:  # type: ignore[override]
        return self.inner.overrides_eps

    def branches(self, state: Any = None) -> list[Branch]:
        return self._with_cond(self.inner.branches(state))

    def branches_at(self, state, t, alpha, sigma):
        return self._with_cond(self.inner.branches_at(state, t, alpha, sigma))

    def init_state(self, batch_size: int) -> Any:
        return self.inner.init_state(batch_size)
