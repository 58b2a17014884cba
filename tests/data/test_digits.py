"""The embedded digits: fixed stratified split, exact [-1, 1] range, loader shapes, argument checks."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from data.digits import DigitsDataModule, digits_dataset, digits_tensors


def test_split_sizes_and_validation_is_30_per_class():
    ds = digits_dataset()
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (1497, 300)
    _, val_labels = digits_tensors("validation")
    assert val_labels.bincount(minlength=10).tolist() == [30] * 10


def test_splits_partition_the_digits():
    raw = load_digits()
    images = torch.cat([digits_tensors("train")[0], digits_tensors("validation")[0]])
    labels = torch.cat([digits_tensors("train")[1], digits_tensors("validation")[1]])
    expected = raw.images.astype(np.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    rows = lambda x, y: sorted(zip(y.tolist(), (tuple(r) for r in x.reshape(len(x), -1).tolist())))
    assert rows(images.numpy(), labels) == rows(expected, torch.from_numpy(raw.target))


def test_range_is_exactly_minus_one_to_one():
    for split in ("train", "validation"):
        images, _ = digits_tensors(split)
        assert images.min().item() == -1.0 and images.max().item() == 1.0


def test_split_and_dtypes_identical_across_calls():
    x1, y1 = digits_tensors("validation")
    x2, y2 = digits_tensors("validation")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (300, 1, 8, 8) and x1.dtype == torch.float32 and y1.dtype == torch.int64
    first = digits_dataset()["train"]
    first.set_format("torch")  # a caller changing its copy must not change the next caller's
    assert digits_dataset()["train"].format["type"] is None


def test_unknown_split_names_the_known_ones():
    with pytest.raises(ValueError, match="'train' and 'validation'"):
        digits_tensors("test")


def test_datamodule_batches():
    dm = DigitsDataModule(batch_size=32)
    assert (dm.num_classes, dm.image_size, dm.channels) == (10, 8, 1)
    dm.setup("fit")
    train = dm.train_dataloader()
    assert len(train) == 1497 // 32  # drop_last: every training step sees a full batch
    images, labels = next(iter(train))
    assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (32,) and labels.dtype == torch.int64
    val_labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert torch.equal(val_labels, digits_tensors("validation")[1])  # every validation image, in order


@pytest.mark.parametrize("batch_size", [0, -4])
def test_datamodule_rejects_nonpositive_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size must be positive"):
        DigitsDataModule(batch_size=batch_size)


def test_datamodule_rejects_negative_workers():
    with pytest.raises(ValueError, match="num_workers"):
        DigitsDataModule(num_workers=-1)
