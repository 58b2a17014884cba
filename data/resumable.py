"""A training DataLoader whose order is fixed by (seed, epoch) and that resumes mid-epoch from its state_dict."""
from __future__ import annotations

import itertools
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """This process's share of an epoch's order (DistributedSampler: a permutation seeded by seed + epoch, or
    0..N-1 without shuffling, split across `num_replicas` processes), started at position `start` of that share.

    Being a DistributedSampler, it is used as is under DDP: Lightning injects no sampler of its own."""

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)


class ResumableLoader(DataLoader):
    """A DataLoader that knows how far it got: `state_dict()` is {seed, epoch, batches} (batches handed out in
    the current pass) and after `load_state_dict()` the next `iter()` continues from there. Lightning saves this
    state in checkpoints and loads it into the new loader when it resumes ("stateful dataloader").

    The order of pass e is a function of (seed, e) only, so an interrupted and resumed run sees the same batches
    as an uninterrupted one. Otherwise each `iter()` starts a new pass, as a DataLoader's does: the counters
    move on when a pass's last batch is handed out (Lightning never asks a sized loader for the one after), or
    when a pass cut short (limit_train_batches) is followed by a new `iter()`.

    dataset, batch_size, drop_last, num_workers: as DataLoader.
    shuffle:   a new permutation each pass (False: 0..N-1 every pass).
    seed:      the shuffling seed; default torch.initial_seed() (the `seed_everything` seed). It is part of the
               state, so a resumed run keeps the order even when it was started with another seed.
    num_replicas, rank: this process's share under distributed training (Trainer.distributed_sampler_kwargs).
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int | None = None,
                 drop_last: bool = False, num_workers: int = 0, num_replicas: int = 1, rank: int = 0):
        seed = torch.initial_seed() % 2**62 if seed is None else seed
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
                         sampler=ResumableSampler(dataset, shuffle, seed, num_replicas, rank),
                         persistent_workers=num_workers > 0)
        self.epoch = 0    # passes completed
        self.batches = 0  # batches handed out in the current pass
        self._resuming = False

    def __iter__(self) -> Iterator[Any]:
        if self.batches and not self._resuming:  # an unfinished pass is left behind: start the next one
            self.epoch, self.batches = self.epoch + 1, 0
        self._resuming = False
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.batches * self.batch_size
        total = len(self)
        for batch in super().__iter__():
            self.batches += 1
            if self.batches >= total:  # the pass is over once its last batch is out
                self.epoch, self.batches = self.epoch + 1, 0
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.sampler.seed, "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.seed, self.epoch, self.batches = int(state["seed"]), int(state["epoch"]), int(state["batches"])
        self._resuming = True


def replica_kwargs(trainer) -> dict[str, int]:
    """{num_replicas, rank} of a (possibly distributed) Lightning Trainer; {} without one or when not distributed."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    return {"num_replicas": kwargs["num_replicas"], "rank": kwargs["rank"]} if kwargs else {}


def training_loader(data, batch_size: int, num_workers: int, trainer) -> ResumableLoader:
    """The training loader of every data module: shuffled, resumable mid-epoch, this process's share under
    distributed training; a batch larger than the whole set keeps the set as one batch instead of dropping it."""
    return ResumableLoader(data, batch_size, shuffle=True, num_workers=num_workers,
                           drop_last=len(data) >= batch_size, **replica_kwargs(trainer))
