"""CopyEngine: prefetch hit accounting on a scripted sequence, invalidation, and the data fetched."""

import torch

from engine.kv.copy_engine import CopyEngine

SHADOW = torch.arange(6 * 16 * 2 * 4, dtype=torch.float32).view(6, 16, 2, 4)  # [NB, bs, Hkv, D]


def test_scripted_prefetch_hits_and_misses():
    copy = CopyEngine(torch.device("cpu"))
    copy.prefetch(0, "k", SHADOW, [(1, 1), (2, 1)])
    first = copy.fetch(0, "k", SHADOW, [(1, 1), (3, 1)])  # 1 was prefetched, 3 was not
    assert first.hits == 1 and torch.equal(first.data, SHADOW[[1, 3], :, 1])
    copy.invalidate(0, [2])  # block 2 was freed: its prefetched copy must not be used
    second = copy.fetch(0, "k", SHADOW, [(2, 1)])
    assert second.hits == 0 and copy.pending() == 0
    copy.prefetch(0, "v", SHADOW, [(4, 0)])
    assert copy.fetch(0, "k", SHADOW, [(4, 0)]).hits == 0  # keys and values are distinct pieces
    assert copy.fetch(0, "v", SHADOW, [(4, 0)]).hits == 1
    assert (copy.stats.hits, copy.stats.misses) == (2, 3)
    assert copy.stats.fetch_bytes == 5 * 16 * 4 * 4
    copy.close()


def test_prefetch_off_never_hits():
    copy = CopyEngine(torch.device("cpu"), prefetch=False)
    copy.prefetch(0, "k", SHADOW, [(1, 0)])
    assert copy.fetch(0, "k", SHADOW, [(1, 0)]).hits == 0 and copy.pending() == 0
    copy.close()


def test_prefetches_held_per_layer_are_bounded_oldest_dropped_first():
    copy = CopyEngine(torch.device("cpu"), limit=2)
    copy.prefetch(0, "k", SHADOW, [(1, 0), (2, 0), (3, 0)])  # 1 is dropped to make room for 3
    copy.prefetch(1, "k", SHADOW, [(1, 0)])  # another layer has its own budget
    assert copy.pending() == 3
    assert copy.fetch(0, "k", SHADOW, [(1, 0), (2, 0), (3, 0)]).hits == 2
    assert copy.fetch(1, "k", SHADOW, [(1, 0)]).hits == 1 and copy.pending() == 0
    copy.prefetch(0, "v", SHADOW, [(4, 1), (5, 1)])
    copy.invalidate(0, [4])
    copy.prefetch(0, "v", SHADOW, [(0, 1)])  # the invalidated piece freed its place: 5 stays
    assert copy.fetch(0, "v", SHADOW, [(5, 1), (0, 1)]).hits == 2
    copy.close()


def test_pieces_move_in_one_transfer_per_fetch_and_per_batch_of_prefetches():
    copy = CopyEngine(torch.device("cpu"))
    copy.prefetch(0, "k", SHADOW, [(1, 0), (2, 1), (5, 0), (2, 1)])  # a repeated piece is fetched once
    assert copy.stats.transfers == 1 and copy.pending() == 3
    copy.prefetch(0, "k", SHADOW, [(1, 0), (2, 1)])  # already pending: no transfer
    assert copy.stats.transfers == 1
    got = copy.fetch(0, "k", SHADOW, [(5, 0), (2, 1), (1, 0)])
    assert got.hits == 3 and copy.stats.transfers == 1
    assert torch.equal(got.data, torch.stack([SHADOW[5, :, 0], SHADOW[2, :, 1], SHADOW[1, :, 0]]))
    missed = copy.fetch(0, "v", SHADOW, [(3, 1), (4, 0), (0, 1)])
    assert missed.hits == 0 and copy.stats.transfers == 2
    assert torch.equal(missed.data, torch.stack([SHADOW[3, :, 1], SHADOW[4, :, 0], SHADOW[0, :, 1]]))
    copy.close()
