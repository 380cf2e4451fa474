"""metapl.train: the data stream that makes runs resumable and shardable."""

import torch

from metapl.train import stream_indices


def test_stream_is_a_permutation_per_epoch_and_deterministic():
    n = 10
    stream = stream_indices(n, start=0, count=3 * n, seed=7)
    for epoch in stream.view(3, n):
        assert sorted(epoch.tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # each epoch its own order
    assert torch.equal(stream_indices(n, 0, 3 * n, seed=7), stream)
    assert not torch.equal(stream_indices(n, 0, 3 * n, seed=8), stream)


def test_any_window_of_the_stream_can_be_read_directly():
    n, seed = 7, 3
    whole = stream_indices(n, 0, 50, seed)
    for start, count in [(0, 1), (5, 4), (6, 9), (13, 21), (49, 1)]:
        assert torch.equal(stream_indices(n, start, count, seed), whole[start : start + count])
