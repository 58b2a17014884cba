"""A data module's reference (class path + init args), what checkpoints record about their data, and back;
split_tensors and class names of the labelled data modules."""
from __future__ import annotations

import os

import pytest
import torch

from data.digits import DigitsDataModule, digits_tensors
from data.images import LabelledImageDataModule
from data.reference import build_datamodule, datamodule_reference, describe_reference, gives_labelled_images
from tests.data.test_images import CLASSES, make_folder


def test_the_digits_reference_and_class_names():
    dm = DigitsDataModule(batch_size=7)
    assert datamodule_reference(dm) == {"class_path": "data.digits.DigitsDataModule", "init_args": {}}
    assert dm.class_names == [str(c) for c in range(10)]
    for split in ("train", "validation"):
        assert all(torch.equal(a, b) for a, b in zip(dm.split_tensors(split), digits_tensors(split)))


def test_a_folder_reference_rebuilds_the_same_images(tmp_path, monkeypatch):
    make_folder(tmp_path / "folder")
    monkeypatch.chdir(tmp_path)
    dm = LabelledImageDataModule("folder", image_size=8, channels=3, batch_size=2, val_fraction=0.2)
    ref = datamodule_reference(dm)
    assert ref["class_path"] == "data.images.LabelledImageDataModule"
    assert ref["init_args"]["path"] == os.path.join(str(tmp_path), "folder")  # absolute: found from any folder
    assert {"batch_size", "num_workers"}.isdisjoint(ref["init_args"])  # loading only, not which images
    assert describe_reference(ref) == f"LabelledImageDataModule(path='{tmp_path / 'folder'}', image_size=8, " \
                                      f"val_fraction=0.2)"
    again = build_datamodule(ref)
    assert again.class_names == CLASSES == dm.class_names
    for split in ("train", "validation"):
        (x, y), (x2, y2) = dm.split_tensors(split), again.split_tensors(split)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x.shape[1:] == (3, 8, 8) and len(x) == len(dm.sets[split])
        assert torch.equal(x[0], dm.sets[split][0][0]) and int(y[-1]) == int(dm.sets[split][len(y) - 1][1])


def test_what_gives_no_labelled_images_has_no_reference():
    from data.steps import ErasureSteps

    assert not gives_labelled_images(ErasureSteps()) and datamodule_reference(ErasureSteps()) is None


def test_a_reference_that_no_longer_reads_is_one_line(tmp_path):
    ref = {"class_path": "data.images.LabelledImageDataModule",
           "init_args": {"path": str(tmp_path / "gone"), "image_size": 8}}
    with pytest.raises(ValueError, match=r"the model was trained on LabelledImageDataModule\(path=.*gone.*cannot be "
                                         r"read here: dataset path .* does not exist"):
        build_datamodule(ref)
    with pytest.raises(ValueError, match="does not import here"):
        build_datamodule({"class_path": "data.nowhere.Module", "init_args": {}})
