"""Concept specifications for erasure: what to erase (concept prompts), what to map it to (an alternative
concept, or the unconditional null prompt), and what to preserve (anchor prompts), read from YAML."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

CONCEPT_KEYS = {"name", "prompts", "alternative"}
SPEC_KEYS = {"concepts", "anchors", "anchors_file", "anchors_column"}
EXAMPLE = """concepts:
  - name: van gogh
    prompts: ["van gogh", "a painting in the style of van gogh"]
    alternative: "a painting"        # optional; default "" (the null prompt: ESD's target)
anchors: ["a photo of a cat", "a painting by monet"]   # and/or anchors_file: prompts.txt"""


@dataclass(frozen=True)
class Concept:
    """One concept to erase.

    name:        a label for logs and metrics.
    prompts:     prompts that express the concept (the erased conditions c; ESD samples one per step).
    alternative: the prompt the concept is guided toward ("" = the null prompt, i.e. ESD's negative guidance
                 away from c; a prompt = erase toward an alternative concept, as in All but One).
    """

    name: str
    prompts: tuple[str, ...]
    alternative: str = ""


@dataclass(frozen=True)
class ConceptSet:
    """Concepts to erase and anchor prompts whose predictions are kept (SPM's latent anchoring)."""

    concepts: tuple[Concept, ...]
    anchors: tuple[str, ...] = field(default_factory=tuple)

    @property
    def erased_prompts(self) -> list[str]:
        return [p for c in self.concepts for p in c.prompts]


def _fail(where: str, msg: str) -> ValueError:
    return ValueError(f"concept spec {where}: {msg}\nExpected a YAML mapping like:\n{EXAMPLE}")


def _prompt_list(value: Any, where: str, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, f"{what} must be a prompt or a list of prompts (strings), got {value!r}")
    out = tuple(v.strip() for v in value if v.strip())
    if not out:
        raise _fail(where, f"{what} holds no non-empty prompt")
    return out


def parse_concepts(spec: Any, where: str = "<dict>", base_dir: str | None = None) -> ConceptSet:
    """A ConceptSet from a parsed YAML/JSON mapping (see EXAMPLE); every mistake is a ValueError naming
    the field and what to write instead. anchors_file (relative to base_dir) is read with data.prompts."""
    if not isinstance(spec, dict):
        raise _fail(where, f"the top level must be a mapping, got {type(spec).__name__}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise _fail(where, f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; allowed: {', '.join(sorted(SPEC_KEYS))}")
    raw = spec.get("concepts")
    if isinstance(raw, (str, dict)):
        raw = [raw]
    if not raw or not isinstance(raw, list):
        raise _fail(where, "`concepts` must list at least one concept")
    concepts = []
    for i, c in enumerate(raw):
        at = f"concepts[{i}]"
        if isinstance(c, str):  # shorthand: the concept is its own (only) prompt
            c = {"name": c, "prompts": [c]}
        if not isinstance(c, dict):
            raise _fail(where, f"{at} must be a prompt or a mapping with name/prompts/alternative, got {c!r}")
        bad = set(c) - CONCEPT_KEYS
        if bad:
            raise _fail(where, f"{at} has unknown key(s) {', '.join(sorted(map(str, bad)))}; allowed: "
                               f"{', '.join(sorted(CONCEPT_KEYS))}")
        prompts = _prompt_list(c.get("prompts", c.get("name")), where, f"{at}.prompts")
        alt = c.get("alternative", "")
        if alt is None:
            alt = ""
        if not isinstance(alt, str):
            raise _fail(where, f"{at}.alternative must be a prompt (a string; \"\" = the null prompt), got {alt!r}")
        if alt.strip() and alt.strip() in prompts:
            raise _fail(where, f"{at}.alternative {alt!r} is one of the concept's own prompts")
        concepts.append(Concept(str(c.get("name", prompts[0])), prompts, alt.strip()))
    names = [c.name for c in concepts]
    if len(set(names)) != len(names):
        raise _fail(where, f"concept names must be distinct, got {names}")
    anchors: tuple[str, ...] = ()
    if spec.get("anchors") is not None:
        anchors = _prompt_list(spec["anchors"], where, "anchors")
    if spec.get("anchors_file") is not None:
        from data.prompts import read_prompts

        path = os.path.join(base_dir or ".", os.path.expanduser(str(spec["anchors_file"])))
        anchors += tuple(read_prompts(path, spec.get("anchors_column")))
    erased = {p for c in concepts for p in c.prompts}
    clash = sorted(erased & set(anchors))
    if clash:
        raise _fail(where, f"anchor prompts {clash} are also erased prompts; an anchor is kept unchanged, so remove it "
                           f"from one of the lists")
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
