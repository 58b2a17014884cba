"""Adversarial prompts against erased text models (train/evaluation/attack.py and the modules beneath it:
unlearndiffatk.py, ring_a_bell.py, attack_config.py, attack_embeddings.py, prompt_attack.py):
the loss against a hand computation, the explicit inputs_embeds path against the encoder, the optimisation lowering
the erased model's denoising loss with every weight untouched, and `evaluate --attack` on tiny folders."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Scaled(nn.Module):
    """net(x, t, cond) = cond["w"] * x + t: an eps network whose output is known by hand."""

    def forward(self, x, t, cond):
        return cond["w"].reshape(-1, 1, 1, 1) * x + t.reshape(-1, 1, 1, 1).to(x.dtype)


def test_unlearndiffatk_loss_equals_a_hand_computation():
    from guidance.denoiser import Denoiser
    from guidance.schedules import VPCosineContinuous
    from train.evaluation.prompt_attack import unlearndiffatk_loss

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, 2, 2, generator=g,
                                                                                         dtype=torch.float64)
    t, w = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    sched = VPCosineContinuous()
    den = Denoiser(_Scaled(), sched, "eps")
    a, s = sched.alpha_sigma(t.reshape(-1, 1, 1, 1))
    x_t = a * x0 + s * eps
    y = w.reshape(-1, 1, 1, 1) * x_t + sched.net_time(t).reshape(-1, 1, 1, 1)  # the eps prediction
    hand = ((y - eps) ** 2).sum() / eps.numel()
    assert unlearndiffatk_loss(den, x0, {"w": w}, t, eps).item() == pytest.approx(hand.item(), rel=1e-10)


def test_ring_a_bell_vector_and_nearest_tokens():
    from train.evaluation.prompt_attack import concept_vector, nearest_tokens, ring_a_bell_embedding

    plus, minus = torch.arange(12.0).reshape(2, 3, 2), torch.ones(2, 3, 2)
    c = concept_vector(plus, minus)
    assert torch.equal(c, (plus - 1).mean(0))
    assert torch.equal(ring_a_bell_embedding(minus, c, 0.5), minus + 0.5 * c)
    with pytest.raises(ValueError, match="paired"):
        concept_vector(plus, minus[:1])
    vocab = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    assert nearest_tokens(torch.tensor([[0.9, 0.1], [0.2, 4.0]]), vocab).tolist() == [1, 2]


def test_ring_a_bell_search_finds_a_known_prompt():
    from train.evaluation.prompt_attack import ring_a_bell_search

    target = torch.tensor([3, 7, 2, 9, 4])
    allowed = torch.arange(2, 12)
    ids, curve = ring_a_bell_search(lambda ids: (ids != target).sum(1).float(), allowed, 5, 30,
                                    torch.Generator().manual_seed(0))
    assert ids.tolist() == target.tolist() and len(curve) == 30 and curve[-1] == 0 < curve[0]


def test_concept_pairs_file(tmp_path):
    from train.evaluation.attack import AttackSettings

    good = tmp_path / "pairs.txt"
    good.write_text("a cat with a hat\ta cat\n\nred dog\tdog\n")
    pairs = AttackSettings("ringabell", pairs=str(good)).concept_pairs
    assert pairs == [("a cat with a hat", "a cat"), ("red dog", "dog")]
    bad = tmp_path / "bad.txt"
    bad.write_text("a cat with a hat\ta cat\nno tab here\n")
    with pytest.raises(ValueError, match="line 2: expected"):
        AttackSettings("ringabell", pairs=str(bad))


@pytest.fixture(scope="module")
def uce_module(t2i_workspace):
    from train.runtime.checkpoint import load_method

    return load_method(t2i_workspace.fitted("uce", "sd15"))


def test_token_states_are_the_encoders_bit_for_bit_and_take_a_prefix(uce_module):
    from train.evaluation.attack import clip_text_encoder, token_states

    tok, enc = clip_text_encoder(uce_module)
    prompts = ["a cat", "the dog"]
    plain = token_states(tok, enc, prompts)
    assert torch.equal(plain, uce_module.conditioner.encoder.encode(prompts)["encoder_hidden_states"])
    soft = torch.randn(2, plain.shape[-1])
    attacked = token_states(tok, enc, prompts, soft)
    assert attacked.shape == plain.shape and not torch.allclose(attacked, plain)
    assert torch.equal(attacked[:, 0], plain[:, 0])  # causal: the start token sees only itself
    with pytest.raises(ValueError, match="no room"):
        token_states(tok, enc, ["a cat"], torch.randn(tok.model_max_length, plain.shape[-1]))


def test_the_grid_shows_each_draw_before_and_after_the_attack(uce_module):
    """before_after: per attacked prompt a row of plain samples, one under the attack and one under its discrete
    prompt, from the same noise: the plain row is the prompt's own samples; an attack that leaves the states alone
    redraws it exactly, and other states change it."""
    from train.evaluation.attack import before_after, clip_text_encoder, token_states
    from train.evaluation.requests import generate_images

    tok, enc = clip_text_encoder(uce_module)
    same = {"a cat": token_states(tok, enc, ["a cat"])[0]}
    other = {"a cat": token_states(tok, enc, ["the dog"])[0]}
    grid = before_after(uce_module, ["a cat"], same, other, steps=2, per_prompt=4)
    assert grid.shape[0] == 12
    plain, _ = generate_images(uce_module, ["a cat"] * 4, None, 2, progress=False)
    assert torch.equal(grid[:4], plain) and torch.equal(grid[4:8], plain)
    assert not torch.equal(grid[8:], plain)
    assert before_after(uce_module, ["a cat"], same, {}, steps=2, per_prompt=4).shape[0] == 8  # no discrete prompt


def test_a_hard_prompt_is_its_token_ids_and_says_whether_its_text_round_trips(uce_module):
    from train.evaluation.attack import clip_text_encoder, discrete_prompt, token_states

    tok, enc = clip_text_encoder(uce_module)
    ids = tok("red dog").input_ids[1:-1]
    text, states, roundtrip = discrete_prompt(tok, enc, ids, "a cat")
    assert text == "red dog a cat" and roundtrip
    assert torch.equal(states, token_states(tok, enc, [text])[0])  # the ids' states are the text's, bit for bit
    assert torch.equal(discrete_prompt(tok, enc, ids)[1], token_states(tok, enc, ["red dog"])[0])  # the ids alone
    # a token that decodes to a partial character (U+FFFD) does not survive the text; its states are still its ids'
    special = set(tok.all_special_ids)
    lost = next(i for i in range(len(tok)) if i not in special and not discrete_prompt(tok, enc, [i], "a cat")[2])
    text, states, roundtrip = discrete_prompt(tok, enc, [lost], "a cat")
    assert not roundtrip and not torch.equal(states, token_states(tok, enc, [text])[0])
    vocab = enc.get_input_embeddings().weight
    assert torch.equal(states, token_states(tok, enc, ["a cat"], vocab[[lost]])[0])


def test_attack_lowers_the_erased_models_loss_and_changes_no_weight(t2i_workspace, tmp_path):
    from tests.train.text_fits import randomised
    from train.evaluation.attack import AttackSettings, clip_text_encoder, unlearndiffatk
    from train.runtime.checkpoint import load_method

    # the tiny folder's UNet barely reads its text (loss changes ~1e-4): redraw the erased UNet so that prompts matter
    uce_module = load_method(randomised(t2i_workspace.fitted("uce", "sd15"), tmp_path / "r.ckpt", "student.net.unet",
                                        std=0.2))
    _, enc = clip_text_encoder(uce_module)
    before = {k: v.clone() for k, v in uce_module.state_dict().items()}
    text = {k: v.clone() for k, v in enc.state_dict().items()}
    result = unlearndiffatk(uce_module, "a cat", AttackSettings(steps=40, tokens=2, lr=0.05, images=2, probe=8), steps=3)
    assert len(result.loss_curve) == 40 and len(result.nearest_words) == 2 and len(result.nearest_ids) == 2
    assert result.nearest_states.shape == result.states.shape and isinstance(result.nearest_roundtrip, bool)
    assert result.loss_attacked < result.loss_initial  # same probe draws, learned vs initial tokens
    assert result.nearest_prompt.endswith(" a cat") and result.soft.shape == (2, 32)
    assert all(torch.equal(v, before[k]) for k, v in uce_module.state_dict().items())
    assert all(torch.equal(v, text[k]) for k, v in enc.state_dict().items())
    assert all(p.grad is None for p in uce_module.parameters()) and all(p.grad is None for p in enc.parameters())
    plain = unlearndiffatk(uce_module, "a cat", AttackSettings(steps=0))
    assert torch.equal(plain.states, uce_module.encode(["a cat"])["encoder_hidden_states"][0])
    assert plain.loss_curve == [] and plain.nearest_words == []


def test_evaluate_attack_on_the_tiny_sd15_folder_writes_the_report_and_grid(t2i_workspace, tmp_path, capsys):
    from train.cli import main

    ckpt = t2i_workspace.fitted("uce", "sd15")
    out = tmp_path / "m.json"
    main(["evaluate", "--ckpt", str(ckpt), "--prompt", "a cat", "--prompt", "the dog", "--num-per-prompt", "2",
          "--steps", "2", "--attack", "unlearndiffatk", "--attack-steps", "3", "--attack-tokens", "2",
          "--attack-images", "2", "--out", str(out)])
    m = json.loads(out.read_text())
    (report,) = m["attack"]
    assert [p["prompt"] for p in report["prompts"]] == ["a cat", "the dog"]
    assert all(len(p["loss_curve"]) == 3 and len(p["nearest_words"]) == 2 for p in report["prompts"])
    assert report["steps"] == 3 and report["tokens"] == 2 and report["classes"] == []
    assert (tmp_path / "m_attack.png").is_file() and report["grid"] == str(tmp_path / "m_attack.png")
    row = m["rows"][0]
    assert row["attack"] == "unlearndiffatk" and row["erased_rate"] is None and row["erased_rate_attacked"] is None


def test_ring_a_bell_on_prompts_with_a_pairs_file(t2i_workspace, tmp_path):
    from train.cli import main

    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a cat with a hat\ta cat\nthe dog with a hat\tthe dog\n")
    out = tmp_path / "m.json"
    main(["evaluate", "--ckpt", str(t2i_workspace.fitted("uce", "sd15")), "--prompt", "a cat", "--num-per-prompt", "2",
          "--steps", "2", "--attack", "ringabell", "--attack-pairs", str(pairs), "--attack-steps", "2",
          "--attack-tokens", "3", "--out", str(out)])
    m = json.loads(out.read_text())
    (report,) = m["attack"]
    assert report["method"] == "ringabell" and report["pairs"] == str(pairs) and report["concept_pairs"] == 2
    assert report["strength"] == 3.0 and report["classes"] == []  # the authors' eta for nudity, by default
    (prompt,) = report["prompts"]
    assert len(prompt["fitness_curve"]) == 2 and len(prompt["nearest_ids"]) == 3 and prompt["fitness_plain"] > 0
    assert m["rows"][0]["attack"] == "ringabell" and m["rows"][0]["erased_rate_attacked"] is None


@pytest.mark.parametrize("argv, message", [
    (["--attack-steps", "3"], "add --attack unlearndiffatk"),
    (["--attack", "unlearndiffatk", "--attack-tokens", "0"], "--attack-tokens must be a positive"),
    (["--attack", "unlearndiffatk", "--attack-steps", "-1"], "--attack-steps must be"),
    (["--attack", "unlearndiffatk", "--attack-lr", "0"], "--attack-lr must be"),
    (["--attack", "unlearndiffatk", "--attack-concept", "7"], "leave --attack-concept out"),
    (["--attack-strength", "3"], "add --attack ringabell"),
    (["--attack", "ringabell"], "add --attack-pairs FILE"),
    (["--attack", "ringabell", "--attack-lr", "0.1", "--attack-images", "2"], "configure --attack unlearndiffatk"),
    (["--attack", "unlearndiffatk", "--attack-strength", "3"], "configures --attack ringabell"),
    (["--attack", "ringabell", "--attack-pairs", "missing.txt"], "no such file"),
    (["--attack", "ringabell", "--attack-strength", "nan"], "--attack-strength must be a finite"),
])
def test_bad_attack_flags_get_one_line(t2i_workspace, tmp_path, capsys, argv, message):
    from train.cli import main

    ckpt = t2i_workspace.fitted("uce", "sd15")
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--ckpt", str(ckpt), "--prompt", "a cat", "--out", str(tmp_path / "m.json")] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_attack_refuses_class_models(tiny_teacher_ckpt, tmp_path, capsys):
    from train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--ckpt", str(tiny_teacher_ckpt), "--attack", "unlearndiffatk", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "class labels" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def digits_uce(tmp_path_factory, classifier):
    """UCE erasing "a handwritten seven" from an (untrained) text digits pipeline: a known-erased toy model whose
    samples the digits classifier judges."""
    from tests.train.text_fits import TRAINER
    from train.cli import main
    from train.digits_pipeline import build_digits_pipeline

    root = tmp_path_factory.mktemp("attack-digits")
    folder = build_digits_pipeline(root / "pipeline", vae_steps=3, progress=False)
    cfg = {"seed_everything": 0,
           "model": {"class_path": "train.methods.uce.ClosedFormErasure", "init_args": {
               "model": str(folder), "concepts": {"concepts": [{"name": "seven", "prompts": ["a handwritten seven"]}],
                                                   "anchors": ["a handwritten one"]}, "lamb": 5.0, "val_samples": 0}},
           "data": {"class_path": "data.steps.ErasureSteps", "init_args": {"steps_per_epoch": 1}},
           "trainer": {**TRAINER, "max_steps": 1, "limit_val_batches": 0, "val_check_interval": None,
                       "default_root_dir": str(root / "run")}}
    (root / "uce.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    main(["fit", "--config", str(root / "uce.yaml")])
    return root / "run" / "checkpoints" / "last.ckpt"


def test_zero_attack_steps_reproduce_the_plain_erased_rate(digits_uce, tmp_path):
    from train.cli import main

    def evaluate(steps: int) -> dict:
        out = tmp_path / f"m{steps}.json"
        main(["evaluate", "--ckpt", str(digits_uce), "--class-prompts", "a handwritten {word}", "--num-per-class", "3",
              "--steps", "2", "--attack", "unlearndiffatk", "--attack-steps", str(steps), "--attack-images", "2",
              "--out", str(out)])
        return json.loads(out.read_text())

    zero = evaluate(0)
    (row,) = zero["rows"]
    assert zero["attack"][0]["classes"] == [7] and zero["attack"][0]["prompts"][0]["prompt"] == "a handwritten seven"
    assert row["erased_rate"] == row["per_class_accuracy"][7]  # the plain evaluation's rate of the erased digit
    others = [a for c, a in enumerate(row["per_class_accuracy"]) if c != 7]
    assert row["other_accuracy"] == pytest.approx(sum(others) / 9) and row["other_fd"] >= 0  # erasure columns
    assert row["erased_rate_attacked"] == row["erased_rate"]  # 0 steps: the plain prompt, the same samples
    assert "erased_rate_nearest_words" not in row
    attacked = evaluate(5)
    (row,) = attacked["rows"]
    assert row["erased_rate"] == zero["rows"][0]["erased_rate"]
    assert 0.0 <= row["erased_rate_attacked"] <= 1.0 and 0.0 <= row["erased_rate_nearest_words"] <= 1.0
    assert len(attacked["attack"][0]["prompts"][0]["loss_curve"]) == 5
    assert (tmp_path / "m5_attack.png").is_file()
