"""Image-caption pairs (an image folder with captions, a save_to_disk folder or a datasets name) as a
LightningDataModule for text-to-image teachers and for real-data terms of distillation."""
from __future__ import annotations

import json
import os

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from data.images import _image_files, image_to_tensor, load_source
from data.resumable import ResumableLoader, training_loader

CAPTION_COLUMNS = ("text", "caption", "prompt")
CAPTION_SOURCES = ("an image folder with captions (metadata.jsonl with file_name and text, or a .txt beside each "
                   "image), a save_to_disk folder, or a datasets name")


def caption_folder_dataset(root: str):
    """A datasets.Dataset (image, text) from an image folder with captions.

    root/metadata.jsonl: one object per line with "file_name" (relative to root) and a caption field
    (text, caption or prompt), the layout of datasets' imagefolder; otherwise every image (any depth,
    sorted) with a caption file of the same name and extension .txt beside it.
    """
    import datasets

    meta = os.path.join(root, "metadata.jsonl")
    paths, texts = [], []
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                col = next((c for c in CAPTION_COLUMNS if c in row), None)
                if "file_name" not in row or col is None:
                    raise ValueError(f"{meta}, line {n}: needs 'file_name' and one of {', '.join(CAPTION_COLUMNS)}")
                path = os.path.join(root, row["file_name"])
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{meta}, line {n}: image {row['file_name']!r} does not exist under {root}")
                paths.append(path)
                texts.append(str(row[col]))
    else:
        for path in _image_files(root):
            side = os.path.splitext(path)[0] + ".txt"
            if not os.path.isfile(side):
                raise ValueError(f"image {path} has no caption file {os.path.basename(side)}; give each image a .txt "
                                 f"caption beside it or write {meta}")
            with open(side, encoding="utf-8") as f:
                texts.append(f.read().strip())
            paths.append(path)
    if not paths:
        raise ValueError(f"{root} holds no captioned images; give {CAPTION_SOURCES}")
    return datasets.Dataset.from_dict({"image": paths, "text": texts},
                                      features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))


class CaptionedImages(torch.utils.data.Dataset):
    """(image [3, S, S] float32 in [-1, 1], caption str) per index of a datasets.Dataset."""

    def __init__(self, rows, image_size: int, image_column: str, caption_column: str):
        self.rows, self.image_size = rows, image_size
        self.image_column, self.caption_column = image_column, caption_column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        row = self.rows[int(index)]
        return image_to_tensor(row[self.image_column], self.image_size, 3), str(row[self.caption_column])


class CaptionedImageDataModule(L.LightningDataModule):
    """Batches of (images [B, 3, S, S] float32 in [-1, 1], captions list[str]).

    path:           see caption_folder_dataset; a folder written by save_to_disk or a datasets name go
                    through data.images.load_source.
    image_size:     S (shorter side resized to S, center crop).
    caption_column: the caption field (default: the first of text, caption, prompt).
    image_column:   the image field of datasets sources.
    val_size:       images held out (seeded) when the source has no validation split; 0 validates on the
                    first training images.
    """

    def __init__(self, path: str, image_size: int = 512, batch_size: int = 4, caption_column: str | None = None,
                 image_column: str = "image", val_size: int = 8, seed: int = 0, num_workers: int = 0):
        super().__init__()
        if image_size <= 0 or batch_size <= 0 or val_size < 0:
            raise ValueError(f"image_size and batch_size must be positive and val_size >= 0, got "
                             f"{image_size}, {batch_size}, {val_size}")
        self.path, self.image_size, self.batch_size = path, image_size, batch_size
        self.caption_column, self.image_column, self.val_size, self.seed = caption_column, image_column, val_size, seed
        self.num_workers = num_workers
        self.sets: dict[str, CaptionedImages] = {}

    def _source(self):
        import datasets

        local = os.path.expanduser(self.path)
        is_saved = os.path.isdir(local) and any(os.path.isfile(os.path.join(local, f))
                                                for f in ("dataset_dict.json", "state.json"))
        source = caption_folder_dataset(local) if os.path.isdir(local) and not is_saved else load_source(self.path)
        return source if isinstance(source, datasets.DatasetDict) else datasets.DatasetDict({"train": source})

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        source = self._source()
        train = source["train"] if "train" in source else next(iter(source.values()))
        col = self.caption_column or next((c for c in CAPTION_COLUMNS if c in train.column_names), None)
        if col is None or col not in train.column_names:
            raise ValueError(f"{self.path} has no caption column {self.caption_column or CAPTION_COLUMNS}; columns: "
                             f"{train.column_names}; set caption_column")
        if self.image_column not in train.column_names:
            raise ValueError(f"{self.path} has no image column {self.image_column!r}; columns: {train.column_names}")
        val = source.get("validation")
        if val is None:
            if self.val_size >= len(train):
                raise ValueError(f"{self.path} has {len(train)} images, not more than val_size={self.val_size}")
            if self.val_size == 0:  # validate on the first training images
                val = train.select(range(min(self.batch_size, len(train))))
            else:
                order = np.random.default_rng(self.seed).permutation(len(train))
                val, train = train.select(sorted(order[:self.val_size])), train.select(sorted(order[self.val_size:]))
        self.sets = {name: CaptionedImages(rows, self.image_size, self.image_column, col)
                     for name, rows in (("train", train), ("validation", val))}

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        data = self.sets["train"]
        return training_loader(data, self.batch_size, self.num_workers, self.trainer)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.sets["validation"], batch_size=self.batch_size, num_workers=self.num_workers)
