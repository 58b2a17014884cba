"""The README path on a data set the project has never seen: a random labelled image folder (RGB, 3 classes, 16x16)
fitted through the CLI with the shipped digits configs plus the data section and network sizes (ANY_DATA), each
model evaluated by the feature network of that folder, sampled and exported with its class names."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytestmark = pytest.mark.slow  # four CLI fits and their evaluations: about 100 s on 2 CPU cores

CLASSES = ("circle", "square", "triangle")


def write_shapes_folder(root: str | Path, per_class: int = 24, size: int = 16, seed: int = 0) -> Path:
    """root/<circle|square|triangle>/<i>.png: a random-coloured shape of random size and place on a random-coloured
    background, with pixel noise (RGB, size x size)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            while np.abs(bg - fg).sum() < 200:
                fg = rng.integers(0, 256, 3)
            image = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
            draw = ImageDraw.Draw(image)
            r = rng.uniform(0.25, 0.4) * size
            cx, cy = rng.uniform(r, size - r, 2)
            box = [cx - r, cy - r, cx + r, cy + r]
            colour = tuple(int(v) for v in fg)
            if name == "circle":
                draw.ellipse(box, fill=colour)
            elif name == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            pixels = np.asarray(image, np.float64) + rng.normal(0, 8, (size, size, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------------------------------- the README's overrides

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "digits"
NET = "--model.init_args.net.init_args."


def any_data(folder: str | Path) -> list[str]:
    """What changes in configs/digits/*.yaml for another labelled image folder: the data section (a
    LabelledImageDataModule on the folder, its image size and channels; val_fraction here because the folder is tiny)
    and, for the teacher, the network's sizes (classes, image size, channels; smaller levels here for speed). The
    README's "Pointing the same jobs at real data" gives exactly these."""
    return ["--data.class_path", "data.images.LabelledImageDataModule", "--data.init_args.path", str(folder),
            "--data.init_args.image_size", "16", "--data.init_args.channels", "3", "--data.init_args.val_fraction",
            "0.25"]


TEACHER_NET = [f"{NET}num_classes", "3", f"{NET}sample_size", "16", f"{NET}in_channels", "3",
               f"{NET}block_out_channels", "[16, 32]", f"{NET}attention_levels", "[false, true]",
               f"{NET}norm_num_groups", "8"]


def quick(root: Path, steps: int = 2) -> list[str]:
    """Test-only: a few steps, one validation, no W&B, few validation samples."""
    return ["--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps), "--trainer.val_check_interval",
            str(steps), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.callbacks.num_per_class", "4"]


def fit(config: str, root: Path, *args: str, steps: int = 2) -> Path:
    from train.cli import main

    main(["fit", "--config", str(DIGITS / config), *args, *quick(root, steps)])
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


@pytest.fixture(scope="module")
def shapes_runs(tmp_path_factory, cache_dir):
    """The folder and, fitted through the CLI on it: teacher, guidance distillation, DMD and erasure of 'triangle'."""
    root = tmp_path_factory.mktemp("shapes")
    folder = write_shapes_folder(root / "shapes")
    teacher = fit("teacher.yaml", root / "teacher", *any_data(folder), *TEACHER_NET, steps=4)
    runs = {"teacher": teacher,
            "guidance_distill": fit("guidance_distill.yaml", root / "gd", "--model.init_args.teacher", str(teacher),
                                    *any_data(folder)),
            "dmd": fit("dmd.yaml", root / "dmd", "--model.init_args.teacher", str(teacher), *any_data(folder)),
            "erase": fit("erase_one.yaml", root / "erase", "--model.init_args.model", str(teacher),
                         "--model.init_args.concepts", "[triangle]", "--model.init_args.val_samples", "4")}
    return folder, runs


def test_every_checkpoint_records_the_folder_and_its_class_names(shapes_runs):
    import torch

    folder, runs = shapes_runs
    for name, ckpt in runs.items():
        record = torch.load(ckpt, weights_only=True, map_location="cpu")["guidedistill"]
        assert record["data"] == {"class_path": "data.images.LabelledImageDataModule", "init_args": {
            "path": str(folder), "image_size": 16, "channels": 3, "val_fraction": 0.25, "image_column": "image",
            "label_column": "label", "seed": 0, "skip_bad_images": False}}, name  # erasure: its teacher's data
    teacher = torch.load(runs["teacher"], weights_only=True, map_location="cpu")["guidedistill"]["config"]
    assert teacher["net"]["init_args"]["class_names"] == list(CLASSES)


def test_evaluate_scores_every_model_with_the_folders_feature_network(shapes_runs, tmp_path, capsys):
    from train.cli import main

    folder, runs = shapes_runs
    for name, ckpt in runs.items():
        out = tmp_path / f"{name}.json"
        main(["evaluate", "--ckpt", str(ckpt), "--num-per-class", "5", "--out", str(out),
              *(["--steps", "4"] if name != "dmd" else [])])
        report = json.loads(out.read_text())
        row = report["rows"][0]
        assert row["requests"] == "classes circle, square, triangle" and row["num_samples"] == 15, name
        assert row["fd"] >= 0 and 0 <= row["accuracy"] <= 1 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert len(row["per_class_accuracy"]) == 3 and sum(row["class_histogram"]) == pytest.approx(1.0)
        net = report["feature_network"][0]
        assert str(folder) in net["data"] and "3x16x16" in net["data"] and net["classes"] == list(CLASSES)
        assert net["heldout_images"] == 18 and 0 <= net["heldout_accuracy"] <= 1
        assert "held-out accuracy" in capsys.readouterr().out


def test_the_feature_network_is_trained_on_the_folder_and_cached(shapes_runs, cache_dir):
    from train.evaluation.classifier import cache_path, classifier_accuracy, load_feature_network, recipe_for
    from train.evaluation.labelled import labelled_data
    from train.runtime.checkpoint import load_method

    module = load_method(shapes_runs[1]["teacher"])
    data = labelled_data(module.data_reference)
    net = load_feature_network(data)
    assert net.image_shape == (3, 16, 16) and net.head[-1].out_features == 3
    assert cache_path(cache_dir, recipe_for(data), data.digest).is_file()
    assert net.heldout_accuracy == classifier_accuracy(net, *data.split_tensors("validation"))
    assert net.heldout_accuracy > 1 / 3  # better than chance on the held-out shapes


def test_fid_from_local_inception_weights_against_the_held_out_images(shapes_runs, tmp_path):
    from train.cli import main
    from train.evaluation.inception import WEIGHTS_NAME, FIDInceptionV3

    torch.manual_seed(0)  # a random FID Inception saved as the weight file FID users have (test_reference_metrics)
    inception = FIDInceptionV3()
    for m in inception.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / WEIGHTS_NAME
    torch.save(inception.state_dict(), weights)
    out = tmp_path / "fid.json"
    main(["evaluate", "--ckpt", str(shapes_runs[1]["teacher"]), "--num-per-class", "3", "--steps", "2",
          "--fid-weights", str(weights), "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["rows"][0]["fid"] > 0 and report["not_computed"] == []


def test_sample_and_erasure_take_class_names(shapes_runs, tmp_path):
    from train.cli import main
    from train.runtime.checkpoint import load_method

    main(["sample", "--ckpt", str(shapes_runs[1]["teacher"]), "--class", "triangle", "--class", "circle",
          "--num-per-class", "2", "--steps", "2", "--out", str(tmp_path / "s")])
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["labels"].tolist() == [2, 2, 0, 0] and data["images"].shape == (4, 3, 16, 16)
    assert (tmp_path / "s" / "requests.txt").read_text() == "row 0: 2 (triangle)\nrow 1: 0 (circle)\n"
    assert load_method(shapes_runs[1]["erase"]).erased_requests() == [2]


def test_export_shows_the_class_names(shapes_runs, tmp_path):
    from train.cli import main

    for name in ("teacher", "erase"):
        out = tmp_path / name
        main(["export", "--ckpt", str(shapes_runs[1][name]), "--out", str(out)])
        meta = json.loads((out / "guidedistill.json").read_text())
        assert meta["class_names"] == list(CLASSES) and meta["conditioning"]["class_names"] == list(CLASSES)
        assert "0 = circle, 1 = square, 2 = triangle" in (out / "README.md").read_text()


def test_a_feature_network_of_another_data_set_is_refused(shapes_runs, classifier, tmp_path):
    from train.evaluation.classifier import cache_path, load_classifier, load_feature_network, recipe_for, \
        save_classifier
    from train.evaluation.evaluate import evaluate_samples
    from train.evaluation.labelled import labelled_data
    from train.runtime.checkpoint import load_method

    data = labelled_data(load_method(shapes_runs[1]["teacher"]).data_reference)
    images, labels = data.split_tensors("validation")
    with pytest.raises(ValueError, match="trained on the embedded digits"):
        evaluate_samples(images, labels, classifier=classifier, data=data)
    with pytest.raises(ValueError, match=r"images must be \[N, 3, 16, 16\]"):
        evaluate_samples(torch.zeros(6, 1, 8, 8), data=data)
    path = tmp_path / "w.safetensors"  # a cache file of the same recipe whose data digest is another data set's
    net = load_feature_network(data)
    save_classifier(net, path, recipe_for(data))
    with pytest.raises(ValueError, match="another data set"):
        load_classifier(path, recipe_for(data), data_digest="0" * 64)
    assert cache_path(None, recipe_for(data), data.digest) != cache_path(None, recipe_for(data), "0" * 64)


def test_shapes_are_checked_before_sampling(shapes_runs, monkeypatch):
    from train.evaluation.erasure import erasure_metrics
    from train.evaluation.requests import evaluate_set, request_sets
    from train.runtime.checkpoint import load_method

    module = load_method(shapes_runs[1]["erase"])
    module.data_reference = {"class_path": "data.digits.DigitsDataModule", "init_args": {}}  # the wrong data

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the shapes were checked")

    monkeypatch.setattr(type(module), "generate", no_sampling)
    want = "the evaluation network takes 1x8x8 images (the embedded digits (1x8x8, 10 classes)), the model generates 3x16x16"
    with pytest.raises(ValueError, match=re.escape(want)):
        evaluate_set(module, request_sets(module)[0])
    with pytest.raises(ValueError, match="takes 1x8x8 images"):
        erasure_metrics(module, steps=2, num_per_class=2)


def test_class_names_that_are_not_the_datas_are_refused(shapes_runs, tmp_path, capsys):
    from train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(DIGITS / "teacher.yaml"), *any_data(shapes_runs[0]), *TEACHER_NET,
              f"{NET}class_names", "[square, circle, triangle]", *quick(tmp_path / "t")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "class_names ['square', 'circle', 'triangle'] are not the data's ['circle', 'square', 'triangle']" in err


def test_the_wandb_table_has_one_accuracy_column_per_class_name(shapes_runs):
    from types import SimpleNamespace

    from train.evaluation.callbacks import SampleMetrics
    from train.evaluation.evaluate import evaluate_samples
    from train.evaluation.labelled import labelled_data
    from train.runtime.checkpoint import load_method

    module = load_method(shapes_runs[1]["erase"])
    callback = SampleMetrics(num_per_class=2)
    callback.data = labelled_data(module.data_reference)
    images, labels = callback.data.split_tensors("validation")
    metrics = evaluate_samples(images, labels, data=callback.data)

    class WandbLogger:  # what _log_table hands W&B
        def log_table(self, key, columns, data, step):
            self.table = dict(zip(columns, data[-1]))

    logger = WandbLogger()
    callback._log_table(SimpleNamespace(global_step=7, loggers=[logger]), module, metrics)
    row = logger.table
    assert [k for k in row if k.startswith("accuracy_")] == [f"accuracy_{c}" for c in CLASSES]
    assert row["accuracy_triangle"] == metrics["per_class_accuracy"][2] == row["erased_rate"]  # triangle is erased
    assert row["step"] == 7 and row["fd"] == metrics["fd"]
