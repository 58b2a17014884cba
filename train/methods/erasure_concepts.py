"""What an erasure module erases, resolved against its model's conditioner: each concept's requests, alternative and
the anchors as canonical requests (class ids, prompts) with their stable keys."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data.concepts import ConceptSet, concept_set
from models.conditioning import Conditioner
from train.runtime.checkpoint import load_teacher


@dataclass(frozen=True)
class ErasureConcepts:
    """Concepts resolved for one model (see `resolve_concepts`).

    names:        one name per concept.
    requests:     per concept, its erased requests in canonical form (conditioner.parse).
    alternatives: per concept, the request it is erased toward, or None (the null request: ESD).
    anchors:      anchor requests (canonical), whose predictions stay the frozen ones.
    spec:         the ConceptSet as given.
    """

    names: tuple[str, ...]
    requests: tuple[tuple[Any, ...], ...]
    alternatives: tuple[Any, ...]
    anchors: tuple[Any, ...]
    spec: ConceptSet

    @property
    def erased(self) -> list[tuple[Any, int]]:
        """(request, concept index) of every erased request, concept by concept."""
        return [(r, i) for i, rs in enumerate(self.requests) for r in rs]


def _kinds(conditioner: Conditioner) -> tuple[str, str]:
    """(what the requests are, what one target is), in the model's words, for messages."""
    known = conditioner.enumerate()
    if known is None:
        return "prompts", "prompt"
    names = getattr(conditioner, "names", None)
    span = f"0..{len(known) - 1}" + (f" (or names: {', '.join(names)})" if names else "")
    return f"classes in {span}", f"class in {span}"


def resolve_concepts(concepts: Any, targets: list | None, anchors: list | None,
                     conditioner: Conditioner) -> ErasureConcepts:
    """The concepts of an erasure module's arguments (data.concepts.concept_set: a spec path or mapping, or a list
    shorthand such as `[3]`; `targets`, `anchors` shorthands) as requests of `conditioner`: each request parsed, erased
    requests distinct, alternatives and anchors not erased; anchors default to every other request the conditioner
    can enumerate (every other class), or none (prompts). Every mistake is a ValueError saying what to give."""
    what, one = _kinds(conditioner)
    key = conditioner.key
    if isinstance(concepts, (list, tuple)):
        scalars = [c for c in concepts if not isinstance(c, dict)]
        try:
            keys = [key(c) for c in scalars]
        except ValueError as e:
            raise ValueError(f"concepts must be distinct {what}, got {list(concepts)} ({e})") from None
        if not concepts or len(set(keys)) != len(keys):
            raise ValueError(f"concepts must be distinct {what}, got {list(concepts)}")
        if targets is not None and len(targets) == len(concepts) == len(scalars):
            clash = [t for t in targets if _key_or_none(key, t) in keys]
            if clash:
                raise ValueError(f"targets {list(targets)} must not include an erased concept {list(concepts)}")
    spec = concept_set(concepts, targets, anchors, target_noun=one)

    def parse(request: Any, where: str) -> Any:
        try:
            return conditioner.parse(request)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    requests = tuple(tuple(parse(r, f"concept {c.name!r}") for r in c.requests) for c in spec.concepts)
    erased = [r for rs in requests for r in rs]
    erased_keys = [key(r) for r in erased]
    if len(set(erased_keys)) != len(erased_keys) or conditioner.key(conditioner.null_request) in erased_keys:
        raise ValueError(f"concepts must be distinct {what} (not the null request), got {erased}")
    alternatives = tuple(parse(c.alternative, f"the alternative of concept {c.name!r}") if c.toward else None
                         for c in spec.concepts)
    bad = [a for a in alternatives if a is not None and key(a) in erased_keys]
    if bad:
        raise ValueError(f"targets (alternatives) {bad} must not include an erased concept {erased}")
    if spec.anchors is None:
        known = conditioner.enumerate()
        kept = tuple(r for r in (known or []) if key(r) not in erased_keys)
    else:
        kept = tuple(parse(a, "anchors") for a in spec.anchors)
        if any(key(a) in erased_keys for a in kept):
            raise ValueError(f"anchors must be {what} that are not erased ({erased}), got {list(spec.anchors)}")
    return ErasureConcepts(tuple(c.name for c in spec.concepts), requests, alternatives, kept, spec)


def _key_or_none(key, request: Any) -> str | None:
    try:
        return key(request)
    except ValueError:
        return None


def load_prompt_model(model: str, model_config: dict | None, families: str,
                      edits: str) -> tuple[Any, dict, str | None]:
    """(the frozen denoiser in eval mode without gradients, its config, why it was not read from `model` or None:
    runtime.checkpoint.load_teacher) of the text model a prompt-side edit (UCE, text-encoder unlearning) changes; a
    path that does not exist, or a class-label model, is one line saying what to pass. families: the pipeline
    families it takes, for the message; edits: what the method edits, for the message."""
    try:
        frozen, config, unread = load_teacher(model, model_config)
    except FileNotFoundError:
        raise ValueError(f"model={model!r} does not exist; pass the model to edit as --model.init_args.model: a "
                         f"diffusers pipeline folder ({families}) or a text teacher checkpoint") from None
    if frozen.net.conditioner.enumerate() is not None:
        raise ValueError(f"{edits}; this model takes class labels: use train.methods.erasure.ConceptErasure")
    return frozen.requires_grad_(False).eval(), config, unread
