"""Labelled real images (an image folder, a save_to_disk folder or a datasets name) as a LightningDataModule."""
from __future__ import annotations

import os
import re

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from data.resumable import ResumableLoader, training_loader

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".pnm", ".ppm", ".tif", ".tiff", ".webp")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                 "dev": "validation", "test": "test"}  # folder or split name -> the split it is used as
SOURCES = "give an image folder with one subfolder per class, a save_to_disk folder, or a datasets name"
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # 'cifar10', 'uoft-cs/cifar10'
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def image_to_tensor(image: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    """One PIL image as float32 [channels, image_size, image_size] in [-1, 1].

    The image becomes grey ('L', channels=1) or 'RGB' (channels=3): transparent pixels are laid on
    white and 16-bit grey is scaled to 8 bits first. It is resized (bicubic, antialiased) so that its
    shorter side is image_size and center-cropped to a square; 0..255 maps linearly onto [-1, 1].
    """
    mode = "L" if channels == 1 else "RGB"
    if image.mode in _SIXTEEN_BIT:  # PIL's own convert('L') would clip 16-bit values at 255
        image = Image.fromarray(np.rint(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8), "L")
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    if image.mode != mode:
        image = image.convert(mode)
    image = ImageOps.fit(image, (image_size, image_size), Image.Resampling.BICUBIC)  # shorter side, center crop
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)) / 127.5 - 1.0  # [S, S] or [S, S, 3]
    return pixels[None] if channels == 1 else pixels.permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Sources: what `path` names, read into datasets.Dataset / DatasetDict with images not yet decoded.

def _subfolders(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: str) -> list[str]:
    """Every image file under folder, at any depth, in a fixed (sorted, depth-first) order."""
    found = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(names)
                  if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    return found


def _class_folders(folder: str, class_names: list[str]):
    """A datasets.Dataset of (image path, class id) from folder/<class name>/**/<image>."""
    import datasets

    unknown = sorted(set(_subfolders(folder)) - set(class_names))
    if unknown:
        raise ValueError(f"{folder} has class folders {unknown} that the train split lacks; "
                         f"give every split the same class subfolders")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        if not os.path.isdir(os.path.join(folder, name)):
            continue  # a held-out split may miss a class
        files = _image_files(os.path.join(folder, name))
        if not files:
            raise ValueError(f"class folder {os.path.join(folder, name)} holds no images "
                             f"({' '.join(IMAGE_EXTENSIONS)}); add images to it or remove it")
        paths += files
        labels += [label] * len(files)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    return datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features)


def image_folder_dataset(root: str):
    """An ImageFolder layout as a datasets.Dataset with columns 'image' (decoded to PIL) and 'label' (ClassLabel).

    root/<class>/**/<image>: one subfolder per class, class ids = sorted subfolder names (hidden entries
    and non-image files are skipped). If root's subfolders are all split names (train, validation|valid|
    val|dev, test) including train, each holding class subfolders, the result is a DatasetDict with the
    class ids of train's subfolders. Files are listed directly (not through the 'imagefolder' builder), so
    nothing is written to the datasets cache and the class ids never depend on the builder's heuristics.
    """
    import datasets

    subfolders = _subfolders(root)
    if not subfolders:
        raise ValueError(f"image folder {root} has no class subfolders; put each class's images in its own subfolder")
    as_splits = ("train" in subfolders and all(s in SPLIT_ALIASES for s in subfolders)
                 and len({SPLIT_ALIASES[s] for s in subfolders}) == len(subfolders)
                 and all(_subfolders(os.path.join(root, s)) for s in subfolders))
    if not as_splits:
        return _class_folders(root, subfolders)
    class_names = _subfolders(os.path.join(root, "train"))
    return datasets.DatasetDict({SPLIT_ALIASES[s]: _class_folders(os.path.join(root, s), class_names)
                                 for s in subfolders})


def missing_path(path: str) -> bool:
    """True when `path` is neither a local file or folder nor shaped like a datasets name ('name', 'owner/name')."""
    return not os.path.exists(os.path.expanduser(path)) and not _HUB_NAME.fullmatch(path)


