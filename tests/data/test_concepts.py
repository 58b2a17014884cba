"""Concept sets whose requests are class ids or names as well as prompts: the YAML form, the module shorthands
(`concepts: [3]`, `targets: [8]`, `anchors: [...]`) and the mistakes they refuse."""
from __future__ import annotations

import pytest

from data.concepts import Concept, ConceptSet, concept_set, load_concepts, parse_concepts


def concepts_of(concepts, anchors) -> ConceptSet:
    return ConceptSet(tuple(Concept(*c) for c in concepts), anchors)


def test_class_concepts_in_the_spec_and_as_shorthand():
    cs = parse_concepts({"concepts": [{"name": "three", "classes": [3, "trois"], "alternative": 8}, 7],
                         "anchors": [0, "one"]})
    assert cs.concepts == (Concept("three", (3, "trois"), 8), Concept("7", (7,), ""))
    assert cs.concepts[0].toward and not cs.concepts[1].toward
    assert cs.anchors == (0, "one") and cs.erased_requests == [3, "trois", 7]
    assert concept_set([3, 7]) == concepts_of([("3", (3,), ""), ("7", (7,), "")], None)
    assert concept_set([3], targets=[8], anchors=[0, 1]) == concepts_of([("3", (3,), 8)], (0, 1))
    assert concept_set(["a cat"], targets=["a dog"]).concepts[0] == Concept("a cat", ("a cat",), "a dog")
    assert concept_set([3], anchors=[]).anchors == ()  # [] = no anchors; None = not given
    assert concept_set({"concepts": ["a cat"]}).anchors is None


def test_a_prompt_spec_file_still_reads_and_takes_the_shorthands(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("concepts:\n  - name: cat\n    prompts: [a cat, the cat]\n")
    cs = concept_set(str(spec), targets=["a dog"], anchors=["the dog"])
    assert cs.concepts[0].prompts == ("a cat", "the cat") and cs.concepts[0].alternative == "a dog"
    assert cs.anchors == ("the dog",)
    assert load_concepts(str(spec)).anchors is None


@pytest.mark.parametrize("args, needle", [
    (({"concepts": [{"prompts": ["x"], "classes": [1]}]},), "both prompts and classes"),
    (({"concepts": [{"name": "a", "classes": [1.5]}]},), r"classes must be a class id or name"),
    (({"concepts": [{"name": "a", "classes": [2], "alternative": 2}]},), "own prompts or classes"),
    (({"concepts": [{"name": "a", "prompts": ["x"], "alternative": [1]}]},), "alternative must be"),
    (([3], [1, 2]), "one alternative per concept"),
    (({"concepts": [{"name": "a", "classes": [3], "alternative": 8}]}, [1]), "not both"),
    (({"concepts": [3], "anchors": [1]}, None, [2]), "not both"),
    (([3], None, [3]), "not erased"),
    (([True],), "must be a prompt, a class id"),
])
def test_mistakes_say_what_to_change(args, needle):
    with pytest.raises(ValueError, match=needle):
        concept_set(*args)
