"""Sampling recipes (train/methods/sampling.py) and the one sample/evaluate path of the CLI: defaults filled in, what a
recipe cannot honour refused in one line, DDIM eta passed on, requests checked by the model's conditioner."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import cli_error
from train.cli import main
from train.methods.sampling import GeneratorSampling, GuidedSampling, WInputSampling


def test_a_guided_recipe_fills_defaults_and_refuses_absurd_values():
    r = GuidedSampling(lambda: None)
    s = r.resolve()
    assert (s.scale, s.steps, s.sampler, s.guider, s.eta) == (2.0, 50, "ddim", "cfg", 0.0)
    assert r.resolve(3.0, 8, "euler", "apg", {"eta": 0.5}, eta=0.3).guider_params == {"eta": 0.5}
    for bad, needle in [({"scale": float("nan")}, "not a usable w"), ({"scale": 1e4}, "not a usable w"),
                        ({"steps": 0}, "positive integer"), ({"sampler": "heun9"}, "unknown sampler"),
                        ({"eta": 2.0}, "eta must be in"), ({"guider": "nope"}, "unknown guider")]:
        with pytest.raises(ValueError, match=needle):
            r.resolve(**bad)


def test_a_w_input_student_takes_its_own_guider_and_a_progressive_one_its_step_count():
    stage1 = WInputSampling(lambda: None, "apg")
    assert stage1.resolve(guider="apg").guider == "conditional" and stage1.resolve(steps=13).steps == 13
    with pytest.raises(ValueError, match="distilled from guider 'apg'"):
        stage1.resolve(guider="rescale")
    with pytest.raises(ValueError, match="no unconditional branch"):
        stage1.resolve(negative=True)
    progressive = WInputSampling(lambda: None, "cfg", fixed_steps=4)
    assert progressive.resolve().steps == 4 and progressive.describe()["distilled"]
    with pytest.raises(ValueError, match="distilled to 4 DDIM steps; sample it with --steps 4"):
        progressive.resolve(steps=8)
    with pytest.raises(ValueError, match="--sampler ddim"):
        progressive.resolve(sampler="euler")


def test_a_generator_refuses_what_it_cannot_honour():
    g = GeneratorSampling(lambda z, c, gen: z, steps=1, scale=2.0)
    assert g.resolve().steps == 1 and g.resolve(scale=2.0, steps=1).scale == 2.0  # its own values are fine
    with pytest.raises(ValueError, match="1-step generator distilled at w = 2: .* --scale, --steps cannot be honoured"):
        g.resolve(scale=3.0, steps=4)
    for bad in ({"guider": "cfg"}, {"eta": 0.5}, {"negative": True}, {"sampler": "ddim"}):
        with pytest.raises(ValueError, match="cannot be honoured"):
            g.resolve(**bad)
    with pytest.raises(ValueError, match=r"over a range of w \(PG-SB\)"):
        GeneratorSampling(lambda z, c, gen: z, 1, None).resolve(scale=2.0)


def test_the_cli_checks_requests_with_the_models_conditioner(tiny_teacher_ckpt, tmp_path, capsys):
    base = ["sample", "--ckpt", str(tiny_teacher_ckpt), "--out", str(tmp_path / "s"), "--steps", "2"]
    assert "not a class of this class-conditional model" in cli_error(capsys, base + ["--prompt", "a cat"])
    assert "out of range" in cli_error(capsys, base + ["--class", "12"])
    assert "not a usable w" in cli_error(capsys, base + ["--scale", "nan"])
    assert "eta must be in" in cli_error(capsys, base + ["--eta", "-1"])
    assert not (tmp_path / "s").exists()
    main(base + ["--class", "3", "--class", "7", "--num-per-class", "2"])
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["labels"].tolist() == [3, 3, 7, 7] and data["requests"].tolist() == ["3", "3", "7", "7"]


def test_ddim_eta_reaches_the_sampler(tiny_teacher_ckpt, tmp_path):
    for name, eta in (("a", "0"), ("b", "1"), ("c", "1")):
        main(["sample", "--ckpt", str(tiny_teacher_ckpt), "--steps", "3", "--num-per-class", "1", "--eta", eta,
              "--out", str(tmp_path / name)])
    a, b, c = (np.load(tmp_path / k / "samples.npz")["images"] for k in "abc")
    assert not np.array_equal(a, b) and np.array_equal(b, c)  # ancestral noise, seeded
