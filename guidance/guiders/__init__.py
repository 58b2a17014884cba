"""Guiders by name: `build_guider("cfg", convention="original")`, nested ones from dict configs
(`build_guider("interval", sigma_lo=0.3, sigma_hi=5.0, inner={"name": "apg", "eta": 0.0})`),
`list_guiders()`."""
from __future__ import annotations

import inspect
from typing import Any

from guidance.guiders.adaptive import AdaptiveGuidance
from guidance.guiders.apg import APG
from guidance.guiders.autoguidance import Autoguidance
from guidance.guiders.base import Branch, GuideContext, Guider, Wrapper
from guidance.guiders.cfg import CFG, Conditional
from guidance.guiders.cfg_pp import CFGPlusPlus
from guidance.guiders.cfg_zero_star import CFGZeroStar
from guidance.guiders.classifier import ClassifierGuidance
from guidance.guiders.flowchef import FlowChef
from guidance.guiders.gfcg import GFCG
from guidance.guiders.interval import Interval
from guidance.guiders.pag import PAG
from guidance.guiders.perp_neg import PerpNeg
from guidance.guiders.rescale import Rescale

GUIDERS: dict[str, type[Guider]] = {g.name: g for g in (
    Conditional, CFG, Rescale, PerpNeg, CFGPlusPlus, APG, Interval, AdaptiveGuidance, Autoguidance,
    CFGZeroStar, ClassifierGuidance, GFCG, FlowChef, PAG)}


def build_guider(name: str, **params) -> Guider:
    """Instantiate a registered guider; unknown names and parameters get a message listing what exists.

    `inner` (wrappers: rescale, interval, flowchef) may be a Guider, a registered name, or a dict
    {"name": ..., **params}, built recursively.
    """
    if name not in GUIDERS:
        raise ValueError(f"unknown guider {name!r}; available: {', '.join(sorted(GUIDERS))} "
                         f"(`python -m train guiders` lists them with their parameters)")
    cls = GUIDERS[name]
    sig = inspect.signature(cls.__init__)
    unknown = [p for p in params if p not in sig.parameters]
    if unknown:
        allowed = [p for p in sig.parameters if p != "self"]
        raise ValueError(f"guider {name!r} has no parameter(s) {', '.join(unknown)}; it takes: {', '.join(allowed) or 'none'}")
    if "inner" in params:
        params["inner"] = _build_inner(name, params["inner"])
    return cls(**params)


def _build_inner(outer: str, spec: Any) -> Guider | None:
    if spec is None or isinstance(spec, Guider):
        return spec
    if isinstance(spec, str):
        return build_guider(spec)
    if isinstance(spec, dict):
        if "name" not in spec:
            raise ValueError(f"guider {outer!r}: inner config {spec!r} needs a 'name' key (one of {', '.join(sorted(GUIDERS))})")
        spec = dict(spec)
        return build_guider(spec.pop("name"), **spec)
    raise ValueError(f"guider {outer!r}: inner must be a Guider, a guider name or a dict with 'name', got {type(spec).__name__}")


def list_guiders() -> list[tuple[str, str, dict]]:
    """(name, first docstring line, {parameter: default}) for every registered guider."""
    out = []
    for name, cls in sorted(GUIDERS.items()):
        sig = inspect.signature(cls.__init__)
        params = {p.name: (None if p.default is inspect.Parameter.empty else p.default)
                  for p in sig.parameters.values() if p.name != "self"}
        out.append((name, (cls.__doc__ or "").strip().splitlines()[0], params))
    return out


__all__ = ["Branch", "GuideContext", "Guider", "Wrapper", "GUIDERS", "build_guider", "list_guiders", "CFG",
           "Conditional", "Rescale", "PerpNeg", "CFGPlusPlus", "APG", "Interval", "AdaptiveGuidance",
           "Autoguidance", "CFGZeroStar", "ClassifierGuidance", "GFCG", "FlowChef", "PAG"]
