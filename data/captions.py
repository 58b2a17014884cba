"""Image-caption pairs (an image folder with captions, a save_to_disk folder or a datasets name) as a
LightningDataModule for text-to-image teachers and for real-data terms of distillation: raw captions with images,
or with the latents of a latent model, encoded once and cached."""
from __future__ import annotations

import hashlib
import json
import os

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from data.images import _image_files, image_to_tensor, load_source, readable_rows
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


class _SamplesWithCaptions(torch.utils.data.Dataset):
    def __init__(self, samples: torch.Tensor, captions: list[str]):
        self.samples, self.captions = samples, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        return self.samples[int(i)], self.captions[int(i)]


class CaptionedImageDataModule(L.LightningDataModule):
    """Batches of (images [B, 3, S, S] float32 in [-1, 1], captions list[str]); for a latent model (the trained
    method's `vae_folder` is set), (latents [B, C, S/f, S/f], captions), the latents encoded once by the model's own
    VAE (the method's `images_to_samples`) and cached. The method encodes the captions (its conditioner).

    path:           see caption_folder_dataset; a folder written by save_to_disk or a datasets name go
                    through data.images.load_source.
    image_size:     S (shorter side resized to S, center crop).
    caption_column: the caption field (default: the first of text, caption, prompt).
    image_column:   the image field of datasets sources.
    val_size:       images held out (seeded) when the source has no validation split; 0 validates on the
                    first training images.
    cache_dir:      where a latent model's latents are written once (latents-<hash>.safetensors, keyed by the
                    source, size, captions and VAE folder); None keeps them in memory only.
    skip_bad_images: every image is checked to open at set-up; a bad one is an error naming it, or (true) is left
                    out with a warning.
    """

    has_images = True

    def __init__(self, path: str, image_size: int = 512, batch_size: int = 4, caption_column: str | None = None,
                 image_column: str = "image", val_size: int = 8, seed: int = 0, num_workers: int = 0,
                 cache_dir: str | None = None, skip_bad_images: bool = False):
        super().__init__()
        if image_size <= 0 or batch_size <= 0 or val_size < 0:
            raise ValueError(f"image_size and batch_size must be positive and val_size >= 0, got "
                             f"{image_size}, {batch_size}, {val_size}")
        self.path, self.image_size, self.batch_size = path, image_size, batch_size
        self.caption_column, self.image_column, self.val_size, self.seed = caption_column, image_column, val_size, seed
        self.num_workers, self.cache_dir, self.skip_bad_images = num_workers, cache_dir, skip_bad_images
        self.sets: dict[str, torch.utils.data.Dataset] = {}

    def _source(self):
        import datasets

        local = os.path.expanduser(self.path)
        is_saved = os.path.isdir(local) and any(os.path.isfile(os.path.join(local, f))
                                                for f in ("dataset_dict.json", "state.json"))
        source = caption_folder_dataset(local) if os.path.isdir(local) and not is_saved else load_source(self.path)
        return source if isinstance(source, datasets.DatasetDict) else datasets.DatasetDict({"train": source})

    def _model(self):
        """The method module being trained, when it works in a latent space (else None)."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return module if getattr(module, "vae_folder", None) is not None else None

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
        train = readable_rows(train, self.image_column, str(self.path), self.skip_bad_images)
        val = source.get("validation")
        if val is not None:
            val = readable_rows(val, self.image_column, f"the validation split of {self.path}", self.skip_bad_images)
        if val is None:
            if self.val_size >= len(train):
                raise ValueError(f"{self.path} has {len(train)} images, not more than val_size={self.val_size}")
            if self.val_size == 0:  # validate on the first training images
                val = train.select(range(min(self.batch_size, len(train))))
            else:
                order = np.random.default_rng(self.seed).permutation(len(train))
                val, train = train.select(sorted(order[:self.val_size])), train.select(sorted(order[self.val_size:]))
        sets = {name: CaptionedImages(rows, self.image_size, self.image_column, col)
                for name, rows in (("train", train), ("validation", val))}
        model = self._model()
        if model is not None:
            sets = {name: self._encoded(name, data, model) for name, data in sets.items()}
        self.sets = sets

    def _encoded(self, split: str, data: CaptionedImages, model) -> _SamplesWithCaptions:
        """The split's images as the model's latents (read from, or written to, the cache) with their captions."""
        from safetensors.torch import load_file, save_file

        texts = [str(data.rows[i][data.caption_column]) for i in range(len(data))]
        cache = None
        if self.cache_dir is not None:
            key = hashlib.sha256(repr((os.path.abspath(os.path.expanduser(self.path)), self.image_size,
                                       os.path.abspath(model.vae_folder), split, texts)).encode()).hexdigest()[:16]
            cache = os.path.join(os.path.expanduser(self.cache_dir), f"latents-{key}.safetensors")
            if os.path.isfile(cache):
                return _SamplesWithCaptions(load_file(cache)["latents"], texts)
        images = torch.stack([data[i][0] for i in range(len(data))])
        latents = model.images_to_samples(images).float().contiguous()
        if cache is not None:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = cache + ".tmp"
            save_file({"latents": latents}, tmp)
            os.replace(tmp, cache)
        return _SamplesWithCaptions(latents, texts)

    @property
    def val_prompts(self) -> list[str]:
        """The validation captions (the prompts of validation sample grids)."""
        self.setup()
        data = self.sets["validation"]
        return data.captions if isinstance(data, _SamplesWithCaptions) else [
            str(data.rows[i][data.caption_column]) for i in range(len(data))]

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        data = self.sets["train"]
        return training_loader(data, self.batch_size, self.num_workers, self.trainer)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.sets["validation"], batch_size=self.batch_size, num_workers=self.num_workers)
