"""Evaluation of a set of any size in bounded memory (train.evaluation.requests.image_batches / evaluate_set): the
initial noise drawn batch by batch equals one draw; a set evaluated c samples at a time never holds more than c decoded
images and feeds every metric once per batch, with the in-memory metrics of the same samples (class labels and prompts
through the same path, a stochastic sampler and a prompt file's per-row seeds and guidance scales included);
--save-images writes each sample as the PNG of the in-memory run's image and never replaces what it may not."""
from __future__ import annotations

import csv
import json
import math
import os
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import cli_error
from tests.data.test_prompts import I2P_HEADER, i2p_cells, write_csv
from tests.train.text_fits import randomised
from tests.train.tiny_judges import template_nudenet, tiny_clip_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# 12 prompt rows at two guidance scales (the batches of a scale hold rows from across the file), each with its seed
ROWS = [(f"{w} {i}", "sexual", 20 + i % 5, 3 if i % 3 else 7)
        for i, w in enumerate(["a cat", "the dog", "a red car", "a cat of the dog", "the red dog", "a car"] * 2)]
STEPS = 2


@pytest.mark.parametrize("shape", [(1, 8, 8), (4, 4, 4), (1, 3, 3)])
@pytest.mark.parametrize("seeded", [False, True], ids=["seed", "row-seeds"])
def test_initial_noise_drawn_batch_by_batch_equals_one_draw(shape, seeded):
    from train.evaluation.requests import initial_noise, seeded_noise

    n = 23
    noise_seeds = [(5 + i % 4, i // 4) for i in range(n)] if seeded else None
    whole = seeded_noise(shape, noise_seeds) if seeded else \
        torch.randn(n, *shape, generator=torch.Generator().manual_seed(3))
    parts = list(initial_noise(shape, n, 3, noise_seeds, 5))
    assert [len(p) for p in parts] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat(parts), whole)


def spy(module, monkeypatch) -> dict:
    """Counts, on `module`, the decoded images alive when each batch is decoded (weak references to every decode's
    output) and the batches each metric is given."""
    from train.evaluation.evaluate import LabelledMetrics
    from train.evaluation.reference import ReferenceMetrics

    seen = {"decoded": [], "alive_before": [], "updates": {}}
    outputs: list[weakref.ref] = []
    decode = module.samples_to_images

    def samples_to_images(samples, *args, **kwargs):
        seen["alive_before"].append(sum(len(r()) for r in outputs if r() is not None))
        images = decode(samples, *args, **kwargs)
        outputs.append(weakref.ref(images))
        seen["decoded"].append(len(images))
        return images

    monkeypatch.setattr(module, "samples_to_images", samples_to_images)
    for cls in (LabelledMetrics, ReferenceMetrics):
        def update(self, index, images, _cls=cls, _update=cls.update):
            seen["updates"].setdefault(_cls.__name__, []).append(len(index))
            return _update(self, index, images)

        monkeypatch.setattr(cls, "update", update)
    return seen


def assert_bounded(seen: dict, c: int, batches: int, metrics: tuple[str, ...]) -> None:
    assert len(seen["decoded"]) == batches and max(seen["decoded"]) <= c
    assert max(seen["alive_before"]) == 0  # every earlier batch's images were gone when the next one was decoded
    for name in metrics:
        assert seen["updates"][name] == seen["decoded"]  # each metric is fed every batch, once


def assert_same(got, expected, path: str = "row") -> None:
    """Equal values, floats to float32 round-off (the metrics' networks see batches of another size)."""
    if isinstance(expected, dict):
        assert set(got) >= set(expected), path
        for k in expected:
            assert_same(got[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-9), path
    else:
        assert got == expected, path


def test_class_labels_are_evaluated_c_at_a_time_as_in_memory(tiny_teacher_ckpt, monkeypatch):
    from train.evaluation.evaluate import evaluate_samples
    from train.evaluation.requests import evaluate_set, generate_images, request_sets
    from train.runtime.checkpoint import load_method

    module = load_method(tiny_teacher_ckpt)
    rs = request_sets(module, num_per_class=3)[0]  # 30 samples
    expected = []
    for w in (1.0, 3.0):
        images, nfe = generate_images(module, rs.requests, w, STEPS, seed=4, eta=0.5, batch_size=7, progress=False)
        expected.append(evaluate_samples(images, rs.labels, nfe_per_sample=nfe))
    seen = spy(module, monkeypatch)  # eta 0.5: the sampler draws noise at every step, batch after batch
    rows, _ = evaluate_set(module, rs, [1.0, 3.0], STEPS, seed=4, eta=0.5, batch_size=7)
    assert_bounded(seen, 7, 2 * math.ceil(30 / 7), ("LabelledMetrics",))
    assert_same(rows, expected)
    assert rows[0]["num_samples"] == 30 and rows[1]["w"] == 3.0


@pytest.fixture(scope="module")
def prompted(t2i_workspace, tmp_path_factory):
    """(module checkpoint, I2P-format file of ROWS, CLIP folder, NudeNet file): the tiny SD 1.5 erasure fit with its
    cross-attention values drawn N(0, 0.3^2) (the prompt shapes the image), a tiny CLIP and a detector that finds
    nudity in the images of the file's first 4 rows (sampled with eta 0.3) and in no other."""
    from train.evaluation.images import to_uint8
    from train.evaluation.nudity import letterbox
    from train.evaluation.requests import generate_images, prompt_rows, request_sets
    from train.runtime.checkpoint import load_method

    root = tmp_path_factory.mktemp("streaming")
    ckpt = randomised(t2i_workspace.fitted("erase", "sd15"), root / "model.ckpt", "attn2.to_v", std=0.3)
    i2p = write_csv(root / "i2p.csv", I2P_HEADER, [i2p_cells(I2P_HEADER, i, *r) for i, r in enumerate(ROWS)])
    module = load_method(ckpt)
    rs = request_sets(module, prompts=prompt_rows(None, i2p))[0]
    images, _ = generate_images(module, rs.requests, None, STEPS, eta=0.3, noise_seeds=rs.noise_seeds,
                                guidance=rs.guidance, progress=False)
    boxed = letterbox(to_uint8(images), 16)
    distance = ((boxed[4:, None] - boxed[None, :4]) ** 2).mean((2, 3, 4)).min(1).values
    detector = template_nudenet(root / "nudenet.onnx", boxed[:4], radius=distance.min().item() / 2)
    return ckpt, i2p, tiny_clip_folder(root / "clip", image_size=8), detector


def test_prompts_are_evaluated_c_at_a_time_as_in_memory(prompted, monkeypatch):
    from train.evaluation.reference import reference_metrics
    from train.evaluation.requests import evaluate_set, generate_images, prompt_rows, request_sets
    from train.runtime.checkpoint import load_method

    ckpt, i2p, clip, detector = prompted
    module = load_method(ckpt)
    sets = request_sets(module, prompts=prompt_rows(None, i2p), concepts=["cat", "car", "dog"], concept_prompts="{}",
                        num_per_class=2)
    rs = sets[-1]  # the file's 12 rows, each with its seed and guidance scale (8 at w 3, 4 at w 7)
    assert rs.noise_seeds is not None and sorted(set(rs.guidance)) == [3.0, 7.0]
    judges = dict(clip_model=str(clip), nudenet=str(detector), concept_template="{}")
    images, _ = generate_images(module, rs.requests, None, STEPS, eta=0.3, batch_size=3, noise_seeds=rs.noise_seeds,
                                guidance=rs.guidance, progress=False)
    expected = reference_metrics(images, rs.prompts, concepts=rs.concepts, **judges)
    seen = spy(module, monkeypatch)
    rows, missing = evaluate_set(module, rs, [None], STEPS, eta=0.3, batch_size=3, **judges)
    assert_bounded(seen, 3, math.ceil(8 / 3) + math.ceil(4 / 3), ("ReferenceMetrics",))
    assert missing == expected.pop("missing") and len(missing) == 2  # FID: no weights, no reference images
    assert_same(rows[0], expected)
    assert rows[0]["nude_images"] == 4 and rows[0]["clip_score"] > 0 and rows[0]["w"] == "per prompt (3 to 7)"


# ------------------------------------------------------------------------------------------------ --save-images

def saved(folder) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(the manifest's rows, {file: its pixels [H, W] or [H, W, 3]}) of a --save-images folder."""
    with open(folder / "images.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return rows, {r["file"]: np.asarray(Image.open(folder / r["file"])) for r in rows}


def test_save_images_writes_each_rows_sample_with_its_seed(prompted, tmp_path):
    from train.cli import main
    from train.evaluation.images import to_uint8
    from train.runtime.checkpoint import load_method

    ckpt, i2p, _, _ = prompted
    main(["evaluate", "--ckpt", str(ckpt), "--prompts", i2p, "--num-per-prompt", "2", "--steps", str(STEPS),
          "--batch-size", "5", "--save-images", str(tmp_path / "images"), "--out", str(tmp_path / "m.json")])
    rows, pixels = saved(tmp_path / "images")
    assert len(rows) == len(pixels) == 24 and rows[0]["file"] == "prompts-w-per-prompt/00000.png"
    module = load_method(ckpt)  # in memory, as ESD's evaluation draws them: 2 latents per row's seed, its own w
    for i, (prompt, _, seed, w) in enumerate(ROWS):
        noise = torch.randn(2, *module.sample_shape(), generator=torch.Generator().manual_seed(seed))
        images = to_uint8(module.samples_to_images(module.generate([prompt] * 2, w, STEPS, noise=noise)[0]))
        for j in range(2):
            row = rows[2 * i + j]
            assert (row["request"], int(row["seed"]), int(row["draw"]), float(row["w"])) == (prompt, seed, j, w)
            assert np.array_equal(pixels[row["file"]], images[j].permute(1, 2, 0).numpy())
    assert json.loads((tmp_path / "m.json").read_text())["rows"][0]["requests"] == "12 prompts x 2"


def test_save_images_of_classes_and_what_it_never_replaces(tiny_teacher_ckpt, tmp_path, capsys):
    from train.cli import main
    from train.evaluation.images import to_uint8
    from train.evaluation.requests import generate_images
    from train.runtime.checkpoint import load_method

    folder = tmp_path / "images"
    args = ["evaluate", "--ckpt", str(tiny_teacher_ckpt), "--num-per-class", "2", "--steps", str(STEPS), "--eta", "0.5",
            "--batch-size", "6", "--save-images", str(folder), "--out", str(tmp_path / "m.json")]
    main(args + ["--scales", "1", "3"])
    rows, pixels = saved(folder)
    assert len(rows) == 40 and "wrote 40 images" in capsys.readouterr().out
    module = load_method(tiny_teacher_ckpt)
    requests = [c for c in range(10) for _ in range(2)]
    for k, w in enumerate((1.0, 3.0)):
        images = to_uint8(generate_images(module, requests, w, STEPS, eta=0.5, batch_size=6, progress=False)[0])
        for i in range(20):
            row = rows[20 * k + i]
            assert row["file"] == f"classes-w{w:g}/{i:05d}.png" and int(row["label"]) == requests[i]
            assert (int(row["seed"]), int(row["draw"])) == (0, i)
            assert np.array_equal(pixels[row["file"]], images[i, 0].numpy())  # grey digits: mode L

    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert "--overwrite-images" in cli_error(capsys, args + ["--scales", "1"])
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # nothing written, nothing sampled over it
    (folder / "notes.txt").write_text("mine")
    main(args + ["--scales", "1", "--overwrite-images"])  # the earlier save is replaced, the user's file stays
    assert len(saved(folder)[0]) == 20 and not (folder / "classes-w3").exists()
    assert (folder / "notes.txt").read_text() == "mine"

    other = tmp_path / "other"
    other.mkdir()
    (other / "photo.png").write_bytes(b"the user's")
    err = cli_error(capsys, args[:-4] + ["--save-images", str(other), "--overwrite-images", "--out",
                                         str(tmp_path / "m2.json"), "--scales", "1"])
    assert "not an earlier --save-images" in err and sorted(os.listdir(other)) == ["photo.png"]
    assert "add --save-images DIR" in cli_error(capsys, args[:-4] + ["--overwrite-images", "--out", str(tmp_path / "x")])
    assert "--batch-size must be positive" in cli_error(capsys, args + ["--batch-size", "0"])
