"""Prompt sets for data-free distillation, erasure and evaluation: prompts read from a text file, CSV, JSON lines,
parquet, a save_to_disk folder or a datasets name (with the seeds, guidance scales and categories of benchmark files
such as I2P and COCO-30k), served as batches of strings by a LightningDataModule."""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from data.resumable import ResumableLoader, training_loader

PROMPT_SOURCES = ("a .txt file (one prompt per line), a .csv/.tsv, .jsonl or .parquet file with a prompt column, "
                  "a .json list, a folder written by save_to_disk, or a datasets name")
PROMPT_COLUMNS = ("prompt", "text", "caption", "Prompt")  # tried in order when no column is given


SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")  # the erasure repos' I2P / COCO-30k CSVs, I2P's own, generic
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance_scale", "guidance")
CATEGORY_COLUMN = "categories"  # I2P: "sexual", "violence, self-harm", ...


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a source, with what benchmark prompt files add: the seed and classifier-free guidance scale it is
    evaluated with (I2P's sd_seed / sd_guidance_scale, Schramowski et al. 2023, arXiv 2211.05105; the
    evaluation_seed / evaluation_guidance of the I2P and COCO-30k CSVs that ESD, UCE and MACE ship) and its I2P
    categories (None: the source has no categories column)."""

    prompt: str
    seed: int | None = None
    guidance: float | None = None
    categories: tuple[str, ...] | None = None


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


def _settings_columns(columns) -> tuple[str | None, str | None, str | None]:
    """The (seed, guidance, categories) columns among `columns`: the first of each kind, None where there is none."""
    def first(names):
        return next((c for c in names if c in columns), None)

    return first(SEED_COLUMNS), first(GUIDANCE_COLUMNS), first((CATEGORY_COLUMN,))


def _read_dataset(ds, column: str | None, path: str, split: str) -> list[dict]:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} has splits {', '.join(ds)}, not {split!r}; set `split`")
        ds = ds[split]
    col = _pick_column(ds.column_names, column, path)
    extra = [c for c in _settings_columns(ds.column_names) if c is not None]
    return ds.select_columns(list(dict.fromkeys([col, *extra]))).to_list()


def _records(path: str, column: str | None, split: str) -> list:
    """The source's records in order: strings (a text file, a .json list of strings) or dicts (tables)."""
    local = os.path.expanduser(path)
    ext = os.path.splitext(local)[1].lower()
    if os.path.isfile(local):
        if ext in (".txt", ".prompts", ""):
            with open(local, encoding="utf-8") as f:
                return f.read().splitlines()
        if ext in (".csv", ".tsv"):
            with open(local, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
        if ext == ".jsonl":
            return _read_jsonl(local)
        if ext == ".json":
            with open(local, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, list):
                raise ValueError(f"{path}: a .json prompt file holds a list (of strings or objects), got {type(data).__name__}")
            return data
        if ext == ".parquet":
            import datasets

            return _read_dataset(datasets.Dataset.from_parquet(local), column, path, split)
        raise ValueError(f"unsupported prompt file {path!r} (extension {ext!r}); give {PROMPT_SOURCES}")
    import datasets

    if os.path.isdir(local):
        try:
            ds = datasets.load_from_disk(local)
        except FileNotFoundError as err:
            raise ValueError(f"{path} is a folder but not one written by save_to_disk; give {PROMPT_SOURCES}") from err
        return _read_dataset(ds, column, path, split)
    try:
        ds = datasets.load_dataset(path)
    except Exception as err:  # not found, offline, gated: all mean "no such dataset here"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FileNotFoundError(f"prompt source {path!r} does not exist and datasets.load_dataset failed "
                                f"({reason}); give {PROMPT_SOURCES}") from err
    return _read_dataset(ds, column, path, split)


