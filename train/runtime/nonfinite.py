"""NaN/inf in a loss term or a gradient: skip the update or stop, reported with the step and the term's name."""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import Tensor

POLICIES = ("skip", "stop")


class NonFiniteLoss(UserWarning):
    """A loss term or a gradient was NaN/inf; the update it belonged to was skipped."""


class NonFiniteError(RuntimeError):
    """Training stopped on a NaN/inf loss term or gradient; the message says where and what to change."""


def nonfinite_terms(terms: dict[str, Tensor]) -> dict[str, float]:
    """{name: value} of the loss terms that are not finite (a term with several elements: its sum)."""
    sums = {k: v.detach().float().sum() for k, v in terms.items()}
    return {k: float(v) for k, v in sums.items() if not torch.isfinite(v)}


def nonfinite_gradient(params: Iterable[Tensor], terms: Iterable[str]) -> dict[str, float]:
    """{"gradient of a+b": norm} when the gradient of `params` (those that have one) is not finite, else {}."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return {}
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return {} if torch.isfinite(norm) else {f"gradient of {'+'.join(terms) or 'loss'}": float(norm)}


class NonFiniteGuard:
    """The policy a method module applies when a loss term or a gradient of an update is NaN or inf.

    policy:    "skip": the update is not applied (weights, optimizer moments and EMA stay as they were), a
               NonFiniteLoss warning names the step and the terms, and the update is recorded in `skipped`;
               "stop": training ends with a NonFiniteError naming the step and the terms.
    max_skips: under "skip", this many skipped updates in a row end training with a NonFiniteError (a run
               that only skips is not training).
    """

    def __init__(self, policy: str = "skip", max_skips: int = 10):
        if policy not in POLICIES:
            raise ValueError(f"nonfinite must be one of {', '.join(POLICIES)} (what to do with a NaN/inf loss or "
                             f"gradient), got {policy!r}")
        if max_skips < 1:
            raise ValueError(f"max_skips must be >= 1, got {max_skips}")
        self.policy, self.max_skips = policy, max_skips
        self.skipped: list[dict] = []  # {"step", "phase", "terms"} of every skipped update
        self.in_a_row = 0

    def handle(self, step: int, phase: str, bad: dict[str, float]) -> None:
        """A `phase` update at `step` had the non-finite values `bad` ({term: value}): stop or record and warn."""
        desc = ", ".join(f"{k}={v}" for k, v in bad.items())
        if self.policy == "stop":
            raise NonFiniteError(f"step {step}: non-finite {desc} in the {phase} update; training stopped "
                                 f"(nonfinite: stop). Lower the learning rate, clip gradients, check the data and "
                                 f"the checkpoints it starts from, or set nonfinite: skip to skip such updates")
        self.skipped.append({"step": step, "phase": phase, "terms": bad})
        warnings.warn(f"step {step}: non-finite {desc}; skipped this {phase} update", NonFiniteLoss, stacklevel=3)

    def count(self, phase: str, applied: bool) -> None:
        """Count consecutive skipped `phase` updates; stop after max_skips of them."""
        self.in_a_row = 0 if applied else self.in_a_row + 1
        if self.in_a_row >= self.max_skips:
            last = self.skipped[-1]
            desc = ", ".join(f"{k}={v}" for k, v in last["terms"].items())
            raise NonFiniteError(f"{self.in_a_row} {phase} updates in a row had non-finite values (last: step "
                                 f"{last['step']}, {desc}); lower the learning rate, clip gradients, or check the data "
                                 f"and the checkpoints training starts from")

    def __repr__(self) -> str:
        return f"NonFiniteGuard(policy={self.policy!r}, max_skips={self.max_skips})"
