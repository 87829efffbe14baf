"""xvmalloc rules (compcache-reference.md section (c)), one test per rule, plus a
property test against a model with the invariant walker after every step."""

import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from ublkzswap import xvmalloc as xm
from ublkzswap.xvmalloc import XvPool, XvError

# deeper runs: UBLKZSWAP_EXAMPLES=2000 python3 -m pytest tests/unit/test_xvmalloc.py
EXAMPLES = int(os.environ.get("UBLKZSWAP_EXAMPLES", 60))


class Provider:
    """A plain bytearray arena and a list of free pages."""

    def __init__(self, npages=16):
        self.buf = bytearray(npages * 4096)
        self.words = memoryview(self.buf).cast("I")
        self.free = list(range(npages - 1, -1, -1))
        self.owned = set()
        self.returned = []

    def take(self, kind, timeout=0.0):
        assert kind == xm.OBJECTS
        if not self.free:
            return -1
        p = self.free.pop()
        self.owned.add(p)
        return p

    def give(self, p):
        assert p in self.owned, f"page {p} returned twice or never given"
        self.owned.remove(p)
        self.returned.append(p)
        self.free.append(p)


def make(npages=16):
    prov = Provider(npages)
    pool = XvPool(prov)
    return prov, pool


def hdr(pool, addr):
    return pool.block_header(addr)


def test_constants():
    assert xm.XV_ALIGN == 4
    assert xm.XV_MIN_ALLOC_SIZE == 32
    assert xm.XV_MAX_ALLOC_SIZE == 4092
    assert xm.FL_DELTA == 8
    assert xm.NUM_FREE_LISTS == 508
    assert xm.MAX_FLI == 8


@pytest.mark.parametrize("size,idx", [(32, 0), (39, 0), (40, 1), (47, 1), (100, 8), (4088, 507), (4092, 507), (5000, 507)])
def test_insert_index_rounds_down(size, idx):
    assert xm.insert_index(size) == idx


@pytest.mark.parametrize("size,idx", [(1, 0), (32, 0), (33, 1), (40, 1), (41, 2), (96, 8), (100, 9), (4088, 507)])
def test_search_index_rounds_up(size, idx):
    assert xm.search_index(size) == idx


@pytest.mark.parametrize("size", [0, -1, 4093, 5000])
def test_malloc_rejects_sizes_outside_range(size):
    prov, pool = make()
    with pytest.raises(ValueError):
        pool.malloc(size)
    assert pool.pages_used() == 0 and not prov.owned


def test_first_malloc_grows_one_page_and_splits():
    prov, pool = make()
    h = pool.malloc(100)
    p = h >> 12
    assert h == p * 4096 + 4
    assert pool.pages_used() == 1 and pool.pages_used() * 4096 == 4096
    assert hdr(pool, p * 4096) == (100, 0, 0)
    # remainder right after the 4-aligned object: offset 104, size 4096-104-4
    assert hdr(pool, p * 4096 + 104) == (3988, 0, xm.BLOCK_FREE)
    assert pool.free_list(xm.insert_index(3988)) == [p * 4096 + 104]
    pool.walk(prov.owned)


@pytest.mark.parametrize("size", [1, 31, 32, 33, 2048, 2049, 3072, 3073, 4091])
def test_object_size_is_exact_and_blocks_4_aligned(size):
    prov, pool = make()
    h = pool.malloc(size)
    assert pool.object_size(h) == size
    h2 = pool.malloc(20)
    aligned = (size + 3) & ~3
    assert h2 == h + aligned + 4  # next block right after the aligned object and its header
    live = pool.walk(prov.owned)
    assert live == {h: size, h2: 20}


def test_4092_takes_a_whole_page():
    prov, pool = make()
    a = pool.malloc(100)
    h = pool.malloc(4092)
    assert pool.pages_used() == 2
    assert h & 4095 == 4 and (h >> 12) != (a >> 12)
    assert pool.object_size(h) == 4092
    pool.walk(prov.owned)
    pool.free(h)
    assert pool.pages_used() == 1
    assert prov.returned == [h >> 12]
    pool.walk(prov.owned)


