"""The text digits demo: captions, the SD-layout pipeline folder built locally, the text stages of `demo` end to end
at smoke size, and the `sample` / `evaluate` commands with prompts, class prompts and negative prompts."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT_STAGES = ["text_pipeline", "text_teacher", "text_guidance_distill", "text_dmd", "text_erase", "text_uce"]


def test_captions_and_class_prompts():
    from train.evaluation.digits_text import caption, class_prompts

    assert caption("a handwritten {word}", 7) == "a handwritten seven"
    assert caption("the number {digit}", 7) == "the number 7"
    assert caption("a {}", 0) == "a zero"
    prompts, labels = class_prompts("the digit {word}", 2)
    assert prompts[:3] == ["the digit zero", "the digit zero", "the digit one"] and labels.tolist()[-2:] == [9, 9]
    with pytest.raises(ValueError, match="needs"):
        class_prompts("a handwritten digit", 1)
    with pytest.raises(ValueError, match="0..9"):
        caption("{word}", 10)


def test_to_digits_and_erasure_columns():
    from train.evaluation.digits_text import erasure_columns, to_digits

    rgb = torch.stack([torch.full((8, 8), v) for v in (-1.0, 0.5, 2.0)])[None]  # channel mean 0.5, clamped later
    assert torch.allclose(to_digits(rgb), torch.full((1, 1, 8, 8), 0.5))
    assert to_digits(torch.full((1, 3, 8, 8), 3.0)).max() == 1.0
    with pytest.raises(ValueError, match="8x8"):
        to_digits(torch.zeros(1, 3, 16, 16))
    row = {"per_class_accuracy": [1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1, 1.0, 0.9]}
    cols = erasure_columns(row, [7])
    assert cols["erased_rate"] == pytest.approx(0.1)
    assert cols["other_accuracy"] == pytest.approx((9 * 1.0 - 0.5 - 0.1) / 9)
    assert erasure_columns(row, []) == {}


def test_captioned_digits_folder_holds_the_training_digits_only(tmp_path):
    from PIL import Image

    from data.digits import _digits_arrays
    from train.evaluation.digits_text import TEMPLATES
    from train.digits_pipeline import write_captioned_digits

    folder = write_captioned_digits(tmp_path / "captions")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    images, labels, is_val = _digits_arrays()
    assert len(rows) == len(TEMPLATES) * int((~is_val).sum())
    files = {r["file_name"] for r in rows}
    assert not any(int(f[:4]) in set(np.flatnonzero(is_val)) for f in files)  # held-out digits are never written
    r = rows[3 * 5]
    i = int(r["file_name"][:4])
    assert r["label"] == labels[i] and r["text"] == f"a handwritten {['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'][labels[i]]}"
    png = np.asarray(Image.open(folder / r["file_name"]), dtype=np.float32) / 127.5 - 1.0
    assert np.abs(png - images[i, 0]).max() <= 1 / 127.5  # 0..16 levels survive 8-bit PNG
    assert len((folder / "prompts.txt").read_text().splitlines()) == 30


def test_digits_vae_scaling_factor_whitens_the_latents():
    from data.digits import _digits_arrays
    from train.digits_pipeline import train_digits_vae

    vae = train_digits_vae(steps=3, progress=False)
    images, _, is_val = _digits_arrays()
    x = torch.from_numpy(np.array(images[~is_val])).repeat(1, 3, 1, 1)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    assert z.shape[1:] == (1, 8, 8)  # one level: no downsampling, one latent channel
    assert float((z * vae.config.scaling_factor).std()) == pytest.approx(1.0, rel=1e-4)


@pytest.fixture(scope="module")
def text_demo(tmp_path_factory, classifier):
    """The text stages of `python -m train demo --profile full` at smoke size (2 steps each, 2 samples per class; the
    full profile's evaluation: 50 sampler steps)."""
    from train.demo import run_demo

    out = tmp_path_factory.mktemp("text-demo")
    metrics = run_demo(out, "full", max_steps=2, stages=TEXT_STAGES, num_per_class=2)
    return out, metrics


@pytest.mark.slow
def test_text_demo_stages_run_and_report_the_digits_metrics(text_demo):
    from diffusers import StableDiffusionPipeline

    out, metrics = text_demo
    stages = metrics["stages"]
    assert set(stages) == set(TEXT_STAGES) - {"text_pipeline"}
    assert [r["w"] for r in stages["text_teacher"]["rows"]] == [1.0, 2.0, 3.0, 5.0]
    assert {r["nfe_per_sample"] for r in stages["text_teacher"]["rows"]} == {100}  # CFG: two evaluations x 50
    assert {r["nfe_per_sample"] for r in stages["text_guidance_distill"]["rows"]} == {8}  # w-conditioned: one x 8
    assert [r["nfe_per_sample"] for r in stages["text_dmd"]["rows"]] == [1]
    erase = stages["text_erase"]["rows"]
    assert [r["requests"] for r in erase] == ["a handwritten {word}", "the digit {word}"]
    for stage in stages.values():
        for r in stage["rows"]:
            assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["fd"])
    assert all("erased_rate" in r and "other_accuracy" in r for r in erase)
    uce = stages["text_uce"]["rows"]  # the closed-form edit: one step whatever --max-steps says
    assert [r["requests"] for r in uce] == ["a handwritten {word}", "the digit {word}"]
    assert all("erased_rate" in r and "other_accuracy" in r for r in uce)
    assert torch.load(stages["text_uce"]["checkpoint"], weights_only=True)["global_step"] == 1
    for name in ("teacher", "guidance_distill", "dmd", "erase", "uce"):
        assert (out / "text" / name / "grid.png").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(out / "text" / "pipeline", local_files_only=True)
    image = pipe("a handwritten seven", num_inference_steps=2, output_type="np", height=8, width=8).images
    assert image.shape == (1, 8, 8, 3)