def _number(value, kind: type, where: str):
    """A seed (kind int) or guidance scale (float) cell as that number; None for an empty or NaN cell."""
    if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or (kind is int and not number.is_integer()):
        raise ValueError(f"{where} is {value!r}, not {'a number' if kind is float else 'an integer seed'}")
    if kind is float:
        return number
    digits = str(value).strip()
    return int(digits) if digits.lstrip("+-").isdigit() else int(number)  # exact for any integer written as one


def read_prompt_rows(path: str, column: str | None = None, split: str = "train") -> list[PromptRow]:
    """The prompts of a source, in file order, stripped, blank ones dropped, each with its seed, guidance scale and
    categories where the source has those columns (SEED_COLUMNS, GUIDANCE_COLUMNS, CATEGORY_COLUMN: the I2P CSV as
    published or as the erasure repositories ship it, their COCO-30k CSV with image_id/case_number, prompt,
    evaluation_seed).

    path:   .txt (one prompt per line), .csv / .tsv (header row), .jsonl (one object per line), .json (a list
            of strings or of objects), .parquet, a folder written by save_to_disk, or a datasets name (the
            only case that may use the network; with HF_HUB_OFFLINE=1 it reads the datasets cache).
    column: the field holding the prompt in tables; default the first of prompt, text, caption, Prompt.
    split:  the split to read from a DatasetDict.
    """
    records = _records(path, column, split)
    tables = [r for r in records if isinstance(r, dict)]
    if tables and len(tables) != len(records):
        raise ValueError(f"{path}: a .json prompt file holds strings or objects, not both")
    seed_col = guidance_col = category_col = None
    if not tables:
        rows = [(v, {}) for v in records]
    else:
        col = _pick_column(list(tables[0]), column, path)
        missing = [i for i, r in enumerate(tables) if col not in r]
        if missing:
            raise ValueError(f"{path}: row {missing[0] + 1} has no {col!r} field")
        rows = [(r[col], r) for r in tables]
        seed_col, guidance_col, category_col = _settings_columns(list(tables[0]))
    bad = [v for v, _ in rows if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{path}: prompts must be strings, found {type(bad[0]).__name__} {bad[0]!r}")
    out = []
    for n, (text, record) in enumerate(rows, 1):
        if not text.strip():
            continue
        where = f"{path}, row {n}"
        seed = _number(record.get(seed_col), int, f"{where}: {seed_col}") if seed_col else None
        guidance = _number(record.get(guidance_col), float, f"{where}: {guidance_col}") if guidance_col else None
        categories = None
        if category_col:
            cell = record.get(category_col)
            cell = ", ".join(map(str, cell)) if isinstance(cell, (list, tuple)) else str(cell or "")
            categories = tuple(c.strip() for c in cell.split(",") if c.strip())
        out.append(PromptRow(text.strip(), seed, guidance, categories))
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def read_prompts(path: str, column: str | None = None, split: str = "train") -> list[str]:
    """The prompts of a source (read_prompt_rows), as strings."""
    return [r.prompt for r in read_prompt_rows(path, column, split)]


def select_prompt_rows(rows: list[PromptRow], categories: list[str] | None = None, max_prompts: int | None = None,
                       source: str = "the prompt file") -> list[PromptRow]:
    """The rows in any of `categories` (case-insensitive; I2P's categories column), then the first `max_prompts`."""
    if categories:
        if any(r.categories is None for r in rows):
            raise ValueError(f"--prompt-categories needs a prompt file with a {CATEGORY_COLUMN!r} column (the I2P "
                             f"CSV); {source} has none")
        wanted = {c.strip().lower() for c in categories}
        kept = [r for r in rows if wanted & {c.lower() for c in r.categories}]
        if not kept:
            present = sorted({c for r in rows for c in r.categories})
            raise ValueError(f"no prompt of {source} is in the categories {', '.join(sorted(wanted))}; its "
                             f"categories are {', '.join(present) or 'none'}")
        rows = kept
    if max_prompts is not None:
        if max_prompts <= 0:
            raise ValueError(f"--max-prompts must be positive, got {max_prompts}")
        rows = rows[:max_prompts]
    return rows


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
