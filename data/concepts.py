"""Concept sets for erasure: what to erase (each concept's requests: prompts, or class ids or names), what to map it
to (an alternative request, or the null request), and what to preserve (anchor requests), read from YAML or built
from a module's shorthand arguments."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Union

Request = Union[int, str]  # a class id, or a class name or prompt (the model's conditioner decides which)

CONCEPT_KEYS = {"name", "prompts", "classes", "alternative"}
SPEC_KEYS = {"concepts", "anchors", "anchors_file", "anchors_column"}
EXAMPLE = """concepts:
  - name: van gogh
    prompts: ["van gogh", "a painting in the style of van gogh"]
    alternative: "a painting"        # optional; default "" (the null prompt: ESD's target)
anchors: ["a photo of a cat", "a painting by monet"]   # and/or anchors_file: prompts.txt
# class-conditional models: concepts: [{name: three, classes: [3], alternative: 8}], anchors: [0, 1] (or names),
# or the shorthand concepts: [3, 7]"""


@dataclass(frozen=True)
class Concept:
    """One concept to erase.

    name:        a label for logs and metrics.
    requests:    the requests that express the concept (the erased conditions c; prompts for a text model, class ids
                 or names for a class model). Trajectory-based erasure draws one per step (or per sample).
    alternative: the request the concept is guided toward ("" or None = the null request, i.e. ESD's negative
                 guidance away from c; a prompt or class = erase toward an alternative concept, as in All but One).
    """

    name: str
    requests: tuple[Request, ...]
    alternative: Request | None = ""

    @property
    def prompts(self) -> tuple[Request, ...]:
        """The requests (the name of the field in prompt specs)."""
        return self.requests

    @property
    def toward(self) -> bool:
        """True when the concept is erased toward an alternative (not toward the null request)."""
        return self.alternative not in ("", None)


@dataclass(frozen=True)
class ConceptSet:
    """Concepts to erase and anchor requests whose predictions are kept (SPM's latent anchoring); anchors None: not
    given (the erasure module's default: every other class of a class model, none for prompts)."""

    concepts: tuple[Concept, ...]
    anchors: tuple[Request, ...] | None = None

    @property
    def erased_requests(self) -> list[Request]:
        return [r for c in self.concepts for r in c.requests]

    @property
    def erased_prompts(self) -> list[Request]:
        return self.erased_requests


def _fail(where: str, msg: str) -> ValueError:
    return ValueError(f"concept spec {where}: {msg}\nExpected a YAML mapping like:\n{EXAMPLE}")


def _is_class_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _request_list(value: Any, where: str, what: str, ids: bool) -> tuple[Request, ...]:
    """Non-empty requests: strings (stripped, empty ones dropped) and, when `ids`, class ids."""
    if isinstance(value, str) or _is_class_id(value):
        value = [value]
    ok = isinstance(value, list) and all(isinstance(v, str) or ids and _is_class_id(v) for v in value)
    if not ok:
        kind = "a class id or name, or a list of them" if ids else "a prompt or a list of prompts (strings)"
        raise _fail(where, f"{what} must be {kind}, got {value!r}")
    out = tuple(v.strip() if isinstance(v, str) else v for v in value if not isinstance(v, str) or v.strip())
    if not out:
        raise _fail(where, f"{what} holds no non-empty request")
    return out


def _concept(c: Any, at: str, where: str) -> Concept:
    if isinstance(c, str):  # shorthand: the concept is its own (only) prompt or class name
        c = {"name": c, "prompts": [c]}
    elif _is_class_id(c):  # shorthand: a class id
        c = {"name": str(c), "classes": [c]}
    if not isinstance(c, dict):
        raise _fail(where, f"{at} must be a prompt, a class id or a mapping with name/prompts/classes/alternative, "
                           f"got {c!r}")
    bad = set(c) - CONCEPT_KEYS
    if bad:
        raise _fail(where, f"{at} has unknown key(s) {', '.join(sorted(map(str, bad)))}; allowed: "
                           f"{', '.join(sorted(CONCEPT_KEYS))}")
    if "prompts" in c and "classes" in c:
        raise _fail(where, f"{at} gives both prompts and classes; a concept is erased from one kind of model, keep one")
    if "classes" in c:
        requests = _request_list(c["classes"], where, f"{at}.classes", ids=True)
    else:
        requests = _request_list(c.get("prompts", c.get("name")), where, f"{at}.prompts", ids=False)
    alt = c.get("alternative", "")
    if alt is None:
        alt = ""
    if not isinstance(alt, str) and not _is_class_id(alt):
        raise _fail(where, f"{at}.alternative must be a prompt, class id or name (\"\" or null = the null request), "
                           f"got {alt!r}")
    alt = alt.strip() if isinstance(alt, str) else alt
    if alt != "" and alt in requests:
        raise _fail(where, f"{at}.alternative {alt!r} is one of the concept's own prompts or classes (a concept "
                           f"cannot be erased toward itself)")
    return Concept(str(c.get("name", requests[0])), requests, alt)


