"""Labelled images: image folders, save_to_disk folders, datasets names; pixels, splits and every bad input."""
import os
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from data.images import LabelledImageDataModule, image_folder_dataset, image_to_tensor, stratified_split

CLASSES = ["ant", "bee", "cat"]  # sorted: ids 0, 1, 2
# (width, height, mode, extension) of the 5 images of each class: non-square, smaller and larger than image_size
SHAPES = [(23, 11, "RGB", ".png"), (9, 30, "L", ".png"), (16, 16, "RGBA", ".png"), (40, 25, "P", ".gif"),
          (31, 18, "RGB", ".jpg")]


def make_folder(root, classes=CLASSES, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        os.makedirs(root / name / "nested", exist_ok=True)
        for i, (w, h, mode, ext) in enumerate(shapes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[0, 0], pixels[-1, -1] = 0, 255
            image = Image.fromarray(pixels).convert(mode)
            image.save(root / name / ("nested" if i == 4 else "") / f"{i}{ext}")
        (root / name / "notes.txt").write_text("not an image")
    os.makedirs(root / ".cache")  # hidden: skipped
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "folder")


def paths_and_labels(dm, split):
    dm.setup()
    rows = dm.sets[split].rows.cast_column(dm.image_column, datasets.Image(decode=False))[:]
    return [os.path.relpath(r["path"], dm.path) for r in rows[dm.image_column]], rows[dm.label_column]


def all_batches(loader):
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


# ---------------------------------------------------------------- pixels

def test_image_to_tensor_scales_to_exactly_minus_one_one():
    white = image_to_tensor(Image.new("L", (20, 10), 255), 8, 1)
    assert white.shape == (1, 8, 8) and white.dtype == torch.float32 and torch.all(white == 1.0)
    red = image_to_tensor(Image.new("RGB", (5, 7), (255, 0, 0)), 12, 3)
    assert red.shape == (3, 12, 12) and torch.all(red[0] == 1.0) and torch.all(red[1:] == -1.0)
    halves = np.zeros((16, 16), np.uint8)
    halves[:, 8:] = 255
    x = image_to_tensor(Image.fromarray(halves), 8, 1)
    assert x.min().item() == -1.0 and x.max().item() == 1.0


def test_image_to_tensor_center_crops_the_shorter_side():
    stripes = np.zeros((30, 10, 3), np.uint8)  # top red, middle green, bottom blue; width is the shorter side
    stripes[:10, :, 0], stripes[10:20, :, 1], stripes[20:, :, 2] = 255, 255, 255
    x = image_to_tensor(Image.fromarray(stripes), 10, 3)
    expected = torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 10, 10)
    assert torch.equal(x, expected)


def test_image_to_tensor_modes():
    transparent = image_to_tensor(Image.new("RGBA", (6, 6), (0, 0, 0, 0)), 6, 3)
    assert torch.all(transparent == 1.0)  # laid on white
    deep = np.full((6, 6), 65535, np.uint16)
    deep[:3] = 0
    grey16 = image_to_tensor(Image.fromarray(deep), 6, 1)  # I;16: scaled, not clipped
    assert grey16[0, :3].eq(-1.0).all() and grey16[0, 3:].eq(1.0).all()
    mid = image_to_tensor(Image.fromarray(np.full((6, 6), 257 * 128, np.uint16)), 6, 1)
    assert torch.allclose(mid, torch.full_like(mid, 128 / 127.5 - 1), atol=1e-6)
    grey_from_rgb = image_to_tensor(Image.new("RGB", (6, 6), (200, 200, 200)), 6, 1)
    assert torch.allclose(grey_from_rgb, torch.full((1, 6, 6), 200 / 127.5 - 1), atol=1e-6)
    rgb_from_grey = image_to_tensor(Image.new("L", (6, 6), 0), 6, 3)
    assert rgb_from_grey.shape == (3, 6, 6) and torch.all(rgb_from_grey == -1.0)


# ---------------------------------------------------------------- image folders

