"""The resumable training order (data/sampling.py): rank split, epochs, shuffling, skipping."""

import pytest
from torch.utils.data import Dataset

from {{cookiecutter.package}}.data.sampling import EpochSampler


class Items(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, g: int) -> int:
        return g


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_share_an_epoch_without_overlap_in_whole_batches(shuffle):
    ranks = [list(EpochSampler(Items(100), 2, r, batch_size=4, shuffle=shuffle, seed=7)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 48  # 50 per rank, cut to whole batches of 4
    assert not set(ranks[0]) & set(ranks[1])
    assert all(0 <= g < 100 for g in ranks[0] + ranks[1])
    if not shuffle:  # in order, in strides: global batch 0 is items 0..7 on two ranks
        assert ranks[0][:4] == [0, 2, 4, 6] and ranks[1][:4] == [1, 3, 5, 7]


def test_shuffled_epochs_differ_and_repeat_with_the_seed():
    def epoch(e: int, seed: int = 7) -> list[int]:
        sampler = EpochSampler(Items(100), 1, 0, batch_size=10, shuffle=True, seed=seed)
        sampler.set_epoch(e)
        return list(sampler)

    first, second = epoch(0), epoch(1)
    assert sorted(first) == list(range(100)) and first != list(range(100))
    assert sorted(g - 100 for g in second) == list(range(100))  # epoch 1: ids 100..199, item g % 100
    assert [g - 100 for g in second] != first  # a new order every epoch ...
    assert epoch(1) == second and epoch(1, seed=8) != second  # ... fixed by (seed, epoch)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_resumed_epoch_skips_exactly_the_batches_already_trained(shuffle):
    full = EpochSampler(Items(100), 2, 0, batch_size=4, shuffle=shuffle)
    full.set_epoch(1)
    resumed = EpochSampler(Items(100), 2, 0, batch_size=4, shuffle=shuffle)
    resumed.set_epoch(1)
    resumed.resume_epoch, resumed.skip = 1, 3
    assert list(resumed) == list(full)[12:]
    resumed.set_epoch(2)  # the next epoch is whole again
    full.set_epoch(2)
    assert list(resumed) == list(full)
