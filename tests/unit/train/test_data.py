"""How the training data is shared out: each process's share of a global batch, and epochs of batches
of one latent shape."""

import math

import pytest

from cogtune.train.data import epoch_batches, rank_share


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_rank_shares_split_a_full_global_batch_in_order(processes):
    batch = list(range(10, 10 + 2 * processes))
    shares = [rank_share(batch, 2, processes, rank) for rank in range(processes)]
    assert sum((share.indices for share in shares), []) == batch
    assert all(share.real == 2 and share.total == len(batch) for share in shares)


@pytest.mark.parametrize("processes", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [[7], [7, 8, 9], [7, 8, 9, 10, 11]])
def test_a_short_global_batch_counts_each_sample_once_whatever_the_process_count(processes, batch):
    """Every process gets batch_size rows of the batch's shape (repeats fill a short batch), and the
    real rows, taken in order across processes, are the batch itself, each once: the loss weights
    (1 for real rows, 0 for repeats, divided by total / processes) then average to the batch's mean."""
    size = max(1, math.ceil(len(batch) / processes))
    shares = [rank_share(batch, size, processes, rank) for rank in range(processes)]
    assert all(len(share.indices) == (len(batch) if processes == 1 else size) for share in shares)
    assert sum((share.indices[:share.real] for share in shares), []) == batch
    assert all(set(share.indices) <= set(batch) and share.total == len(batch) for share in shares)
    losses = {index: float(index) ** 2 for index in batch}  # any per-sample losses
    per_process = [sum(losses[i] for i in share.indices[:share.real]) / (share.total / processes) for share in shares]
    assert sum(per_process) / processes == pytest.approx(sum(losses.values()) / len(batch))


def test_epoch_batches_hold_one_shape_and_every_sample_once():
    shapes = [(4, 3, 4, 8)] * 5 + [(4, 2, 4, 8)] * 3
    batches = epoch_batches(shapes, 2, seed=1, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(8))
    assert all(len({shapes[i] for i in batch}) == 1 for batch in batches)
    assert epoch_batches(shapes, 2, seed=1, epoch=0) == batches != epoch_batches(shapes, 2, seed=1, epoch=1)