def load_source(path: str):
    """The labelled images behind `path` as a datasets.Dataset or DatasetDict, images not yet decoded.

    In order: a folder written by save_to_disk (load_from_disk); a folder holding parquet files, such as
    a cloned Hub repository (load_dataset on the folder, offline); any other folder (image_folder_dataset);
    otherwise a datasets name (load_dataset(path): the only case that may use the network; it downloads
    into the datasets cache once, and with HF_HUB_OFFLINE=1 it reads that cache without the network).
    """
    import datasets

    local = os.path.expanduser(path)
    if os.path.isdir(local):
        if any(os.path.isfile(os.path.join(local, f)) for f in ("dataset_dict.json", "state.json")):
            try:
                return datasets.load_from_disk(local)
            except IndexError as err:  # datasets cannot read back a split saved with no rows
                raise ValueError(f"dataset {path} holds an empty split (saved with no rows); "
                                 f"give a dataset with images in every split") from err
        if any(f.endswith(".parquet") for _, _, files in os.walk(local) for f in files):
            return datasets.load_dataset(local)
        return image_folder_dataset(local)
    if os.path.exists(local):
        raise ValueError(f"dataset path {path} is a file, not a folder; {SOURCES}")
    if missing_path(path):
        raise FileNotFoundError(f"dataset path {path} does not exist; {SOURCES}")
    try:
        return datasets.load_dataset(path)
    except Exception as err:  # not found on the Hub, offline, gated: all mean "no such dataset here"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FileNotFoundError(f"dataset path {path} does not exist and datasets.load_dataset({path!r}) failed "
                                f"({reason}); {SOURCES}") from err


def unreadable_images(rows, column: str, progress: bool = True) -> list[tuple[int, str]]:
    """(row index, name) of every image in `rows` (a datasets.Dataset) that does not open as an image: a truncated
    or corrupt file, a non-image with an image extension. Images are checked without decoding them in full
    (PIL's verify), with a progress bar for large sets."""
    import io

    import datasets
    from tqdm.auto import tqdm

    raw = rows.cast_column(column, datasets.Image(decode=False)) if isinstance(rows.features[column], datasets.Image) \
        else rows
    bad = []
    for i in tqdm(range(len(raw)), desc="checking images", disable=not progress or len(raw) < 2000, leave=False):
        item = raw[i][column]
        name = (item.get("path") or f"row {i}") if isinstance(item, dict) else str(item)
        try:
            source = io.BytesIO(item["bytes"]) if isinstance(item, dict) and item.get("bytes") else (
                item["path"] if isinstance(item, dict) else item)
            with Image.open(source) as image:
                image.verify()
        except Exception:  # any failure to open or verify means the image cannot be trained on
            bad.append((i, name))
    return bad


