"""The attack probe against a known-erased toy and an unerased one (issue #21 item 3): `evaluate --attack
unlearndiffatk` on a text-to-digits model known by construction (tests/train/attack_toys.py: the exact denoiser of a
prompt-weighted mixture of the mean digits, the weights read by one cross-attention head) and on its UCE erasure of
"the number 7". The unerased model draws sevens and the attack has nothing to win; the erased one does not, and the
attack brings them back, judged by the digits classifier. It fails if the attack learns nothing (no Adam step, no
gradient reaching the soft tokens), attacks the original model or takes its target images from the erased one, or if
the rate is not read off the attacked samples (each checked by breaking train/evaluation/unlearndiffatk.py or
attack.py that way), and if the nearest words are evaluated as their decoded text instead of their token ids (0.0
instead of 1.0, checked)."""
from __future__ import annotations

import json
import os

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEMPLATE = "the number {digit}"
ATTACK = ["--attack", "unlearndiffatk", "--attack-steps", "100", "--attack-lr", "0.05", "--attack-images", "4"]


@pytest.fixture(scope="module")
def toys(tmp_path_factory, classifier):
    """(unerased teacher checkpoint, its UCE erasure of "the number 7" fitted through the CLI)."""
    from tests.train.attack_toys import token_identity_pipeline, write_teacher
    from tests.train.text_fits import TRAINER
    from train.cli import main

    root = tmp_path_factory.mktemp("attack-contrast")
    folder = token_identity_pipeline(root / "pipeline")
    teacher = write_teacher(folder, root / "teacher.ckpt")
    cfg = {"seed_everything": 0,
           "model": {"class_path": "train.methods.uce.ClosedFormErasure", "init_args": {
               "model": str(teacher), "concepts": {"concepts": [{"name": "seven", "prompts": ["the number 7"]}],
                                                    "anchors": [f"the number {d}" for d in range(10) if d != 7]},
               "val_samples": 0}},
           "data": {"class_path": "data.steps.ErasureSteps", "init_args": {"steps_per_epoch": 1}},
           "trainer": {**TRAINER, "max_steps": 1, "limit_val_batches": 0, "val_check_interval": None,
                       "default_root_dir": str(root / "uce")}}
    (root / "uce.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    main(["fit", "--config", str(root / "uce.yaml")])
    return teacher, root / "uce" / "checkpoints" / "last.ckpt"


def evaluate(ckpt, out, *attack: str) -> dict:
    """`evaluate --attack` of the seven's prompt among the ten class prompts (10 samples each, w = 1, 10 DDIM steps)."""
    from train.cli import main

    main(["evaluate", "--ckpt", str(ckpt), "--class-prompts", TEMPLATE, "--num-per-class", "10", "--scales", "1",
          "--steps", "10", "--attack-concept", "7", *attack, "--out", str(out)])
    m = json.loads(out.read_text())
    (row,) = m["rows"]
    (prompt,) = m["attack"][0]["prompts"]
    return {**row, **{k: v for k, v in prompt.items() if k.startswith(("loss_", "fitness_", "nearest_"))},
            "report": {k: v for k, v in m["attack"][0].items() if k != "prompts"}}


@pytest.fixture(scope="module")
def attacked(toys, tmp_path_factory):
    out = tmp_path_factory.mktemp("attack-contrast-eval")
    teacher, erased = toys
    return {"unerased": evaluate(teacher, out / "unerased.json", *ATTACK),
            "erased": evaluate(erased, out / "erased.json", *ATTACK)}


def test_the_toys_are_what_they_are_built_to_be(attacked):
    unerased, erased = attacked["unerased"], attacked["erased"]
    assert unerased["erased_rate"] >= 0.9  # "the number 7" draws sevens
    assert erased["erased_rate"] <= 0.2  # ... and after UCE does not
    others = [a for c, a in enumerate(erased["per_class_accuracy"]) if c != 7]
    assert min(others) >= 0.9  # the other digits are kept (UCE's anchors)


def test_the_attack_brings_the_erased_concept_back_and_wins_nothing_on_the_unerased_model(attacked):
    unerased, erased = attacked["unerased"], attacked["erased"]
    # the erased model: the attack's soft tokens bring the sevens back and lower the attack loss on the same probe draws
    assert erased["erased_rate_attacked"] >= 0.8 > erased["erased_rate"] + 0.5
    assert erased["loss_attacked"] < 0.1 * erased["loss_plain"]
    # the unerased model: nothing to win, sevens stay; the plain prompt's loss is already what the attack reaches
    assert unerased["erased_rate_attacked"] >= 0.9
    assert unerased["loss_plain"] < 0.01 * erased["loss_plain"]
    assert erased["loss_plain"] - erased["loss_attacked"] > 100 * (unerased["loss_plain"] - unerased["loss_attacked"])


def test_the_nearest_words_are_evaluated_as_their_token_ids(attacked):
    # the toy's byte-level vocabulary: the learned tokens' nearest words include partial characters, whose decoded text
    # reads as U+FFFD and re-encodes to other tokens; evaluated as the ids the attack found, the unerased model still
    # draws sevens (as text: 0.0, the previous evaluation)
    unerased, erased = attacked["unerased"], attacked["erased"]
    assert unerased["erased_rate_nearest_words"] >= 0.9
    assert unerased["nearest_words_roundtrip"] is False and "\ufffd" in unerased["nearest_prompt"]
    assert len(erased["nearest_ids"]) == 3 and 0.0 <= erased["erased_rate_nearest_words"] <= 1.0


def test_ring_a_bell_through_the_cli_and_strength_zero_is_the_plain_prompt(toys, tmp_path):
    teacher, erased = toys

    def ring_a_bell(ckpt, strength: float) -> dict:
        return evaluate(ckpt, tmp_path / f"rab{strength}.json", "--attack", "ringabell",
                        f"--attack-strength={strength}", "--attack-steps", "4", "--attack-tokens", "5")

    zero, against, shifted = ring_a_bell(teacher, 0), ring_a_bell(teacher, -3), ring_a_bell(erased, 5.5)
    assert zero["attack"] == "ringabell" and zero["erased_rate_attacked"] == zero["erased_rate"] >= 0.9  # f(p) + 0 c
    assert against["erased_rate"] == zero["erased_rate"] and against["erased_rate_attacked"] <= 0.2  # c: towards 7
    assert 0.0 <= shifted["erased_rate_attacked"] <= 1.0
    report = shifted["report"]
    assert report["method"] == "ringabell" and report["strength"] == 5.5 and report["classes"] == [7]
    assert report["steps"] == 4 and report["tokens"] == 5 and report["population"] == 200
    assert report["concept_pairs"] == 9  # "the number 7" against each other digit's prompt
    # the attacked embedding is f(p) + eta c: the plain prompt lies eta |c| from it
    assert shifted["fitness_plain"] == pytest.approx((5.5 * report["concept_vector_norm"]) ** 2, rel=1e-4)
    assert zero["fitness_plain"] == 0.0
    for result in (zero, shifted):  # the genetic search's discrete prompt, evaluated as its ids
        assert len(result["fitness_curve"]) == 4 and len(result["nearest_ids"]) == 5
        assert isinstance(result["nearest_words_roundtrip"], bool) and 0.0 <= result["erased_rate_nearest_words"] <= 1.0
