"""--save-images DIR: the images `evaluate` generates, one PNG each written as it is produced (atomically), and a manifest
that says what each one is (images.csv: its request, label, guidance scale and initial noise), in a folder that holds
nothing or an earlier save: an earlier save is replaced only with --overwrite-images, anything else never."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Sequence

from torch import Tensor

from train.evaluation.images import to_uint8

MANIFEST = "images.csv"
COLUMNS = ("file", "requests", "index", "request", "label", "w", "seed", "draw")
TMP_MARK = ".tmp-"


class ImageFolder:
    """The folder of --save-images: `claim` it before anything is sampled, then one `part` per set of images (a
    subfolder), whose `update` writes each image as <index>.png. The manifest lists every file before it is written, so
    a folder holding an images.csv of these columns is an earlier save (killed or finished) and nothing else is.

    root: the folder (missing, empty, or an earlier save); overwrite: replace an earlier save (its listed files and
    the subfolders they empty; anything else in the folder stays)."""

    def __init__(self, root: str | os.PathLike, overwrite: bool = False):
        self.root, self.overwrite = Path(root).expanduser(), overwrite
        self.records: list[dict] = []
        self.written = 0

    def claim(self) -> None:
        """Refuse a folder these images may not go to (one line saying what to pass), clear an earlier save with
        `overwrite`, and write the (empty) manifest that marks the folder as a save."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"--save-images {root} is a file; give a new or empty folder")
        if root.is_dir() and any(root.iterdir()):
            earlier = read_manifest(root)
            if earlier is None:
                raise FileExistsError(f"--save-images folder {root} holds files that are not an earlier --save-images "
                                      f"(no {MANIFEST} of one), so nothing there is replaced, even with "
                                      f"--overwrite-images; give a new or empty folder")
            if not self.overwrite:
                raise FileExistsError(f"--save-images folder {root} holds an earlier save ({len(earlier)} images listed "
                                      f"in its {MANIFEST}); pass --overwrite-images to replace it, or give a new or "
                                      f"empty folder")
            remove_save(root, earlier)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except (PermissionError, NotADirectoryError, FileExistsError) as e:
            raise PermissionError(f"cannot create --save-images folder {root} ({e.strerror or e}); give a folder you "
                                  f"can write") from None
        self._write_manifest()

    def part(self, name: str, records: Sequence[dict]) -> ImagePart:
        """A new subfolder `name` (name-2, name-3, ... when taken) for len(records) images, listed in the manifest
        first; records: each image's manifest columns but its file (train.evaluation.requests.saved_records)."""
        folder, k = self.root / name, 1
        while folder.exists():
            k += 1
            folder = self.root / f"{name}-{k}"
        folder.mkdir()
        width = max(5, len(str(len(records) - 1)))
        files = [folder / f"{i:0{width}d}.png" for i in range(len(records))]
        self.records += [{"file": f.relative_to(self.root).as_posix(), **r} for f, r in zip(files, records)]
        self._write_manifest()
        return ImagePart(self, files)

    def _write_manifest(self) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.records)
        write_atomically(self.root / MANIFEST, out.getvalue().encode("utf-8"))


class ImagePart:
    """The PNG files of one set of images (ImageFolder.part); update(index, images) writes images [B, C, H, W] in
    [-1, 1] (C = 1 or 3, quantised to 8 bits as the metrics read them: images.to_uint8) as files `index` [B]."""

    def __init__(self, folder: ImageFolder, files: list[Path]):
        self.folder, self.files = folder, files

    def update(self, index: Tensor, images: Tensor) -> None:
        from PIL import Image

        if images.shape[1] not in (1, 3):
            raise ValueError(f"--save-images writes 1- or 3-channel images, these have {images.shape[1]} channels")
        for i, pixels in zip(index.tolist(), to_uint8(images).cpu()):
            array = pixels.permute(1, 2, 0).numpy()
            png = io.BytesIO()
            Image.fromarray(array[..., 0] if len(pixels) == 1 else array).save(png, format="PNG")  # L or RGB
            write_atomically(self.files[i], png.getvalue(), replace=False)
        self.folder.written += len(index)


def write_atomically(path: Path, content: bytes, replace: bool = True) -> None:
    """Write `content` to a hidden file beside `path`, then rename it to `path`: a kill leaves the old file or the new
    one, never a truncated one. replace=False: an existing `path` is an error (FileExistsError), never replaced."""
    if not replace and path.exists():
        raise FileExistsError(f"{path} exists and is not replaced; give --save-images a new or empty folder")
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        tmp.write_bytes(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(root: Path) -> list[str] | None:
    """The files an earlier save in `root` lists, or None when root holds no manifest of a save (no images.csv, or
    one with other columns: the user's)."""
    try:
        with open(root / MANIFEST, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                return None
            return [row["file"] for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def remove_save(root: Path, files: Sequence[str]) -> None:
    """Remove an earlier save in `root`: the files its manifest lists (only within root), the half-written ones a
    killed save left beside them, the subfolders that leaves empty, and the manifest."""
    base = root.resolve()
    folders = set()
    for name in files:
        path = (root / name).resolve()
        if base not in path.parents:
            continue  # a manifest edited to point elsewhere: never followed
        path.unlink(missing_ok=True)
        folders.add(path.parent)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        for tmp in folder.glob(f".*.png{TMP_MARK}*"):
            tmp.unlink(missing_ok=True)
        while folder != base and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    (root / MANIFEST).unlink(missing_ok=True)