@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_batches(folder, channels):
    dm = LabelledImageDataModule(str(folder), image_size=16, channels=channels, batch_size=4, val_fraction=0.2)
    assert (dm.num_classes, dm.class_names, dm.image_size, dm.channels) == (3, CLASSES, 16, channels)
    assert {k: len(v) for k, v in dm.sets.items()} == {"train": 12, "validation": 3}
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, channels, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    images, labels = all_batches(dm.val_dataloader())
    assert images.shape == (3, channels, 16, 16) and images.min() >= -1.0 and images.max() <= 1.0
    assert sorted(labels.tolist()) == [0, 1, 2]  # stratified: one of each class
    train_images, _ = all_batches(dm.train_dataloader())
    assert len(train_images) == 12 and train_images.min().item() == -1.0 and train_images.max().item() == 1.0


def test_labels_are_sorted_subfolder_names_and_non_images_skipped(folder):
    dm = LabelledImageDataModule(str(folder), image_size=8, val_fraction=0.2)
    (train_paths, train_labels), (val_paths, val_labels) = (paths_and_labels(dm, s) for s in ("train", "validation"))
    paths, labels = train_paths + val_paths, train_labels + val_labels
    assert len(paths) == 15 and not any(p.endswith(".txt") or p.startswith(".") for p in paths)
    assert all(CLASSES.index(p.split(os.sep)[0]) == y for p, y in zip(paths, labels))
    assert sum(p.endswith(os.path.join("nested", "4.jpg")) for p in paths) == 3  # images at any depth


def test_validation_split_is_fixed_by_seed(folder):
    make = lambda seed: LabelledImageDataModule(str(folder), image_size=8, val_fraction=0.2, seed=seed)
    assert paths_and_labels(make(0), "validation") == paths_and_labels(make(0), "validation")
    val = {tuple(paths_and_labels(make(seed), "validation")[0]) for seed in range(5)}
    assert len(val) > 1  # the seed chooses the images
    train, held_out = (set(paths_and_labels(make(3), s)[0]) for s in ("train", "validation"))
    assert not train & held_out and len(train | held_out) == 15


def test_stratified_split_keeps_class_proportions():
    labels = np.repeat([0, 1, 2], [10, 20, 30])
    train, val = stratified_split(labels, 0.1, seed=7)
    assert np.bincount(labels[val]).tolist() == [1, 2, 3]
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(60))
    again = stratified_split(labels, 0.1, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((train, val), again))
    assert len(stratified_split(labels, 0.001, 0)[1]) == 1 and len(stratified_split(labels, 0.999, 0)[0]) == 1


