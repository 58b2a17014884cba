"""ResumableLoader: an order fixed by (seed, epoch), a state_dict that resumes mid-epoch, one share per rank."""
from __future__ import annotations

import torch

from data.resumable import ResumableLoader, replica_kwargs

DATA = torch.arange(10)


def batches(loader) -> list[list[int]]:
    return [b.tolist() for b in loader]


def flat(loader) -> list[int]:
    return [i for b in batches(loader) for i in b]


def test_each_pass_is_a_new_permutation_fixed_by_the_seed():
    a, b = ResumableLoader(DATA, 3, seed=7), ResumableLoader(DATA, 3, seed=7)
    first, second = flat(a), flat(a)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert flat(b) == first and flat(b) == second
    assert flat(ResumableLoader(DATA, 3, seed=8)) != first
    assert flat(ResumableLoader(DATA, 3, shuffle=False)) == list(range(10))


def test_state_dict_resumes_mid_pass_and_after_the_last_batch():
    reference = ResumableLoader(DATA, 3, seed=1)
    passes = [batches(reference) for _ in range(2)]
    loader = ResumableLoader(DATA, 3, seed=1)
    it = iter(loader)
    assert [next(it).tolist() for _ in range(2)] == passes[0][:2]
    state = loader.state_dict()
    assert state == {"seed": 1, "epoch": 0, "batches": 2}
    resumed = ResumableLoader(DATA, 3, seed=99)  # another construction seed: the state's wins
    resumed.load_state_dict(state)
    assert batches(resumed) == passes[0][2:]
    assert resumed.state_dict() == {"seed": 1, "epoch": 1, "batches": 0}  # the pass ended with its last batch
    assert batches(resumed) == passes[1]


def test_a_pass_left_unfinished_is_not_repeated():
    reference = ResumableLoader(DATA, 2, seed=3)
    pass0, pass1 = flat(reference), flat(reference)
    loader = ResumableLoader(DATA, 2, seed=3)
    assert next(iter(loader)).tolist() == pass0[:2]
    assert flat(loader) == pass1  # a new iter() starts the next pass, as a DataLoader's does


def test_drop_last_and_length():
    loader = ResumableLoader(DATA, 4, seed=0, drop_last=True)
    assert len(loader) == 2 and [len(b) for b in loader] == [4, 4]


def test_ranks_share_each_pass_without_overlap():
    shares = [flat(ResumableLoader(DATA, 2, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5 and sorted(shares[0] + shares[1]) == list(range(10))


def test_default_seed_is_torchs_and_replica_kwargs():
    torch.manual_seed(1234)
    assert ResumableLoader(DATA, 2).state_dict()["seed"] == 1234
    assert replica_kwargs(None) == {}

    class Distributed:
        distributed_sampler_kwargs = {"num_replicas": 4, "rank": 2, "shuffle": True}

    assert replica_kwargs(Distributed()) == {"num_replicas": 4, "rank": 2}
