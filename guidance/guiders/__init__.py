"""Guiders by name: `build_guider("cfg", convention="original")`, `list_guiders()`."""
from __future__ import annotations

import inspect

from guidance.guiders.base import Branch, GuideContext, Guider
from guidance.guiders.cfg import CFG, Conditional

GUIDERS: dict[str, type[Guider]] = {g.name: g for g in (Conditional, CFG)}


def build_guider(name: str, **params) -> Guider:
    """Instantiate a registered guider; unknown names and parameters get a message listing what exists."""
    if name not in GUIDERS:
        raise ValueError(f"unknown guider {name!r}; available: {', '.join(sorted(GUIDERS))} "
                         f"(`python -m train guiders` lists them with their parameters)")
    cls = GUIDERS[name]
    sig = inspect.signature(cls.__init__)
    unknown = [p for p in params if p not in sig.parameters]
    if unknown:
        allowed = [p for p in sig.parameters if p != "self"]
        raise ValueError(f"guider {name!r} has no parameter(s) {', '.join(unknown)}; it takes: {', '.join(allowed) or 'none'}")
    return cls(**params)


def list_guiders() -> list[tuple[str, str, dict]]:
    """(name, first docstring line, {parameter: default}) for every registered guider."""
    out = []
    for name, cls in sorted(GUIDERS.items()):
        sig = inspect.signature(cls.__init__)
        params = {p.name: (None if p.default is inspect.Parameter.empty else p.default)
                  for p in sig.parameters.values() if p.name != "self"}
        out.append((name, (cls.__doc__ or "").strip().splitlines()[0], params))
    return out


__all__ = ["Branch", "GuideContext", "Guider", "GUIDERS", "build_guider", "list_guiders", "CFG", "Conditional"]