def test_split_subfolders_are_used_as_splits(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        make_folder(tmp_path / split, shapes=SHAPES[:n])
    dm = LabelledImageDataModule(str(tmp_path), image_size=8, batch_size=2)
    assert dm.class_names == CLASSES
    assert {k: len(v) for k, v in dm.sets.items()} == {"train": 12, "validation": 6, "test": 9}
    _, labels = all_batches(dm.test_dataloader())
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3


# ---------------------------------------------------------------- save_to_disk, parquet and datasets names

def test_save_to_disk_round_trip(folder, tmp_path):
    reference = LabelledImageDataModule(str(folder), image_size=8, val_fraction=0.2)
    reference.setup()
    expected = {s: all_batches(reference.val_dataloader() if s == "validation" else
                               torch.utils.data.DataLoader(reference.sets[s], batch_size=64)) for s in reference.sets}
    image_folder_dataset(str(folder)).save_to_disk(str(tmp_path / "whole"))  # a Dataset: split as above
    dd = datasets.DatasetDict({s: reference.sets[s].rows for s in reference.sets})
    dd.save_to_disk(str(tmp_path / "dict"))  # a DatasetDict with its own validation split
    shutil.rmtree(folder)  # save_to_disk embeds the image bytes
    for saved in ("whole", "dict"):
        dm = LabelledImageDataModule(str(tmp_path / saved), image_size=8, val_fraction=0.2)
        assert dm.class_names == CLASSES
        for split, (images, labels) in expected.items():
            got_images, got_labels = all_batches(torch.utils.data.DataLoader(dm.sets[split], batch_size=64))
            assert torch.equal(got_images, images) and torch.equal(got_labels, labels)


def test_parquet_folder_loads_offline(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    os.makedirs(tmp_path / "repo" / "data")
    image_folder_dataset(str(folder)).to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    dm = LabelledImageDataModule(str(tmp_path / "repo"), image_size=8, val_fraction=0.2)
    assert dm.num_classes == 3 and {k: len(v) for k, v in dm.sets.items()} == {"train": 12, "validation": 3}


def test_datasets_name_goes_through_load_dataset(folder, monkeypatch):
    source = image_folder_dataset(str(folder))
    words = [CLASSES[y] for y in source["label"]]
    hub = datasets.DatasetDict({  # columns named like CIFAR-100's, string labels, no validation split
        "train": source.rename_column("image", "img").remove_columns("label").add_column("fine_label", words),
        "test": source.select(range(3)).rename_column("image", "img").remove_columns("label")
        .add_column("fine_label", words[:3])})
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path: asked.append(path) or hub)
    dm = LabelledImageDataModule("someone/tiny-images", image_size=8, val_fraction=0.2,
                                 image_column="img", label_column="fine_label")
    assert dm.class_names == CLASSES and asked == ["someone/tiny-images"]
    assert {k: len(v) for k, v in dm.sets.items()} == {"train": 12, "validation": 3, "test": 3}
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (12, 3, 8, 8) and labels.dtype == torch.int64
    assert paths_and_labels(dm, "test")[1] == [0, 0, 0]


def test_unknown_datasets_name_says_what_to_give(monkeypatch):
    def offline(path):
        raise ConnectionError("Couldn't reach the Hub\n(details)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    dm = LabelledImageDataModule("someone/missing", image_size=8)
    with pytest.raises(FileNotFoundError, match=r"someone/missing does not exist .*Couldn't reach the Hub\); give an "
                                                r"image folder with one subfolder per class, a save_to_disk folder"):
        dm.setup()


# ---------------------------------------------------------------- bad inputs

def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset path .*nowhere does not exist; give an image folder with "
                                                r"one subfolder per class, a save_to_disk folder, or a datasets name"):
        LabelledImageDataModule(str(tmp_path / "nowhere"), image_size=8)


def test_path_to_a_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        LabelledImageDataModule(str(tmp_path / "x.png"), image_size=8).setup()


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="has no class subfolders; put each class's images in its own subfolder"):
        LabelledImageDataModule(str(tmp_path), image_size=8).setup()


def test_class_folder_without_images(folder):
    os.makedirs(folder / "dog")
    (folder / "dog" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*dog holds no images .*add images to it or remove it"):
        LabelledImageDataModule(str(folder), image_size=8).setup()


def test_empty_dataset(tmp_path, monkeypatch):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    empty = datasets.Dataset.from_dict({"image": [], "label": []}, features=features)
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="holds an empty split .*give a dataset with images in every split"):
        LabelledImageDataModule(str(tmp_path / "empty"), image_size=8).setup()
    monkeypatch.setattr(datasets, "load_dataset", lambda path: datasets.DatasetDict({"train": empty}))
    with pytest.raises(ValueError, match="split 'train' of someone/empty is empty; give a dataset with images"):
        LabelledImageDataModule("someone/empty", image_size=8).setup()


def test_single_image_cannot_be_split(tmp_path):
    make_folder(tmp_path, classes=["only"], shapes=SHAPES[:1])
    with pytest.raises(ValueError, match="at least 2 are needed to hold out a validation split"):
        LabelledImageDataModule(str(tmp_path), image_size=8).setup()


@pytest.mark.parametrize("column, argument", [("image_column", "picture"), ("label_column", "class")])
def test_missing_column_lists_available_ones(folder, column, argument):
    dm = LabelledImageDataModule(str(folder), image_size=8, **{column: argument})
    with pytest.raises(ValueError, match=rf"no column '{argument}'; available columns: \['image', 'label'\]; "
                                         rf"pass {column}="):
        dm.setup()


