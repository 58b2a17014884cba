"""The embedded default: scikit-learn's handwritten digits (1797 real 8x8 images, 10 classes)."""
from __future__ import annotations

import functools

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from data.resumable import ResumableLoader, training_loader

NUM_CLASSES = 10
IMAGE_SIZE = 8
VAL_PER_CLASS = 30  # fixed validation split: 30 images of each digit (300 in all), chosen by a fixed seed
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [1797, 1, 8, 8] float32 in [-1, 1], labels [1797] int64, is_val [1797] bool), read-only, built once."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = (raw.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values 0..16 -> [-1, 1]
    labels = raw.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    val_idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:VAL_PER_CLASS] for c in range(NUM_CLASSES)])
    is_val = np.zeros(len(labels), bool)
    is_val[val_idx] = True
    for array in (images, labels, is_val):
        array.flags.writeable = False
    return images, labels, is_val


def digits_dataset():
    """The digits as a `datasets.DatasetDict` with 'train' (1497) and 'validation' (300) splits.

    Columns: 'image' float32 [1, 8, 8] scaled from 0..16 to [-1, 1]; 'label' int64 in 0..9.
    The split is stratified and fixed (seed 0), so every run and every metric sees the same images.
    The arrays are built once per process; each call returns a fresh DatasetDict, so changing one
    (set_format, map) never changes another caller's.
    """
    import datasets

    images, labels, is_val = _digits_arrays()
    features = datasets.Features({"image": datasets.Array3D((1, IMAGE_SIZE, IMAGE_SIZE), "float32"),
                                  "label": datasets.ClassLabel(names=[str(c) for c in range(NUM_CLASSES)])})

    def split(mask):
        return datasets.Dataset.from_dict({"image": images[mask], "label": labels[mask]}, features=features)

    return datasets.DatasetDict({"train": split(~is_val), "validation": split(is_val)})


def digits_tensors(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, 8, 8] float32 in [-1, 1], labels [N] int64) of one split ('train' or 'validation')."""
    if split not in ("train", "validation"):
        raise ValueError(f"the digits have splits 'train' and 'validation', not {split!r}")
    rows = digits_dataset()[split].with_format("torch")[:]
    return rows["image"].float(), rows["label"].long()


class DigitsDataModule(L.LightningDataModule):
    """Batches of (image [B, 1, 8, 8] float32 in [-1, 1], label [B] int64) from the embedded digits.

    batch_size:  images per step (per process).
    num_workers: DataLoader workers (the data is tiny; 0 is fastest).
    images:      False: labels only, batches of (None, label [B]) in the same order (the requests of data-free
                 methods, e.g. Score Forgetting Distillation; nothing can read the images).
    """

    num_classes = NUM_CLASSES
    image_size = IMAGE_SIZE
    channels = 1
    class_names = [str(c) for c in range(NUM_CLASSES)]  # "0".."9"

    def __init__(self, batch_size: int = 128, num_workers: int = 0, images: bool = True):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 (load in the main process) or more, got {num_workers}")
        self.batch_size, self.num_workers, self.images = batch_size, num_workers, bool(images)
        self._sets: dict[str, TensorDataset] = {}

    @property
    def has_images(self) -> bool:
        """Whether batches hold images (False: labels only, nothing for a discriminator's real branch)."""
        return self.images

    def setup(self, stage: str | None = None) -> None:
        if not self._sets:
            self._sets = {s: TensorDataset(*digits_tensors(s)[0 if self.images else 1:]) for s in ("train", "validation")}

    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [N, 1, 8, 8] in [-1, 1], labels [N]) of 'train' or 'validation' (what evaluation reads)."""
        return digits_tensors(split)

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled batches in an order fixed by (seed, epoch) that a resumed run continues mid-epoch."""
        self.setup()
        data = self._sets["train"]
        return training_loader(data, self.batch_size, self.num_workers, self.trainer)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._sets["validation"], batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return batch if self.images else (None, batch[0])
