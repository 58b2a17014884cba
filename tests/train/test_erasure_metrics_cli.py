"""The erasure metrics through `python -m train sample / evaluate` on the tiny SD 1.5 erasure fit: an I2P-format prompt
file's own seeds and guidance scales reproduced exactly, the nudity rate of an unerased toy model against a known-erased
one by a detector keyed on what only the unerased model draws, the zero-shot concept columns, the "not computed" line,
and the one-line errors for bad weights and flags."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.data.test_prompts import I2P_HEADER, i2p_cells, write_csv
from tests.train.text_fits import randomised
from tests.train.tiny_judges import template_nudenet, tiny_clip_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROWS = [("a cat", "sexual", 11, 7), ("the dog", "violence", 12, 7), ("a red car", "sexual, hate", 13, 3)]
SEXUAL = [ROWS[0], ROWS[2]]
STEPS = 3


@pytest.fixture(scope="module")
def models(t2i_workspace, tmp_path_factory):
    """(folder, unerased, erased, i2p csv): the tiny SD 1.5 erasure fit with its cross-attention values drawn
    N(0, 0.3^2), so that the prompt visibly shapes what it draws, and the same model with them set to zero: a toy
    model erased of every prompt (it draws the same image whatever it is asked for)."""
    root = tmp_path_factory.mktemp("erasure-metrics")
    unerased = randomised(t2i_workspace.fitted("erase", "sd15"), root / "unerased.ckpt", "attn2.to_v", std=0.3)
    erased = randomised(unerased, root / "erased.ckpt", "attn2.to_v", std=0.0)
    i2p = write_csv(root / "i2p.csv", I2P_HEADER, [i2p_cells(I2P_HEADER, i, *r) for i, r in enumerate(ROWS)])
    return root, unerased, erased, i2p


def in_process(ckpt, rows, num: int) -> torch.Tensor:
    """Each row's `num` images as ESD's evaluation makes them: num latents drawn from a generator seeded with the row's
    seed, sampled at the row's guidance scale."""
    from train.runtime.checkpoint import load_method

    module, out = load_method(ckpt), []
    for prompt, _, seed, w in rows:
        noise = torch.randn(num, *module.sample_shape(), generator=torch.Generator().manual_seed(seed))
        samples, _ = module.generate([prompt] * num, w, STEPS, noise=noise)
        out.append(module.samples_to_images(samples))
    return torch.cat(out)


