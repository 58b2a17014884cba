"""Guiders by name: `build_guider("cfg", convention="original")`, nested ones from dict configs
(`build_guider("interval", sigma_lo=0.3, sigma_hi=5.0, inner={"name": "apg", "eta": 0.0})`),
`list_guiders()`."""
from __future__ import annotations

import collections.abc
import inspect
import types
import typing
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
    hints = typing.get_type_hints(cls.__init__)
    for p, spec in sig.parameters.items():
        if p == "self" or p in params or spec.default is not inspect.Parameter.empty:
            continue
        if _is_callable(hints.get(p)):
            raise ValueError(f"guider {name!r} needs `{p}`, a Python callable, so it is usable from Python only "
                             f"(guidance.guiders.build_guider({name!r}, {p}=...)); from the command line use another "
                             f"guider (`python -m train guiders` marks which)")
        raise ValueError(f"guider {name!r} needs the parameter {p} (--param {p}=VALUE)")
    for p, value in params.items():
        if p != "inner" and p in hints and not _matches(value, hints[p]):
            raise ValueError(f"guider {name!r} parameter {p} must be {_describe(hints[p])}, got {value!r}")
    if "inner" in params:
        params["inner"] = _build_inner(name, params["inner"])
    return cls(**params)


def _is_callable(hint: Any) -> bool:
    return typing.get_origin(hint) is collections.abc.Callable or hint is collections.abc.Callable


def _matches(value: Any, hint: Any) -> bool:
    """Whether a parameter value fits its annotation (numbers, booleans, strings, sequences of numbers, unions)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin in (collections.abc.Sequence, tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else True
    return True  # anything else (a callable, a Guider, Any) is checked by the guider itself


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin in (collections.abc.Sequence, tuple, list):
        item = typing.get_args(hint)[0]
        return "a list of " + {float: "numbers", int: "integers", str: "strings"}.get(item, _describe(item))
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


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
    """(name, first docstring line, {parameter: default}) for every registered guider; the line of a guider that
    needs a Python callable (usable from Python only) says so."""
    out = []
    for name, cls in sorted(GUIDERS.items()):
        sig = inspect.signature(cls.__init__)
        hints = typing.get_type_hints(cls.__init__)
        params = {p.name: (None if p.default is inspect.Parameter.empty else p.default)
                  for p in sig.parameters.values() if p.name != "self"}
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        if any(p.default is inspect.Parameter.empty and _is_callable(hints.get(p.name))
               for p in sig.parameters.values() if p.name != "self"):
            doc += " (Python only: needs a callable)"
        out.append((name, doc, params))
    return out


__all__ = ["Branch", "GuideContext", "Guider", "Wrapper", "GUIDERS", "build_guider", "list_guiders", "CFG",
           "Conditional", "Rescale", "PerpNeg", "CFGPlusPlus", "APG", "Interval", "AdaptiveGuidance",
           "Autoguidance", "CFGZeroStar", "ClassifierGuidance", "GFCG", "FlowChef", "PAG"]