@pytest.mark.slow
def test_sample_and_evaluate_with_class_prompts_and_negative_prompts(text_demo, tmp_path, capsys):
    from train.cli import main

    ckpt = text_demo[0] / "text" / "teacher" / "checkpoints" / "last.ckpt"
    # class prompts are labelled requests: --num-per-class of each digit's prompt, labels saved beside them
    main(["sample", "--ckpt", str(ckpt), "--class-prompts", "the digit {word}", "--num-per-class", "2", "--steps", "3",
          "--out", str(tmp_path / "s")])
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["images"].shape == (20, 3, 8, 8) and list(f["requests"][:3]) == ["the digit zero"] * 2 + ["the digit one"]
        assert float(f["nfe_per_sample"]) == 6 and f["labels"].tolist()[:3] == [0, 0, 1]
    assert (tmp_path / "s" / "grid.png").is_file()
    assert (tmp_path / "s" / "requests.txt").read_text().splitlines()[7] == "row 7: the digit seven"

    def one(neg):
        d = tmp_path / f"n{neg is not None}"
        main(["sample", "--ckpt", str(ckpt), "--prompt", "a handwritten seven", "--num-per-prompt", "1", "--steps", "3",
              "--out", str(d)] + (["--negative-prompt", neg] if neg else []))
        with np.load(d / "samples.npz") as f:
            return f["images"]

    assert np.abs(one(None) - one("the digit one")).max() > 1e-4  # the negative branch replaced the empty prompt

    main(["evaluate", "--ckpt", str(ckpt), "--class-prompts", "a handwritten {word}", "--num-per-class", "2", "--steps",
          "3", "--scales", "1", "2", "--out", str(tmp_path / "m.json")])
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [r["w"] for r in rows] == [1.0, 2.0] and all(r["requests"] == "a handwritten {word}" for r in rows)
    assert all(len(r["per_class_accuracy"]) == 10 for r in rows)
    assert "| a handwritten {word} |" in capsys.readouterr().out


@pytest.mark.slow
def test_prompt_flags_are_checked_against_the_model(text_demo, tiny_teacher_ckpt, tmp_path, capsys):
    from train.cli import main

    text_ckpt = text_demo[0] / "text" / "teacher" / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as e:
        main(["sample", "--ckpt", str(text_ckpt), "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "give --prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sample", "--ckpt", str(tiny_teacher_ckpt), "--prompt", "a cat", "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "class-conditional" in capsys.readouterr().err  # a prompt for a class model