def test_4089_also_fits_a_fresh_page_exactly():
    prov, pool = make()
    h = pool.malloc(4089)
    assert pool.object_size(h) == 4089 and pool.pages_used() == 1
    assert pool.walk(prov.owned) == {h: 4089}


def test_small_remainder_stays_free_but_unlisted():
    prov, pool = make()
    h = pool.malloc(4060)  # remainder 32 bytes = header + 28-byte block
    p = h >> 12
    assert hdr(pool, p * 4096 + 4064) == (28, 0, xm.BLOCK_FREE)
    assert all(not pool.free_list(i) for i in range(xm.NUM_FREE_LISTS))
    assert pool._fl[0] == 0
    pool.walk(prov.owned)
    # nothing findable: a 20-byte request grows a new page
    h2 = pool.malloc(20)
    assert (h2 >> 12) != p and pool.pages_used() == 2
    # freeing the big object merges the unlisted fragment and returns the page
    pool.free(h)
    assert pool.pages_used() == 1 and prov.returned == [p]
    pool.walk(prov.owned)


def test_remainder_of_exactly_32_is_listed():
    prov, pool = make()
    h = pool.malloc(4056)  # remainder 36 = header + 32
    p = h >> 12
    assert pool.free_list(0) == [p * 4096 + 4060]
    h2 = pool.malloc(32)
    assert h2 == p * 4096 + 4064  # exact fit, same page
    assert pool.pages_used() == 1
    pool.walk(prov.owned)


def test_exact_fit_clears_prev_free_of_next_block():
    prov, pool = make()
    a = pool.malloc(96)
    b = pool.malloc(96)
    p = a >> 12
    pool.free(a)
    assert hdr(pool, b - 4)[2] == xm.PREV_FREE
    assert pool.free_list(8) == [p * 4096]
    a2 = pool.malloc(96)  # search index 8 -> the freed block, exact fit
    assert a2 == a
    assert hdr(pool, b - 4) == (96, 0, 0)
    pool.walk(prov.owned)


def test_search_is_approximate_best_fit_rounding_up():
    prov, pool = make()
    a = pool.malloc(100)
    pool.malloc(100)
    pool.free(a)  # a free block of 100 bytes: list 8 (96..103)
    assert pool.free_list(8) == [a - 4]
    c = pool.malloc(100)  # search index 9: not the 100-byte block
    assert c != a
    assert pool.free_list(8) == [a - 4]
    d = pool.malloc(96)  # search index 8 finds it
    assert d == a
    pool.walk(prov.owned)


def test_merge_with_both_neighbours():
    prov, pool = make()
    a, b, c, d = (pool.malloc(200) for _ in range(4))
    p = a >> 12
    pool.free(a)
    pool.free(c)
    pool.walk(prov.owned)
    pool.free(b)  # merges a (previous) and c (next)
    merged = 3 * 200 + 2 * 4
    assert hdr(pool, p * 4096) == (merged, 0, xm.BLOCK_FREE)
    assert pool.free_list(xm.insert_index(merged)) == [p * 4096]
    # d now follows the merged block
    assert hdr(pool, d - 4) == (200, 0, xm.PREV_FREE)
    assert pool.walk(prov.owned) == {d: 200}


def test_merge_next_only_and_prev_only():
    prov, pool = make()
    a, b, c = (pool.malloc(64) for _ in range(3))
    pool.free(b)
    pool.free(a)  # merges next (b)
    assert hdr(pool, a - 4) == (64 * 2 + 4, 0, xm.BLOCK_FREE)
    pool.walk(prov.owned)
    prov2, pool2 = make()
    a, b, c = (pool2.malloc(64) for _ in range(3))
    pool2.free(a)
    pool2.free(b)  # merges previous (a)
    assert hdr(pool2, a - 4) == (64 * 2 + 4, 0, xm.BLOCK_FREE)
    assert hdr(pool2, c - 4)[1:] == (0, xm.PREV_FREE)
    pool2.walk(prov2.owned)


