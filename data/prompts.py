"""Prompt sets for data-free distillation and erasure: prompts read from a text file, CSV, JSON lines,
parquet, a save_to_disk folder or a datasets name, served as batches of strings by a LightningDataModule."""
from __future__ import annotations

import csv
import json
import os

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from data.resumable import ResumableLoader, training_loader

PROMPT_SOURCES = ("a .txt file (one prompt per line), a .csv/.tsv, .jsonl or .parquet file with a prompt column, "
                  "a .json list, a folder written by save_to_disk, or a datasets name")
PROMPT_COLUMNS = ("prompt", "text", "caption", "Prompt")  # tried in order when no column is given


def _pick_column(columns, column: str | None, path: str) -> str:
    if column is not None:
        if column not in columns:
            raise ValueError(f"{path} has no column {column!r}; its columns are {', '.join(map(str, columns))}")
        return column
    for c in PROMPT_COLUMNS:
        if c in columns:
            return c
    raise ValueError(f"{path} has none of the prompt columns {', '.join(PROMPT_COLUMNS)}; its columns are "
                     f"{', '.join(map(str, columns))}: set `column` to the one holding the prompts")


def _from_table(rows: list[dict], column: str | None, path: str) -> list:
    if not rows:
        return []
    col = _pick_column(list(rows[0]), column, path)
    missing = [i for i, r in enumerate(rows) if col not in r]
    if missing:
        raise ValueError(f"{path}: row {missing[0] + 1} has no {col!r} field")
    return [r[col] for r in rows]


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {n}: not valid JSON ({err.msg}); a .jsonl file holds one JSON object per line") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object such as {{\"prompt\": \"...\"}}, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_dataset(ds, column: str | None, path: str, split: str) -> list:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} has splits {', '.join(ds)}, not {split!r}; set `split`")
        ds = ds[split]
    return list(ds[_pick_column(ds.column_names, column, path)])


def read_prompts(path: str, column: str | None = None, split: str = "train") -> list[str]:
    """The prompts of a source, in file order, stripped, blank ones dropped.

    path:   .txt (one prompt per line), .csv / .tsv (header row), .jsonl (one object per line), .json (a list
            of strings or of objects), .parquet, a folder written by save_to_disk, or a datasets name (the
            only case that may use the network; with HF_HUB_OFFLINE=1 it reads the datasets cache).
    column: the field holding the prompt in tables; default the first of prompt, text, caption, Prompt.
    split:  the split to read from a DatasetDict.
    """
    local = os.path.expanduser(path)
    ext = os.path.splitext(local)[1].lower()
    if os.path.isfile(local):
        if ext in (".txt", ".prompts", ""):
            with open(local, encoding="utf-8") as f:
                values = f.read().splitlines()
        elif ext in (".csv", ".tsv"):
            with open(local, encoding="utf-8", newline="") as f:
                values = _from_table(list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")), column, path)
        elif ext == ".jsonl":
            values = _from_table(_read_jsonl(local), column, path)
        elif ext == ".json":
            with open(local, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, list):
                raise ValueError(f"{path}: a .json prompt file holds a list (of strings or objects), got {type(data).__name__}")
            values = data if all(isinstance(d, str) for d in data) else _from_table(data, column, path)
        elif ext == ".parquet":
            import datasets

            values = _read_dataset(datasets.Dataset.from_parquet(local), column, path, split)
        else:
            raise ValueError(f"unsupported prompt file {path!r} (extension {ext!r}); give {PROMPT_SOURCES}")
    elif os.path.isdir(local):
        import datasets

        try:
            ds = datasets.load_from_disk(local)
        except FileNotFoundError as err:
            raise ValueError(f"{path} is a folder but not one written by save_to_disk; give {PROMPT_SOURCES}") from err
        values = _read_dataset(ds, column, path, split)
    else:
        import datasets

        try:
            ds = datasets.load_dataset(path)
        except Exception as err:  # not found, offline, gated: all mean "no such dataset here"
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise FileNotFoundError(f"prompt source {path!r} does not exist and datasets.load_dataset failed "
                                    f"({reason}); give {PROMPT_SOURCES}") from err
        values = _read_dataset(ds, column, path, split)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{path}: prompts must be strings, found {type(bad[0]).__name__} {bad[0]!r}")
    prompts = [v.strip() for v in values if v.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


class Prompts(Dataset):
    """A list of prompt strings as a map-style dataset (item: str; a DataLoader batch: list[str])."""

    def __init__(self, prompts: list[str]):
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[int(index)]


class PromptDataModule(L.LightningDataModule):
    """Batches of (None, prompts list[str] of length batch_size) for data-free distillation and erasure: no real
    samples (None stands where image data modules give images), prompts the method encodes.

    path:       see read_prompts (text file, CSV, JSON lines, parquet, save_to_disk folder, datasets name).
    column:     the prompt column of tables (default: prompt, text, caption or Prompt).
    batch_size: prompts per step (per process).
    val_size:   prompts held out (chosen by `seed`) for validation grids; 0 keeps all for training and
                validates on the first training prompts.
    seed:       seed of the held-out choice (the training order follows the run's seed, resumably).
    split:      the split read from a DatasetDict source.
    """

    has_images = False  # prompts only: no real samples (e.g. for a discriminator)

    def __init__(self, path: str, column: str | None = None, batch_size: int = 8, val_size: int = 8, seed: int = 0,
                 split: str = "train", num_workers: int = 0):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if val_size < 0:
            raise ValueError(f"val_size must be 0 or more, got {val_size}")
        self.path, self.column, self.split = path, column, split
        self.batch_size, self.val_size, self.seed, self.num_workers = batch_size, val_size, seed, num_workers
        self._sets: dict[str, Prompts] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._sets:
            return
        prompts = read_prompts(self.path, self.column, self.split)
        if self.val_size >= len(prompts):
            raise ValueError(f"{self.path} holds {len(prompts)} prompts, not more than val_size={self.val_size}; "
                             f"lower val_size (0 validates on training prompts)")
        order = np.random.default_rng(self.seed).permutation(len(prompts))
        val = sorted(order[:self.val_size].tolist())
        train = sorted(order[self.val_size:].tolist())
        self._sets = {"train": Prompts([prompts[i] for i in train]),
                      "validation": Prompts([prompts[i] for i in val] if val else prompts[:self.batch_size])}

    @property
    def train_prompts(self) -> list[str]:
        self.setup()
        return self._sets["train"].prompts

    @property
    def val_prompts(self) -> list[str]:
        self.setup()
        return self._sets["validation"].prompts

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled prompt batches, order fixed by (seed, epoch), resumable mid-epoch."""
        self.setup()
        data = self._sets["train"]
        return training_loader(data, self.batch_size, self.num_workers, self.trainer)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._sets["validation"], batch_size=self.batch_size, num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return None, list(batch)
