"""The command line end to end on a tiny teacher: sample, evaluate, guiders, and one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import cli_error
from train.cli import main


def test_guiders_lists_every_guider_with_parameters(capsys):
    from guidance.guiders import GUIDERS

    main(["guiders"])
    out = capsys.readouterr().out
    for name in GUIDERS:
        assert f"\n{name} " in "\n" + out
    assert "parameters: convention='ours'" in out


def test_sample_writes_grid_and_npz(tiny_teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    main(["sample", "--ckpt", str(tiny_teacher_ckpt), "--scale", "3", "--steps", "3", "--num-per-class", "2", "--out", str(out)])
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (20, 1, 8, 8)
    assert data["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert float(data["nfe_per_sample"]) == 6  # CFG: 2 evaluations x 3 steps
    assert (out / "grid.png").stat().st_size > 100


def test_sample_is_deterministic_and_uses_guider_params(tiny_teacher_ckpt, tmp_path):
    args = ["sample", "--ckpt", str(tiny_teacher_ckpt), "--steps", "2", "--num-per-class", "1"]
    main(args + ["--out", str(tmp_path / "a")])
    main(args + ["--out", str(tmp_path / "b")])
    main(args + ["--guider", "apg", "--param", "eta=1.0", "--param", "beta=0.0", "--out", str(tmp_path / "c")])
    a, b, c = (np.load(tmp_path / k / "samples.npz")["images"] for k in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_evaluate_writes_metrics_json(tiny_teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "m.json"
    main(["evaluate", "--ckpt", str(tiny_teacher_ckpt), "--scales", "1", "3", "--steps", "2", "--num-per-class", "3", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["w"] for r in rows] == [1.0, 3.0]
    for r in rows:
        assert r["nfe_per_sample"] == 4 and r["num_samples"] == 30
        assert 0 <= r["accuracy"] <= 1 and r["fd"] > 0
    assert "| cfg | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--guider", "nope"], "unknown guider 'nope'"),
    (["--sampler", "heun9"], "unknown sampler 'heun9'"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--guider", "cfg", "--param", "bogus=1"], "has no parameter(s) bogus"),
    (["--guider", "interval", "--param", "sigma_lo=5", "--param", "sigma_hi=1"], "interval"),
])
def test_bad_sampling_options_are_one_line_errors(tiny_teacher_ckpt, tmp_path, capsys, extra, needle):
    err = cli_error(capsys, ["sample", "--ckpt", str(tiny_teacher_ckpt), "--out", str(tmp_path / "x")] + extra)
    assert needle in err
    assert not (tmp_path / "x").exists()


def test_checkpoint_errors(tmp_path, capsys, tiny_teacher_ckpt):
    missing = cli_error(capsys, ["sample", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "o")])
    assert "does not exist" in missing
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert "is not a guidedistill checkpoint" in cli_error(capsys, ["sample", "--ckpt", str(foreign), "--out", str(tmp_path / "o")])
    text = tmp_path / "text.ckpt"
    text.write_text("hello")
    assert "cannot be read" in cli_error(capsys, ["sample", "--ckpt", str(text), "--out", str(tmp_path / "o")])
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(tiny_teacher_ckpt.read_bytes()[:5000])
    assert "cannot be read" in cli_error(capsys, ["evaluate", "--ckpt", str(truncated), "--out", str(tmp_path / "m.json")])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert "is empty (0 bytes" in cli_error(capsys, ["sample", "--ckpt", str(empty), "--out", str(tmp_path / "o")])
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(256)) * 8)
    err = cli_error(capsys, ["sample", "--ckpt", str(noise), "--out", str(tmp_path / "o")])
    assert "cannot be read" in err and "weights_only=False" not in err and "set to False" not in err
    pickled = tmp_path / "code.ckpt"
    torch.save({"guidedistill": {}, "obj": torch.nn.Linear(1, 1)}, pickled)  # unpickling it would run code
    err = cli_error(capsys, ["sample", "--ckpt", str(pickled), "--out", str(tmp_path / "o")])
    assert "cannot be read" in err and "False" not in err
    run = tiny_teacher_ckpt.parent.parent
    err = cli_error(capsys, ["sample", "--ckpt", str(run), "--out", str(tmp_path / "o")])
    assert "is a folder, not a checkpoint; pass " in err and str(run / "checkpoints" / "last.ckpt") in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.json").exists()


def test_dataset_path_that_does_not_exist(tmp_path, capsys):
    from tests.conftest import TINY_TEACHER

    err = cli_error(capsys, ["fit", "--config", str(TINY_TEACHER), "--data", "data.images.LabelledImageDataModule",
                             "--data.path", str(tmp_path / "nowhere"), "--data.image_size", "8",
                             "--trainer.default_root_dir", str(tmp_path / "run")])
    assert "does not exist" in err


def test_malformed_yaml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    err = cli_error(capsys, ["fit", "--config", str(bad)])
    assert "bad.yaml" in err


# --- bad inputs to `fit`: one line that says what to do, and nothing written -----------------------------------

def fit_error(capsys, tmp_path, *extra, config=None) -> str:
    from tests.conftest import TINY_TEACHER

    run = tmp_path / "run"
    err = cli_error(capsys, ["fit", "--config", str(config or TINY_TEACHER), "--trainer.default_root_dir", str(run),
                             "--trainer.max_steps", "2", *extra])
    assert not run.exists()  # no config.yaml, checkpoint folder or W&B files left behind
    return err


@pytest.mark.parametrize("extra, needle", [
    (["--model", "train.nope.Method"], "model: Expected a path but train.nope.Method either not accessible"),
    (["--model.init_args.learning_rate", "0.1"], "Option 'learning_rate' is not accepted"),
    (["--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3"),
])
def test_unknown_method_or_field_is_one_line(tmp_path, capsys, extra, needle):
    err = fit_error(capsys, tmp_path, *extra)
    assert needle in err and "--help` lists the options" in err


def test_unreadable_checkpoints_to_resume_from(tmp_path, capsys, tiny_teacher_ckpt):
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(tiny_teacher_ckpt.read_bytes()[:5000])
    assert "cannot be read" in fit_error(capsys, tmp_path, "--ckpt_path", str(truncated))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert "is not a guidedistill checkpoint" in fit_error(capsys, tmp_path, "--ckpt_path", str(foreign))
    assert "does not exist" in fit_error(capsys, tmp_path, "--ckpt_path", str(tmp_path / "none.ckpt"))


def test_resuming_another_method_or_architecture_is_refused(tmp_path, capsys, tiny_teacher_ckpt):
    err = fit_error(capsys, tmp_path, "--model", "train.methods.erasure.ConceptErasure", "--model.init_args.model",
                    str(tiny_teacher_ckpt), "--model.init_args.concepts", "[3]", "--ckpt_path", str(tiny_teacher_ckpt))
    assert "holds a train.methods.teacher.TeacherPretraining checkpoint but the config trains train.methods.erasure.ConceptErasure" in err
    err = fit_error(capsys, tmp_path, "--model.init_args.net.init_args.block_out_channels", "[32, 64]",
                    "--ckpt_path", str(tiny_teacher_ckpt))
    assert "net.init_args.block_out_channels: [32, 64] in the config, [16, 32] in the checkpoint" in err
    assert "config.yaml" in err


def test_wrong_checkpoint_kind_as_the_model_to_distil(tmp_path, capsys, tiny_teacher_ckpt):
    err = fit_error(capsys, tmp_path, "--model", "train.methods.progressive.ProgressiveDistillation",
                    "--model.init_args.student", str(tiny_teacher_ckpt), "--model.init_args.start_steps", "4")
    assert "holds a 'teacher' checkpoint; this command needs a 'guidance_distillation' one" in err


@pytest.fixture
def image_folder(tmp_path):
    """A folder of 12 classes of 16x16 RGB images (two each)."""
    from PIL import Image

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(12):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"c{c:02d}" / f"{i}.png")
    return root


@pytest.mark.parametrize("size, channels, needle", [
    (16, 1, "the data gives 1-channel 16x16 images but the network takes 1-channel 8x8 ones"),
    (8, 3, "the data gives 3-channel 8x8 images but the network takes 1-channel 8x8 ones"),
    (8, 1, "the data has 12 classes but the network knows 10"),
])
def test_data_the_network_cannot_take(tmp_path, capsys, image_folder, size, channels, needle):
    err = fit_error(capsys, tmp_path, "--data", "data.images.LabelledImageDataModule", "--data.path", str(image_folder),
                    "--data.image_size", str(size), "--data.channels", str(channels), "--data.batch_size", "4")
    assert needle in err


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    err = fit_error(capsys, tmp_path, "--data", "data.images.LabelledImageDataModule", "--data.path",
                    str(tmp_path / "empty"), "--data.image_size", "8", "--data.channels", "1")
    assert "holds no images" in err


@pytest.mark.parametrize("extra, needle", [
    (["--trainer.max_steps", "abc"], "trainer.max_steps: expected int, got 'abc'"),
    (["--model.init_args.lr", "abc"], "model.init_args.lr: expected float, got 'abc'"),
    (["--model.init_args.net.init_args.num_classes", "x"], "model.init_args.net.init_args.num_classes: expected int"),
])
def test_a_value_of_the_wrong_type_names_its_key_and_type(tmp_path, capsys, extra, needle):
    assert needle in fit_error(capsys, tmp_path, *extra)


def test_the_shipped_digits_configs_point_at_each_others_runs():
    """A user who runs configs/digits/teacher.yaml and then any other digits config needs no path: every default
    teacher / model / student path is where the config that trains it writes."""
    from train.runtime.config import read_yaml

    root = Path(__file__).resolve().parents[2] / "configs" / "digits"
    written = {name: read_yaml(root / f"{name}.yaml")["trainer"]["default_root_dir"] + "/checkpoints/last.ckpt"
               for name in ("teacher", "guidance_distill")}
    for path in sorted(root.glob("*.yaml")):
        args = read_yaml(path)["model"]["init_args"]
        for key, source in (("teacher", "teacher"), ("model", "teacher"), ("student", "guidance_distill")):
            if key in args:
                assert args[key] == written[source], (path.name, key)


@pytest.mark.parametrize("config, flag", [("guidance_distill", "teacher"), ("dmd", "teacher"), ("erase_one", "model"),
                                          ("progressive", "student")])
def test_a_missing_teacher_names_the_flag_to_pass(tmp_path, capsys, config, flag):
    root = Path(__file__).resolve().parents[2] / "configs" / "digits"
    err = fit_error(capsys, tmp_path, f"--model.init_args.{flag}", str(tmp_path / "none.ckpt"),
                    config=root / f"{config}.yaml")
    assert "does not exist" in err and f"--model.init_args.{flag}" in err