def test_page_returned_when_entirely_free_and_growth_one_page_at_a_time():
    prov, pool = make()
    hs = [pool.malloc(3000) for _ in range(3)]
    assert pool.pages_used() == 3 and len({h >> 12 for h in hs}) == 3
    small = pool.malloc(1000)  # fits in the 1088-byte remainder of a page
    assert pool.pages_used() == 3
    pool.free(hs[0])
    pool.free(hs[1])
    assert pool.pages_used() == 3 - len(prov.returned)
    pool.walk(prov.owned)
    for h in [hs[2], small]:
        pool.free(h)
    assert pool.pages_used() == 0 and not prov.owned
    assert pool._fl[0] == 0 and all(pool._sl[i] == 0 for i in range(8))


def test_two_level_search_crosses_bitmap_words():
    prov, pool = make()
    h = pool.malloc(40)  # leaves a 4048-byte free block: list 502, in word 7
    rest = (h & ~4095) + 44
    assert pool.free_list(xm.insert_index(4048)) == [rest]
    assert pool._fl[0] == 1 << 7
    h2 = pool.malloc(40)  # search starts in word 0, must find word 7
    assert h2 == rest + 4 and pool.pages_used() == 1
    pool.walk(prov.owned)


def test_grow_failure_is_memory_error_and_changes_nothing():
    prov, pool = make(npages=1)
    h = pool.malloc(3000)
    with pytest.raises(MemoryError):
        pool.malloc(2000)
    assert pool.pages_used() == 1
    assert pool.walk(prov.owned) == {h: 3000}


def test_double_free_and_bad_handle():
    prov, pool = make()
    a = pool.malloc(50)
    pool.malloc(50)
    pool.free(a)
    with pytest.raises(XvError):
        pool.free(a)
    with pytest.raises(XvError):
        pool.free(a + 1)


def test_malloc_waits_for_the_pool_as_long_as_asked():
    """The write's timeout reaches the page pool: a request that must grow the pool passes it
    to take() (an ordinary write waits for the keeper; a swap write passes 0)."""
    prov, pool = make(npages=1)
    seen = []
    take = prov.take
    prov.take = lambda kind, timeout=0.0: seen.append(timeout) or take(kind, timeout)
    pool = XvPool(prov)
    pool.malloc(3000, 1.5)
    with pytest.raises(MemoryError):
        pool.malloc(3000, 0.25)
    assert seen == [1.5, 0.25]


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 4092), st.integers(0, 10**9)), min_size=1, max_size=80))
def test_random_malloc_free_against_model(ops):
    prov, pool = make(npages=96)
    live = {}  # handle -> (size, fill byte)
    for is_alloc, size, r in ops:
        if is_alloc or not live:
            try:
                h = pool.malloc(size)
            except MemoryError:
                continue
            assert h not in live
            fill = r % 251 + 1
            prov.buf[h:h + size] = bytes([fill]) * size
            live[h] = (size, fill)
        else:
            h = sorted(live)[r % len(live)]
            size, fill = live.pop(h)
            assert prov.buf[h:h + size] == bytes([fill]) * size, "object overwritten by another"
            pool.free(h)
        got = pool.walk(prov.owned)
        assert got == {h: s for h, (s, _) in live.items()}
        assert pool.pages_used() == len(prov.owned)
        # every page holds at least one live object
        assert pool.pages_used() <= len(live)
    for h, (size, fill) in live.items():
        assert prov.buf[h:h + size] == bytes([fill]) * size


def test_many_small_objects_pack_densely():
    prov, pool = make(npages=64)
    rng = random.Random(1)
    sizes = [rng.randint(500, 2000) for _ in range(150)]
    for s in sizes:
        pool.malloc(s)
    used = sum(((s + 3) & ~3) + 4 for s in sizes)
    # xvmalloc fills pages well on such sizes: within 15% of the ideal
    assert pool.pages_used() * 4096 <= used * 1.15
    pool.walk(prov.owned)
