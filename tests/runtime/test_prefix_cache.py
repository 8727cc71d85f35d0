"""PrefixCache: longest shared prefix, bounded bytes, entries extended by newer ones dropped."""

from __future__ import annotations

import torch

from vlmkit.runtime.generation import PrefixCache


def layers(n: int, value: float = 0.0):
    """Two layers of keys/values for ``n`` positions (4 bytes x 2 heads x n x 4 dims each)."""
    return [(torch.full((1, 2, n, 4), value), torch.full((1, 2, n, 4), value)) for _ in range(2)]


def test_the_longest_shared_prefix_is_found():
    cache = PrefixCache()
    cache.add([1, 2, 3], layers(3, 1.0))
    cache.add([1, 2, 9, 9, 9], layers(5, 2.0))
    shared, found = cache.longest([1, 2, 9, 9, 4])
    assert shared == 4 and found[0][0][0, 0, 0, 0] == 2.0
    shared, found = cache.longest([1, 2, 3, 7])
    assert shared == 3 and found[0][0][0, 0, 0, 0] == 1.0
    assert cache.longest([5, 6]) == (0, None)


def test_an_entry_a_newer_one_extends_is_dropped():
    cache = PrefixCache()
    cache.add([1, 2, 3], layers(3))
    cache.add([1, 2, 3, 4, 5], layers(5))
    assert len(cache) == 1 and cache.nbytes == 2 * 2 * (2 * 5 * 4 * 4)


def test_least_recently_used_entries_go_when_the_bytes_run_out():
    one = 2 * 2 * (2 * 10 * 4 * 4)  # bytes of a 10-position entry
    cache = PrefixCache(max_bytes=2 * one)
    cache.add(list(range(10)), layers(10))
    cache.add(list(range(100, 110)), layers(10))
    cache.longest(list(range(10)))  # used: the other one is now the oldest
    cache.add(list(range(200, 210)), layers(10))
    assert len(cache) == 2 and cache.nbytes == 2 * one
    assert cache.longest(list(range(100, 110)))[0] == 0 and cache.longest(list(range(10)))[0] == 10
    cache.add(list(range(300, 400)), layers(100))  # larger than the whole budget: not kept
    assert len(cache) == 2


def test_exact_entries_are_found_only_whole_and_kept_beside_longer_ones():
    """An encoder's output (``exact=True``) serves only the same keys: a longer prompt neither drops it nor is
    served by it, and prefix lookups never return it."""
    cache = PrefixCache()
    cache.add([1, 2, 3], layers(3, 1.0), exact=True)
    cache.add([1, 2, 3, 4], layers(4, 2.0), exact=True)
    assert len(cache) == 2
    assert cache.exact([1, 2, 3])[0][0][0, 0, 0, 0] == 1.0
    assert cache.exact([1, 2, 3, 4])[0][0][0, 0, 0, 0] == 2.0
    assert cache.exact([1, 2]) is None and cache.exact([1, 2, 3, 4, 5]) is None
    assert cache.longest([1, 2, 3]) == (0, None)
    cache.add([1, 2, 3], layers(3, 3.0), exact=True)  # the same keys again: replaced, not doubled
    assert len(cache) == 2 and cache.exact([1, 2, 3])[0][0][0, 0, 0, 0] == 3.0