def test_sample_takes_each_rows_seed_and_guidance_unless_overridden(models, tmp_path):
    from train.cli import main

    root, unerased, _, i2p = models
    args = ["sample", "--ckpt", str(unerased), "--prompts", i2p, "--prompt-categories", "sexual", "--num-per-prompt",
            "2", "--steps", str(STEPS)]
    main(args + ["--out", str(tmp_path / "file")])
    expected = in_process(unerased, SEXUAL, 2)
    got = torch.from_numpy(np.load(tmp_path / "file" / "samples.npz")["images"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (tmp_path / "file" / "requests.txt").read_text() == "row 0: a cat\nrow 1: a red car\n"
    main(args + ["--seed", "11", "--scale", "7", "--out", str(tmp_path / "flags")])
    flagged = torch.from_numpy(np.load(tmp_path / "flags" / "samples.npz")["images"])
    # --seed 11: the 4 samples take the first 4 draws of seed 11, the cat row's 2 among them; --scale 7 is the cat's
    torch.testing.assert_close(flagged[:2], expected[:2], rtol=0, atol=1e-5)
    assert (flagged[2:] - expected[2:]).abs().max() > 1e-2


def test_evaluate_reports_nudity_and_concepts_erased_against_unerased(models, tmp_path, capsys):
    from train.cli import main
    from train.evaluation.nudity import letterbox
    from train.evaluation.reference import to_uint8
    from train.evaluation.requests import generate_images
    from train.evaluation.zero_shot import concept_accuracy, zero_shot_probs
    from train.runtime.checkpoint import load_method

    root, unerased, erased, i2p = models
    drawn = letterbox(to_uint8(in_process(unerased, SEXUAL, 2)), 16)  # what the unerased model draws: the detector's
    other = letterbox(to_uint8(in_process(erased, SEXUAL, 2)), 16)
    distance = ((other[:, None] - drawn[None]) ** 2).mean((2, 3, 4)).min(1).values
    assert distance.min() > 0  # the erased model draws none of them
    detector = template_nudenet(root / "nudenet.onnx", drawn, radius=distance.min().item() / 2)
    clip = tiny_clip_folder(root / "clip", image_size=8)
    reports = {}
    for name, ckpt in (("unerased", unerased), ("erased", erased)):
        out = tmp_path / f"{name}.json"
        main(["evaluate", "--ckpt", str(ckpt), "--prompts", i2p, "--prompt-categories", "sexual", "--num-per-prompt",
              "2", "--steps", str(STEPS), "--nudenet", str(detector), "--clip-model", str(clip), "--concepts", "cat",
              "car", "dog", "--concept-template", "{}", "--concept-prompts", "{}", "--num-per-class", "2",
              "--out", str(out)])
        reports[name] = {r["requests"]: r for r in json.loads(out.read_text())["rows"]}
    printed = capsys.readouterr().out
    assert "nudity_rate" in printed and "erased_concept_accuracy" in printed
    prompted = {k: v["2 prompts x 2"] for k, v in reports.items()}
    assert prompted["unerased"]["nudity_rate"] == 1.0 and prompted["erased"]["nudity_rate"] == 0.0
    assert prompted["unerased"]["nudity_detections"]["FEMALE_BREAST_EXPOSED"] == 4
    assert prompted["unerased"]["nudity_threshold"] == 0.6
    assert prompted["erased"]["w"] == "per prompt (3 to 7)" and prompted["erased"]["seed"] == "per prompt"
    assert set(prompted["erased"]["concept_histogram"]) == {"cat", "car", "dog"}

    module = load_method(erased)  # the concept rows: each concept prompted twice with seed 0, judged by CLIP
    images, _ = generate_images(module, ["cat", "cat", "car", "car", "dog", "dog"], None, STEPS, progress=False)
    expected = concept_accuracy(zero_shot_probs(images, ["cat", "car", "dog"], clip, "{}"), ["cat", "car", "dog"],
                                torch.arange(3).repeat_interleave(2), erased=module.concept_names())
    row = reports["erased"]["{}"]
    assert set(module.concept_names()) == {"cat", "car"} and row["other_concept_accuracy"] is not None
    for key in ("concept_histogram", "concept_accuracy", "per_concept_accuracy", "erased_concept_accuracy",
                "other_concept_accuracy"):
        assert row[key] == pytest.approx(expected[key])


def test_a_metric_without_weights_is_said_not_computed(models, tmp_path, capsys):
    from train.cli import main

    _, unerased, _, i2p = models
    out = tmp_path / "m.json"
    main(["evaluate", "--ckpt", str(unerased), "--prompts", i2p, "--max-prompts", "1", "--steps", "2", "--out",
          str(out)])
    assert any("--nudenet PATH" in line for line in json.loads(out.read_text())["not_computed"])
    assert "not computed: nudity rate: no NudeNet detector given (pass --nudenet PATH" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--nudenet", "MISSING"], "NudeNet detector file"),
    (["--nudenet", "JUNK"], "is not an ONNX model onnxruntime can load"),
    (["--clip-model", "EMPTY", "--concepts", "cat", "dog"], "is not a CLIP model folder"),
    (["--concepts", "cat", "dog"], "add --clip-model FOLDER"),
    (["--nudity-threshold", "0.45"], "add --nudenet PATH"),
    (["--concept-prompts", "{}"], "add --concepts NAME"),
    (["--prompt-categories", "sexual"], "add --prompts FILE"),
    (["--prompts", "I2P", "--prompt-categories", "shocking"], "categories are hate, sexual, violence")])
def test_bad_weights_and_flags_are_one_line_errors(models, tmp_path, capsys, argv, message):
    from train.cli import main

    _, unerased, _, i2p = models
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    (tmp_path / "empty").mkdir()
    names = {"MISSING": str(tmp_path / "none.onnx"), "JUNK": str(tmp_path / "junk.onnx"),
             "EMPTY": str(tmp_path / "empty"), "I2P": i2p}
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--ckpt", str(unerased), "--prompt", "a cat", "--out", str(tmp_path / "m.json")]
             + [names.get(a, a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
