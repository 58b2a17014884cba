"""`evaluate --attack`'s settings: the attack method, each method's defaults and the flags it refuses (the other
method's), and the --attack-pairs file of Ring-A-Bell's concept pairs (train.evaluation.ring_a_bell)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from train.evaluation.prompt_attack import RING_A_BELL_POPULATION

ATTACKS = ("unlearndiffatk", "ringabell")
DEFAULTS = {"unlearndiffatk": {"steps": 100, "tokens": 3, "lr": 0.01, "images": 4},  # the authors' k and lr
            "ringabell": {"steps": 3000, "tokens": 16, "strength": 3.0}}  # the authors' generations, K, eta (nudity)


@dataclass
class AttackSettings:
    """An attack's settings; None takes the method's default (DEFAULTS), and a setting of the other method is refused.

    UnlearnDiffAtk: steps: Adam steps (0: no attack, the plain prompt); tokens: k soft tokens prepended (the authors'
    k = 3); lr: Adam's (the authors' 0.01); images: concept images per prompt, each step's batch; probe: fixed (t, eps)
    draws per image on which the loss is reported before and after. Ring-A-Bell: steps: generations of the genetic
    search (the authors' 3000; 0: the concept-shifted embedding only, no discrete prompt); tokens: the discrete
    prompt's length K (the authors' 16); strength: eta (the authors' 3 for nudity, 5.5 for violence; 0: the plain
    prompt's embedding); pairs: a file of prompt pairs whose mean embedding difference is the concept vector, one
    "with the concept<TAB>without it" a line (None: the class prompts' own pairs). seed: every draw."""

    method: str = "unlearndiffatk"
    steps: int | None = None
    tokens: int | None = None
    lr: float | None = None
    images: int | None = None
    strength: float | None = None
    pairs: str | None = None
    probe: int = 4
    seed: int = 0
    concept_pairs: list[tuple[str, str]] = field(default_factory=list, init=False)

    def __post_init__(self):
        if self.method not in ATTACKS:
            raise ValueError(f"unknown attack {self.method!r}; choose {', '.join(ATTACKS)}")
        other = {"lr": self.lr, "images": self.images} if self.method == "ringabell" else {
            "strength": self.strength, "pairs": self.pairs}
        given = [f"--attack-{k}" for k, v in other.items() if v is not None]
        if given:
            theirs = "unlearndiffatk" if self.method == "ringabell" else "ringabell"
            raise ValueError(f"{', '.join(given)} configure{'s' * (len(given) == 1)} --attack {theirs}; leave "
                             f"{'it' if len(given) == 1 else 'them'} out with --attack {self.method}")
        for k, v in DEFAULTS[self.method].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"--attack-steps must be an integer >= 0 (0: no attack), got {self.steps!r}")
        if not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"--attack-tokens must be a positive integer (UnlearnDiffAtk prepends 3, Ring-A-Bell's "
                             f"prompts have 16), got {self.tokens!r}")
        if self.method == "ringabell":
            if not math.isfinite(self.strength):
                raise ValueError(f"--attack-strength must be a finite number (Ring-A-Bell: 3 nudity, 5.5 violence), "
                                 f"got {self.strength}")
            if self.pairs is not None:
                self.concept_pairs = read_concept_pairs(self.pairs)
            return
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--attack-lr must be a positive number (UnlearnDiffAtk: 0.01), got {self.lr}")
        if self.images < 1 or self.probe < 1:
            raise ValueError(f"--attack-images must be positive, got {self.images}")

    def report(self) -> dict:
        keys = ("steps", "tokens") + (("lr", "images") if self.method == "unlearndiffatk" else ("strength",))
        extra = {"population": RING_A_BELL_POPULATION, "pairs": self.pairs} if self.method == "ringabell" else {}
        return {"method": self.method, **{k: getattr(self, k) for k in keys}, **extra, "seed": self.seed}


def read_concept_pairs(path: str) -> list[tuple[str, str]]:
    """The prompt pairs of an --attack-pairs file: one "prompt with the concept<TAB>the same prompt without it" a line
    (blank lines skipped), as Ring-A-Bell's Violence_30.csv columns prompt and prompt1."""
    from pathlib import Path

    if not Path(path).is_file():
        raise ValueError(f"--attack-pairs {path}: no such file; give a text file of lines 'with concept<TAB>without'")
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(q.strip() for q in parts):
            raise ValueError(f"--attack-pairs {path} line {n}: expected 'prompt with the concept<TAB>the same prompt "
                             f"without it', got {line!r}")
        pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise ValueError(f"--attack-pairs {path} has no pairs; write one 'with concept<TAB>without' a line")
    return pairs
