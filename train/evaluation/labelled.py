"""The labelled image data set a model belongs to, as evaluation reads it: its splits as tensors, its classes, a
digest of its images, and which one a model records (the checkpoint's data reference, or the digits)."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor

DIGITS_CLASS_PATH = "data.digits.DigitsDataModule"


class LabelledData:
    """A labelled image data set: `split_tensors(split)` -> (images [N, C, S, S] in [-1, 1], labels [N]) of 'train'
    (what the feature network trains on) and 'validation' (the held-out images metrics compare with).

    reference:  the data module's {"class_path", "init_args"} (data.reference.datamodule_reference); None or a
                DigitsDataModule reference: the embedded digits.
    datamodule: an already built data module of that reference (a running fit's), read instead of building one.
    """

    def __init__(self, reference: dict | None = None, datamodule: Any = None):
        self.reference, self._datamodule = reference, datamodule
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}
        self._digest: str | None = None

    @property
    def is_digits(self) -> bool:
        return self.reference is None or self.reference.get("class_path") == DIGITS_CLASS_PATH

    @property
    def name(self) -> str:
        """What the data is, in messages and reports."""
        if self.is_digits:
            return "the embedded digits (1x8x8, 10 classes)"
        from data.reference import describe_reference

        c, s, _ = self.shape
        return f"{describe_reference(self.reference)} ({c}x{s}x{s}, {self.num_classes} classes)"

    @property
    def datamodule(self) -> Any:
        if self._datamodule is None:
            from data.reference import build_datamodule

            self._datamodule = build_datamodule(self.reference)
        return self._datamodule

    def split_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """(images [N, C, S, S] float32 in [-1, 1], labels [N] int64) of `split`, read once."""
        if split not in self._splits:
            if self.is_digits:
                from data.digits import digits_tensors

                images, labels = digits_tensors(split)
            else:
                images, labels = self.datamodule.split_tensors(split)
            self._splits[split] = (images.float().contiguous(), labels.long().contiguous())
        return self._splits[split]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, S, S) of one image."""
        if self.is_digits:
            return (1, 8, 8)
        return (int(self.datamodule.channels), int(self.datamodule.image_size), int(self.datamodule.image_size))

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in range(10)] if self.is_digits else list(self.datamodule.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def digest(self) -> str:
        """sha256 of the images and labels of 'train' and 'validation' (float32 / int64 bytes, shapes) and the class
        names: the feature network's cache key, so a changed image, label, split, size or class retrains it."""
        if self._digest is None:
            h = hashlib.sha256(json.dumps(self.class_names).encode())
            for split in ("train", "validation"):
                for t in self.split_tensors(split):
                    h.update(f"{split}:{t.dtype}:{tuple(t.shape)};".encode())
                    h.update(t.numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest


_DATA: dict[str, LabelledData] = {}  # one per reference and process: each data set is read and hashed once


def labelled_data(reference: dict | None = None, datamodule: Any = None) -> LabelledData:
    """The LabelledData of a reference (None: the digits), shared within the process."""
    key = json.dumps(reference, sort_keys=True) if reference is not None and reference.get("class_path") != \
        DIGITS_CLASS_PATH else "digits"
    if key not in _DATA:
        _DATA[key] = LabelledData(None if key == "digits" else reference, datamodule)
    return _DATA[key]


def data_of(module: Any) -> LabelledData:
    """The labelled data set a method module was trained on: the data reference its checkpoint records (`module.
    data_reference`, train.methods.data_record), else, for a 1x8x8 model of 10 classes (checkpoints written before
    the record, modules built in Python), the digits. Anything else is a ValueError saying what to do."""
    reference = getattr(module, "data_reference", None)
    if reference:
        return labelled_data(reference)
    classes = module.conditioner.enumerate()
    if tuple(module.sample_shape()) == (1, 8, 8) and classes is not None and len(classes) == 10:
        return labelled_data(None)
    raise ValueError("this model records no labelled data set to evaluate it against (a checkpoint records the data "
                     "module it was fitted with, or its teacher's); fit it with `python -m train fit` and a labelled "
                     "data module (data.images.LabelledImageDataModule)")


def check_generates(module: Any, data: LabelledData) -> None:
    """Refuse, before anything is sampled, a model whose images the data's feature network cannot take: one line
    naming both shapes (a latent model's decoded size is only known after decoding, and is checked then)."""
    if module.vae_folder is not None:
        return
    c, s, _ = data.shape
    mc, mh, mw = module.sample_shape()
    if (mc, mh, mw) != (c, s, s):
        raise ValueError(f"the evaluation network takes {c}x{s}x{s} images ({data.name}), the model generates "
                         f"{mc}x{mh}x{mw} ones; evaluate the model with the data it was trained on")
    classes = module.conditioner.enumerate()
    if classes is not None and len(classes) > data.num_classes:
        raise ValueError(f"the model has {len(classes)} classes but its data ({data.name}) has {data.num_classes}; "
                         f"evaluate the model with the data it was trained on")