def _anchors(value: Any, concepts: list[Concept] | tuple[Concept, ...], where: str) -> tuple[Request, ...]:
    """Anchor requests ([] = none), none of them an erased request."""
    anchors = () if value == [] or value == () else _request_list(value, where, "anchors", ids=True)
    erased = {r for c in concepts for r in c.requests}
    clash = sorted(map(str, erased & set(anchors)))
    if clash:
        raise _fail(where, f"anchors {clash} are also erased requests; anchors must be requests that are not erased "
                           f"(an anchor is kept unchanged), so remove each from one of the lists")
    return anchors


def parse_concepts(spec: Any, where: str = "<dict>", base_dir: str | None = None) -> ConceptSet:
    """A ConceptSet from a parsed YAML/JSON mapping (see EXAMPLE); every mistake is a ValueError naming
    the field and what to write instead. anchors_file (relative to base_dir) is read with data.prompts."""
    if not isinstance(spec, dict):
        raise _fail(where, f"the top level must be a mapping, got {type(spec).__name__}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise _fail(where, f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; allowed: {', '.join(sorted(SPEC_KEYS))}")
    raw = spec.get("concepts")
    if isinstance(raw, (str, dict)) or _is_class_id(raw):
        raw = [raw]
    if not raw or not isinstance(raw, list):
        raise _fail(where, "`concepts` must list at least one concept")
    concepts = [_concept(c, f"concepts[{i}]", where) for i, c in enumerate(raw)]
    names = [c.name for c in concepts]
    if len(set(names)) != len(names):
        raise _fail(where, f"concept names must be distinct, got {names}")
    anchors: tuple[Request, ...] | None = None
    if spec.get("anchors") is not None:
        anchors = _anchors(spec["anchors"], concepts, where)
    if spec.get("anchors_file") is not None:
        from data.prompts import read_prompts

        path = os.path.join(base_dir or ".", os.path.expanduser(str(spec["anchors_file"])))
        anchors = _anchors(list(anchors or ()) + read_prompts(path, spec.get("anchors_column")), concepts, where)
    return ConceptSet(tuple(concepts), anchors)


def load_concepts(path: str) -> ConceptSet:
    """A ConceptSet from a YAML (or JSON) file; anchors_file is relative to the spec's folder."""
    import yaml

    local = os.path.expanduser(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"concept spec {path} does not exist; write a YAML file like:\n{EXAMPLE}")
    with open(local, encoding="utf-8") as f:
        try:
            spec = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"concept spec {path} is not valid YAML: {err}") from err
    return parse_concepts(spec, path, os.path.dirname(os.path.abspath(local)))


def concept_set(concepts: str | dict | list | int, targets: list | None = None, anchors: list | None = None,
                target_noun: str = "alternative") -> ConceptSet:
    """The ConceptSet of an erasure module's arguments.

    concepts: a concept spec (a YAML file path, or the mapping itself), or its `concepts` list alone (shorthand:
              `[3, 7]`, `["a cat"]`, or concept mappings);
    targets:  one alternative per concept (shorthand for each concept's `alternative`, e.g. `targets: [8]`);
    anchors:  anchor requests (shorthand for the spec's `anchors`; [] = none, None = the spec's, or the default);
    target_noun: what a target is, for messages (e.g. "class in 0..9").
    Giving a setting both in the spec and as an argument is an error (which one would hold is ambiguous)."""
    if isinstance(concepts, str):
        spec = load_concepts(concepts)
    elif isinstance(concepts, dict):
        spec = parse_concepts(concepts)
    else:
        spec = parse_concepts({"concepts": list(concepts) if isinstance(concepts, (list, tuple)) else concepts})
    found = spec.concepts
    if targets is not None:
        if any(c.toward for c in found):
            raise ValueError("give each concept's alternative either in the concept spec (`alternative:`) or as "
                             "`targets`, not both")
        if len(targets) != len(found) or not all(isinstance(t, str) or _is_class_id(t) for t in targets):
            raise ValueError(f"targets must give one {target_noun} per concept ({[c.name for c in found]}), "
                             f"got {list(targets)}")
        found = tuple(_concept({"name": c.name, **_requests_field(c), "alternative": t}, f"targets[{i}]", "arguments")
                      for i, (c, t) in enumerate(zip(found, targets)))
    kept = spec.anchors
    if anchors is not None:
        if kept is not None:
            raise ValueError("give anchors either in the concept spec (`anchors:`) or as the `anchors` argument, "
                             "not both")
        kept = _anchors(list(anchors), found, "arguments")
    return ConceptSet(tuple(found), kept)


def _requests_field(c: Concept) -> dict:
    """The spec field that gives `c`'s requests back (classes when any is a class id)."""
    return {"classes": list(c.requests)} if any(_is_class_id(r) for r in c.requests) else {"prompts": list(c.requests)}