def readable_rows(rows, column: str, where: str, skip_bad_images: bool):
    """`rows` whose images all open; bad ones are named in a ValueError, or left out (with a warning naming them)
    when skip_bad_images."""
    import warnings

    bad = unreadable_images(rows, column)
    if not bad:
        return rows
    names = ", ".join(n for _, n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    if not skip_bad_images:
        raise ValueError(f"{len(bad)} image(s) of {where} do not open (corrupt, truncated or not images): {names}; "
                         f"fix or remove them, or set the data's skip_bad_images: true to leave them out")
    warnings.warn(f"leaving out {len(bad)} image(s) of {where} that do not open: {names}")
    keep = sorted(set(range(len(rows))) - {i for i, _ in bad})
    if not keep:
        raise ValueError(f"no image of {where} opens; give readable images")
    return rows.select(keep)


# ----------------------------------------------------------------------------------------------------------

def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), both sorted: round(val_fraction * N) images (at least 1, at most
    N - 1) held out, each class in proportion to its size, chosen by a seeded permutation of each class.

    labels: [N] int class ids. Each image's key is (its rank in its class's permutation + 1/2) / class
    size; the validation split is the images with the smallest keys (ties broken by the same generator).
    """
    n = len(labels)
    n_val = min(max(round(val_fraction * n), 1), n - 1)
    rng = np.random.default_rng(seed)
    key = np.empty(n)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        key[members] = (np.arange(len(members)) + 0.5) / len(members)
    order = np.lexsort((rng.random(n), key))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class LabelledImages(torch.utils.data.Dataset):
    """(image [C, S, S] float32 in [-1, 1], label int64 scalar) per index of a datasets.Dataset."""

    def __init__(self, rows, image_size: int, channels: int, image_column: str, label_column: str):
        self.rows, self.image_size, self.channels = rows, image_size, channels
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[int(index)]
        image = image_to_tensor(row[self.image_column], self.image_size, self.channels)
        return image, torch.tensor(row[self.label_column], dtype=torch.int64)


class LabelledImageDataModule(L.LightningDataModule):
    """Batches of (image [B, C, S, S] float32 in [-1, 1], label [B] int64) from real labelled images.

    path:          an image folder (one subfolder per class, see image_folder_dataset), a folder written by
                   Dataset/DatasetDict.save_to_disk, or a datasets name such as 'uoft-cs/cifar10' (only
                   this case may use the network: prepare_data downloads it into the datasets cache).
    image_size:    S; images are resized so that their shorter side is S, then center-cropped.
    channels:      C; 1 converts to grey ('L'), 3 to 'RGB'.
    batch_size:    images per step (per process).
    num_workers:   DataLoader workers decoding images.
    val_fraction:  share of 'train' held out for validation when the source has no validation split
                   (stratified by class, fixed by seed); ignored when it has one.
    image_column:  the column holding images (datasets.Image, or file paths).
    label_column:  the column holding labels (ClassLabel, int class ids, or class-name strings, which
                   become ids in sorted order).
    seed:          seed of the validation split.
    skip_bad_images: every image is checked to open when the data is set up; a bad one is an error naming it,
                   or (true) is left out with a warning.

    Splits: 'train', 'validation' (a source's 'validation', 'valid', 'val' or 'dev'), and 'test' when the
    source has one (test_dataloader). num_classes and class_names load the source on first use.
    """

    def __init__(self, path: str, image_size: int, channels: int = 3, batch_size: int = 64, num_workers: int = 0,
                 val_fraction: float = 0.05, image_column: str = "image", label_column: str = "label", seed: int = 0,
                 skip_bad_images: bool = False):
        super().__init__()
        if image_size <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1 (e.g. 0.05), got {val_fraction}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 (load in the main process) or more, got {num_workers}")
        if missing_path(path):
            raise FileNotFoundError(f"dataset path {path} does not exist; {SOURCES}")
        self.save_hyperparameters()
        self.path, self.image_size, self.channels = path, image_size, channels
        self.batch_size, self.num_workers, self.val_fraction, self.seed = batch_size, num_workers, val_fraction, seed
        self.image_column, self.label_column, self.skip_bad_images = image_column, label_column, skip_bad_images
        self.sets: dict[str, LabelledImages] = {}
        self._class_names: list[str] = []

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self._class_names)

    @property
    def class_names(self) -> list[str]:
        self.setup()
        return list(self._class_names)

    def prepare_data(self) -> None:
        self.setup()  # downloads a datasets name once, on one process per node

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        splits = self._splits()
        self._class_names = self._encode_labels(splits)
        if "validation" not in splits:
            labels = np.asarray(splits["train"][self.label_column])
            if len(labels) < 2:
                raise ValueError(f"dataset {self.path} has {len(labels)} image(s); at least 2 are needed "
                                 f"to hold out a validation split")
            train_idx, val_idx = stratified_split(labels, self.val_fraction, self.seed)
            splits["train"], splits["validation"] = splits["train"].select(train_idx), splits["train"].select(val_idx)
        self.sets = {name: LabelledImages(rows, self.image_size, self.channels, self.image_column, self.label_column)
                     for name, rows in splits.items()}

    def _splits(self) -> dict:
        """The source's splits as {'train', 'validation'?, 'test'?: datasets.Dataset} with checked columns."""
        import datasets

        source = load_source(self.path)
        if isinstance(source, datasets.Dataset):
            source = datasets.DatasetDict({"train": source})
        splits = {}
        for name in source:
            if name in SPLIT_ALIASES and SPLIT_ALIASES[name] not in splits:
                splits[SPLIT_ALIASES[name]] = source[name]
        if "train" not in splits:
            if len(source) != 1:
                raise ValueError(f"dataset {self.path} has splits {list(source)} but none named 'train'; "
                                 f"name the split to train on 'train'")
            splits = {"train": next(iter(source.values()))}  # a lone split, whatever its name, is the train split
        for name, rows in splits.items():
            for column, argument in ((self.image_column, "image_column"), (self.label_column, "label_column")):
                if column not in rows.column_names:
                    raise ValueError(f"split '{name}' of {self.path} has no column {column!r}; available columns: "
                                     f"{rows.column_names}; pass {argument}= naming one of them")
            if len(rows) == 0:
                raise ValueError(f"split '{name}' of {self.path} is empty; give a dataset with images in it")
            rows = rows.select_columns([self.image_column, self.label_column])
            feature = rows.features[self.image_column]
            if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
                rows = rows.cast_column(self.image_column, datasets.Image())  # file paths
            elif not isinstance(feature, datasets.Image):
                raise ValueError(f"column {self.image_column!r} of {self.path} holds {feature}, not images; "
                                 f"pass image_column= naming the image column, or cast it with datasets.Image()")
            elif not feature.decode:
                rows = rows.cast_column(self.image_column, datasets.Image())
            splits[name] = readable_rows(rows, self.image_column, f"split '{name}' of {self.path}",
                                         self.skip_bad_images)
        return splits

    def _encode_labels(self, splits: dict) -> list[str]:
        """Class names; string labels become ClassLabel ids (sorted names) in every split, in place."""
        import datasets

        column = self.label_column
        feature = splits["train"].features[column]
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
        dtype = getattr(feature, "dtype", None)
        if dtype in ("string", "large_string"):
            names = sorted(set().union(*(rows.unique(column) for rows in splits.values())))
            for name, rows in splits.items():
                splits[name] = rows.cast_column(column, datasets.ClassLabel(names=names))
            return names
        if dtype is not None and ("int" in dtype):
            values = np.concatenate([np.asarray(rows.unique(column)) for rows in splits.values()])
            if values.min() < 0:
                raise ValueError(f"label column {column!r} of {self.path} holds negative ids ({values.min()}); "
                                 f"labels must be class ids 0..K-1")
            return [str(c) for c in range(int(values.max()) + 1)]
        raise ValueError(f"label column {column!r} of {self.path} holds {feature}; it must hold class ids "
                         f"(ClassLabel or integers) or class names (strings); pass label_column= naming such a column")

    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [N, C, S, S] in [-1, 1], labels [N] int64) of a whole split ('train', 'validation', 'test'), decoded
        in order (what evaluation reads: its feature network trains on 'train' and compares with 'validation')."""
        self.setup()
        if split not in self.sets:
            raise ValueError(f"dataset {self.path} has no {split!r} split; it has {sorted(self.sets)}")
        images, labels = [], []
        for x, y in DataLoader(self.sets[split], batch_size=256, num_workers=self.num_workers):
            images.append(x)
            labels.append(y)
        return torch.cat(images), torch.cat(labels)

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        return DataLoader(self.sets[split], batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled batches in an order fixed by (seed, epoch) that a resumed run continues mid-epoch."""
        self.setup()
        data = self.sets["train"]
        return training_loader(data, self.batch_size, self.num_workers, self.trainer)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        self.setup()
        if "test" not in self.sets:
            raise ValueError(f"dataset {self.path} has no 'test' split; give one (a 'test' split or subfolder) "
                             f"or evaluate on val_dataloader()")
        return self._loader("test")