def test_columns_of_the_wrong_kind(tmp_path):
    rows = datasets.Dataset.from_dict({"pixels": [[0.0, 1.0]] * 4, "label": [0.5] * 4, "id": [0, 1, 0, 1]})
    rows.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="column 'pixels' .* not images; pass image_column="):
        LabelledImageDataModule(str(tmp_path / "saved"), image_size=8, image_column="pixels").setup()
    images = [Image.new("L", (4, 4))] * 4
    datasets.Dataset.from_dict({"image": images, "label": [0.5] * 4}).save_to_disk(str(tmp_path / "float_labels"))
    with pytest.raises(ValueError, match="label column 'label' .* must hold class ids"):
        LabelledImageDataModule(str(tmp_path / "float_labels"), image_size=8).setup()


def test_splits_without_train(folder, tmp_path):
    source = image_folder_dataset(str(folder))
    datasets.DatasetDict({"a": source, "b": source}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(ValueError, match=r"has splits \['a', 'b'\] but none named 'train'"):
        LabelledImageDataModule(str(tmp_path / "ab"), image_size=8).setup()


def test_no_test_split(folder):
    with pytest.raises(ValueError, match="has no 'test' split"):
        LabelledImageDataModule(str(folder), image_size=8).test_dataloader()


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 0}, "image_size must be a positive number of pixels, got 0"),
    ({"image_size": -8}, "image_size must be a positive number of pixels, got -8"),
    ({"channels": 2}, r"channels must be 1 \(grey\) or 3 \(RGB\), got 2"),
    ({"channels": 4}, r"channels must be 1 \(grey\) or 3 \(RGB\), got 4"),
    ({"val_fraction": 0.0}, "val_fraction must lie strictly between 0 and 1"),
    ({"val_fraction": 1.0}, "val_fraction must lie strictly between 0 and 1"),
    ({"val_fraction": -0.1}, "val_fraction must lie strictly between 0 and 1"),
    ({"batch_size": 0}, "batch_size must be positive, got 0"),
    ({"num_workers": -1}, "num_workers must be 0"),
])
def test_bad_arguments(folder, kwargs, message):
    arguments = {"image_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        LabelledImageDataModule(str(folder), **arguments)


def test_worker_processes_give_the_same_batches(folder):
    in_process = LabelledImageDataModule(str(folder), image_size=8, batch_size=2, val_fraction=0.2)
    workers = LabelledImageDataModule(str(folder), image_size=8, batch_size=2, val_fraction=0.2, num_workers=2)
    for got, expected in zip(all_batches(workers.val_dataloader()), all_batches(in_process.val_dataloader())):
        assert torch.equal(got, expected)


# ---------------------------------------------------------------- unreadable images
def _spoil(folder):
    """A truncated PNG and a text file saved as .jpg among the images."""
    good = (folder / "ant" / "0.png").read_bytes()
    (folder / "ant" / "broken.png").write_bytes(good[: len(good) // 2])
    (folder / "bee" / "fake.jpg").write_text("not a jpeg")
    return {"broken.png", "fake.jpg"}


def test_images_that_do_not_open_are_named_at_setup(folder):
    bad = _spoil(folder)
    with pytest.raises(ValueError, match="2 image\\(s\\) of split 'train'.*do not open") as e:
        LabelledImageDataModule(str(folder), image_size=8).setup()
    assert all(name in str(e.value) for name in bad) and "skip_bad_images: true" in str(e.value)


def test_skip_bad_images_leaves_them_out_with_a_warning(folder):
    bad = _spoil(folder)
    dm = LabelledImageDataModule(str(folder), image_size=8, batch_size=4, val_fraction=0.2, skip_bad_images=True)
    with pytest.warns(UserWarning, match="leaving out 2 image"):
        dm.setup()
    paths = paths_and_labels(dm, "train")[0] + paths_and_labels(dm, "validation")[0]
    assert len(paths) == 15 and not any(os.path.basename(p) in bad for p in paths)
    images, _ = all_batches(dm.train_dataloader())  # every image left decodes
    assert images.shape[1:] == (3, 8, 8)
