"""The log allocator: bump allocation in segments, whole pages apart, emptied segments back to
the pool, victims for compaction; and the store compacting through it."""
import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from ublkzswap.arena import Arena
from ublkzswap.logalloc import SEGMENT, SEGMENT_PAGES, LogPool
from ublkzswap.memory import HEAP_HEADROOM
from ublkzswap import store as store_module
from ublkzswap.store import (BACKGROUND_WASTE, COMPACT_PASS, COMPACT_PLAN, COMPACT_PLAN_AGE,
                             COMPACT_PRESSURE_PASS, COMPACT_SCAN, PRESSURE_WASTE, Store)

from invariants import check

PAGE = 4096
EXAMPLES = int(os.environ.get("UBLKZSWAP_EXAMPLES", 40))


def pool(nseg=8, **kw):
    kw.setdefault("inline_refill", True)
    a = Arena(nseg * SEGMENT_PAGES, unit=SEGMENT_PAGES, low=0, high=nseg * SEGMENT_PAGES, **kw)
    return a, LogPool(a)


def test_objects_pack_back_to_back_and_cross_page_boundaries():
    a, lp = pool()
    addrs = [lp.malloc(1400) for _ in range(46)]
    assert [x - addrs[0] for x in addrs] == [1400 * i for i in range(46)]   # no gaps, no headers
    assert lp.pages_used() == SEGMENT_PAGES and lp.live_bytes() == 46 * 1400
    nxt = lp.malloc(1400)                      # 47 * 1400 > 64 KiB: a new segment
    assert nxt // SEGMENT != addrs[0] // SEGMENT and lp.pages_used() == 2 * SEGMENT_PAGES
    lp.check({**{x: 1400 for x in addrs}, nxt: 1400})
    a.close()


def test_whole_pages_have_a_head_of_their_own():
    a, lp = pool()
    small = lp.malloc(100)
    whole = [lp.malloc(PAGE) for _ in range(16)]
    assert all(w % PAGE == 0 for w in whole) and len({w // SEGMENT for w in whole}) == 1
    assert small // SEGMENT != whole[0] // SEGMENT
    a.close()


def test_an_emptied_segment_goes_back_at_once_and_a_full_pool_says_memoryerror():
    a, lp = pool(nseg=2, inline_refill=False, prefill=True)
    x = lp.malloc(3000)
    y = lp.malloc(PAGE)
    with pytest.raises(MemoryError):
        lp.malloc(4000) if False else [lp.malloc(PAGE) for _ in range(17)]
    assert a.ready == 0
    lp.free(x, 3000)
    assert a.ready == 1 and lp.pages_used() == SEGMENT_PAGES    # head or not, empty goes back
    lp.free(y, PAGE)
    a.close()


def test_victims_are_the_emptiest_and_only_when_a_segment_is_freed_net():
    a, lp = pool(nseg=8)
    objs = [lp.malloc(1000) for _ in range(65 * 4)]          # 4 segments of 65 objects
    assert SEGMENT // 1000 == 65
    for i, x in enumerate(objs[:65 * 3]):                      # empty 3 of them partly
        if i % 65 >= [10, 30, 50][i // 65]:
            lp.free(x, 1000)
    unit, segs = lp.victims(max_fill=0.9)
    assert unit == SEGMENT
    assert segs == sorted(segs, key=lambda s: lp._live[s]) and len(segs) >= 2
    # the head (last segment) is never a victim
    assert objs[-1] // SEGMENT not in segs
    a.close()


def test_victims_within_a_budget_are_the_fewest_that_free_a_segment_net_and_fit():
    a, lp = pool(nseg=12)
    objs = [lp.malloc(1000) for _ in range(65 * 6 + 1)]      # 6 full segments, a head
    for i, x in enumerate(objs[:65 * 6]):                      # 10, 20, .. 60 objects left
        if i % 65 >= 10 * (i // 65 + 1):
            lp.free(x, 1000)
    segs6 = [objs[65 * k] // SEGMENT for k in range(6)]
    assert lp.victims(0.95)[1] == segs6                        # no budget: every one
    assert lp.victims(0.95, budget=35_000)[1] == segs6[:2]     # 10 + 20 fit, 30 more do not
    assert lp.victims(0.95, budget=65_000)[1] == segs6[:3]
    # under budget at once, it still takes enough to free a segment net (10 + 20 + 30 > 1)
    assert lp.victims(0.95, budget=1)[1] == segs6[:2]
    assert lp.victims(0.95, budget=1, limit=1)[1] == []        # one cannot free one net
    a.close()


def make_page(rng, kind):
    if kind == 0:
        return bytes(PAGE)
    if kind == 1:
        return rng.randbytes(PAGE)
    words = [b"swap", b"page", b"ramzswap", b"compcache", b"lzo", b"segment", b"log"]
    text = b" ".join(rng.choice(words) for _ in range(rng.randint(200, 1400)))
    return (text * (PAGE // len(text) + 2))[:PAGE]


def filled_store(rng, n):
    """A store of ``n`` pages (no keeper), every page written once with ~2:1 text."""
    s = Store(n * PAGE, keeper=False, inline_refill=True, low=16, high=64)
    pages = [make_page(rng, 2) for _ in range(n)]
    for i, p in enumerate(pages):
        s.write(i * PAGE, memoryview(p))
    return s, pages


def test_sequential_fill_wastes_almost_nothing_and_compaction_closes_holes():
    rng = random.Random(5)
    n = 2048
    s, pages = filled_store(rng, n)
    try:
        st = s.stats()
        assert st["mem_used_total"] / st["compr_data_size"] <= 1.05, st
        for _ in range(2):                      # overwrite a random half, twice: holes everywhere
            for i in rng.sample(range(n), n // 2):
                pages[i] = make_page(rng, 2)
                s.write(i * PAGE, memoryview(pages[i]))
        st = s.stats()
        before = st["mem_used_total"] / st["compr_data_size"]
        assert before > 1.2
        freed = s.compact()
        st = s.stats()
        after = st["mem_used_total"] / st["compr_data_size"]
        assert after <= 1.10 and after < before, (before, after)
        assert freed > 0 and st["pages_compacted"] == freed
        check(s)
        out = bytearray(PAGE)
        for i in range(n):
            s.read(i * PAGE, memoryview(out))
            assert out == pages[i], i
    finally:
        s.close()


def test_compaction_without_ready_memory_stops_and_loses_nothing():
    rng = random.Random(7)
    s = Store(512 * PAGE, keeper=False, inline_refill=False, low=0, high=1024)
    try:
        pages = {i: make_page(rng, 2) for i in range(512)}
        for i, p in pages.items():
            s.write(i * PAGE, memoryview(p))
        for i in range(0, 512, 3):
            s.discard(i * PAGE, PAGE)
            del pages[i]
        while s.pool.take(4) >= 0:                  # nothing ready any more (BUSY: nobody's)
            pass
        assert s.compact() == 0
        check(s)
        out = bytearray(PAGE)
        for i, p in pages.items():
            s.read(i * PAGE, memoryview(out))
            assert out == p
    finally:
        s.close()


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "write", "swap", "swap", "read", "discard",
                                           "compact"]),
                          st.integers(0, 63), st.integers(0, 2), st.integers(0, 2**32)),
                min_size=1, max_size=80))
def test_compaction_interleaved_with_everything_keeps_every_page(ops):
    """...and with swap-outs of pages already stored (four contents: shared objects, moved
    with all their holders)."""
    s = Store(64 * PAGE, keeper=False, inline_refill=True, low=16, high=32)
    model = {}
    try:
        for op, idx, kind, seed in ops:
            if op in ("write", "swap"):
                p = make_page(random.Random(seed % 4 if op == "swap" else seed), kind)
                (s.write_swap if op == "swap" else s.write)(idx * PAGE, memoryview(p))
                model[idx] = p
            elif op == "read":
                out = bytearray(PAGE)
                s.read(idx * PAGE, memoryview(out))
                assert out == model.get(idx, bytes(PAGE))
            elif op == "discard":
                s.discard(idx * PAGE, PAGE)
                model.pop(idx, None)
            else:
                s.compact(max_fill=1.0)
            check(s)
        out = bytearray(PAGE)
        for i in range(64):
            s.read(i * PAGE, memoryview(out))
            assert out == model.get(i, bytes(PAGE))
    finally:
        s.close()


def filled_then_thinned(seed: int, every: int) -> Store:
    """A store without a keeper, every page written, then every ``every``-th discarded."""
    rng = random.Random(seed)
    s = Store(1024 * PAGE, keeper=False, inline_refill=False, low=64, high=1024)
    for i in range(1024):
        s.write(i * PAGE, memoryview(make_page(rng, 2)))
    for i in range(0, 1024, every):
        s.discard(i * PAGE, PAGE)
    return s


def test_background_compaction_leaves_the_writes_their_ready_units():
    s = filled_then_thinned(11, every=2)
    try:
        assert s.stats()["mem_used_total"] > 1.5 * s.stats()["compr_data_size"]
        pages = s.pool.ready
        while s.pool.ready > s.pool.low:          # down to the reserve: no background work
            s.pool.take(4)
        assert s.compact_if_wasteful() == 0
        assert s.pool.ready == s.pool.low
        for _ in range(pages - s.pool.low):       # ready units back: it works, a bounded step
            s.pool.give(int(s.pool.pages_of(4)[0]))
        assert s.compact_if_wasteful() > 0 and s.pool.ready >= s.pool.low
    finally:
        s.close()


def test_background_compaction_never_waits_for_the_store_lock():
    """A writer holding the store lock may be waiting for the keeper to refill the pool; the
    keeper's compaction must not wait for that writer in turn."""
    rng = random.Random(12)
    s = Store(1024 * PAGE, keeper=False, inline_refill=False, low=16, high=1024)
    try:
        for i in range(1024):
            s.write(i * PAGE, memoryview(make_page(rng, 2)))
        for i in range(0, 1024, 2):
            s.discard(i * PAGE, PAGE)
        import threading
        done = threading.Event()
        with s._lock:                                 # a writer, waiting for memory
            t = threading.Thread(target=lambda: (s.compact_if_wasteful(), done.set()))
            t.start()
            assert done.wait(5), "background compaction waited for the store lock"
        t.join()
        assert s.compact_if_wasteful() > 0            # and works once the lock is free
    finally:
        s.close()


def test_compaction_scans_in_slices_and_holds_little_memory_at_once():
    # the I/O path relies on a small pre-grown heap; the keeper's background compaction runs
    # in the same process, and a table-sized numpy temporary (8 MiB here) would grow the heap
    import tracemalloc
    n_slots, n = 1 << 20, 4096              # a 4 GiB device, 16 MiB of it written
    s = Store(n_slots * PAGE, keeper=False, inline_refill=True, low=16, high=64)
    try:
        rng = random.Random(3)
        for i in range(n):                  # spread over the whole table
            page = bytes(rng.getrandbits(8) for _ in range(1200)) + bytes(2896)
            s.write(i * PAGE * 256, memoryview(page))
        for i in range(0, n, 2):
            s.discard(i * PAGE * 256, PAGE)
        tracemalloc.start()                 # numpy reports its buffers to tracemalloc too
        try:
            freed = s.compact()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert freed > 0
        # (a table-sized copy alone was 8 MiB; the allocator's per-segment counts are 1 MiB here)
        assert peak < HEAP_HEADROOM, f"compaction held {peak >> 10} KiB at its peak"
    finally:
        s.close()


def test_compaction_on_demand_goes_on_past_one_round_of_victims():
    # more sparse segments than one round of victims takes (64): rzscontrol --compact on a
    # 256 MiB device once gave back only the first few MiB
    rng = random.Random(11)
    n = 16384
    s, pages = filled_store(rng, n)
    try:
        for i in rng.sample(range(n), n // 2):
            s.discard(i * PAGE, PAGE)
        st = s.stats()
        assert st["mem_used_total"] / st["compr_data_size"] > 1.5
        s.compact()
        st = s.stats()
        assert st["mem_used_total"] / st["compr_data_size"] <= 1.10, st
        check(s)
    finally:
        s.close()


def test_compaction_on_demand_waits_for_the_keeper_when_the_ready_pool_runs_dry():
    # a round's moves take segments before its victims give any back, more than the ready
    # pool holds: with a real keeper thread (not inline refill) rzscontrol --compact after
    # fio's overwrites once stopped at the first empty pool (mem/compr 1.49 in the VM)
    rng = random.Random(5)
    n = 16384
    s = Store(n * PAGE)            # the daemon's pool: a keeper thread that compacts too
    try:
        # the holes first, with the keeper's background compaction held off: writes hold the
        # store lock only to publish, so it would otherwise keep up with them
        s.compact_if_wasteful = lambda: 0
        pages = [make_page(rng, 2) for _ in range(n)]
        for i, p in enumerate(pages):
            s.write(i * PAGE, memoryview(p))
        for _ in range(2):
            for i in rng.sample(range(n), n // 2):
                pages[i] = make_page(rng, 2)
                s.write(i * PAGE, memoryview(pages[i]))
        st = s.stats()
        assert st["mem_used_total"] / st["compr_data_size"] > 1.2, st
        # on demand alone (background compaction would race it to the same holes): the
        # keeper only refills
        assert s.compact() > 0
        st = s.stats()
        assert st["mem_used_total"] / st["compr_data_size"] <= 1.10, st
        del s.compact_if_wasteful              # the keeper compacts in the background again
        check(s)
        out = bytearray(PAGE)
        for i in range(0, n, 7):
            s.read(i * PAGE, memoryview(out))
            assert out == pages[i], i
    finally:
        s.close()


EVEN_PAGES = 4096


def thinned_evenly(rng, every: int, may_grow=None, pressure=None, n: int = EVEN_PAGES):
    """A store of ``n`` pages without a keeper, every page written, then every ``every``-th
    discarded: holes spread evenly over the segments (as single-slot frees leave them), none
    nearly empty."""
    s = Store(n * PAGE, keeper=False, inline_refill=False, low=64, high=n,
              may_grow=may_grow, pressure=pressure)
    pages = {}
    for i in range(n):
        pages[i] = make_page(rng, 2)
        s.write(i * PAGE, memoryview(pages[i]))
    for i in range(0, n, every):
        s.discard(i * PAGE, PAGE)
        del pages[i]
    return s, pages


def assert_pages(s, pages, n: int = EVEN_PAGES):
    out = bytearray(PAGE)
    for i in range(n):
        s.read(i * PAGE, memoryview(out))
        assert out == pages.get(i, bytes(PAGE)), i


def test_background_compaction_closes_holes_spread_evenly():
    """Segments every one 80% full: a quarter more memory than their data, and none of them
    sparse. The keeper's passes take them back to within BACKGROUND_WASTE, then stop."""
    s, pages = thinned_evenly(random.Random(12), every=5)
    try:
        live, before = s.allocator.live_bytes(), s.stats()["mem_used_total"]
        assert before > 1.2 * live
        gots = [s.compact_if_wasteful() for _ in range(60)]   # the keeper's passes
        total = sum(gots)
        assert max(gots) < total                            # a bounded step at a time
        assert not any(gots[-10:])                          # and then it stops
        after = s.stats()["mem_used_total"]
        assert s.stats()["pages_compacted"] == total
        # counted net of what the moves took, but for the head segment they may still owe
        assert total * PAGE - SEGMENT <= before - after <= total * PAGE
        assert after - live <= BACKGROUND_WASTE * after + 4 * SEGMENT, s.stats()
        check(s)
        assert_pages(s, pages)
    finally:
        s.close()


def scattered_store(seed: int, every: int = 3, n: int = 6 * COMPACT_SCAN, **kw):
    """6000 pages written to slots all over the table (pages swap out in no order), every
    ``every``-th of them freed again."""
    rng = random.Random(seed)
    s = Store(n * PAGE, keeper=False, inline_refill=False, low=64, high=4096, **kw)
    slots = rng.sample(range(n), 6000)
    pages = {}
    for i in slots:
        pages[i] = make_page(rng, 2)
        s.write(i * PAGE, memoryview(pages[i]))
    for i in slots[::every]:
        s.discard(i * PAGE, PAGE)
        del pages[i]
    return s, pages, slots


def assert_pages_at(s, pages, slots):
    out = bytearray(PAGE)
    for i in slots:
        s.read(i * PAGE, memoryview(out))
        assert out == pages.get(i, bytes(PAGE)), i


def test_every_background_pass_empties_the_victims_it_takes():
    """Holes spread evenly, and each segment's objects belong to slots all over the table
    (pages swap out in no order). A pass takes victims for about COMPACT_PASS live bytes,
    finds their owners in one pass over the table and empties them: a segment back every
    pass. (Taking 64 victims and moving a few batches' worth, part of each, gave nothing back
    for dozens of passes, each rescanning the table from its start.)"""
    s, pages, slots = scattered_store(7, every=4)
    try:
        before = s.stats()["mem_used_total"]
        gots = [s.compact_if_wasteful() for _ in range(8)]
        assert all(g >= SEGMENT_PAGES for g in gots), gots
        assert before - s.stats()["mem_used_total"] >= sum(gots) * PAGE - SEGMENT
        check(s)
        assert_pages_at(s, pages, slots)
    finally:
        s.close()


def test_background_passes_follow_one_scan_for_several_passes():
    """The table scan that finds a pass's owners is most of its cost: one scan serves
    COMPACT_PLAN passes, each moving about its budget and giving segments back, the next one
    going on where the last stopped -- also after a pass cut short by a refill due. A plan
    used up or older than COMPACT_PLAN_AGE is made again; on-demand compaction scans anew.
    Pages written and freed between passes (the plan's entries gone stale) lose nothing."""
    s, pages, slots = scattered_store(13, every=3)
    scans = []
    real = s._owners
    s._owners = lambda unit, segs: scans.append(len(segs)) or real(unit, segs)
    rng = random.Random(2)
    try:
        before = s.stats()["mem_used_total"]
        got = s.compact(max_fill=0.95, batches=64, wait=False, reserve=-1, budget=COMPACT_PASS)
        assert got >= SEGMENT_PAGES and len(scans) == 1
        # a refill due cuts the next pass short before it moves anything: the plan stays
        pool, low = s.pool, s.pool.low
        pool.low = pool.ready + 1
        assert s.compact(max_fill=0.95, batches=64, wait=False, reserve=-1,
                         budget=COMPACT_PASS) == 0
        pool.low = low
        for k in range(COMPACT_PLAN - 1):
            for i in rng.sample(slots, 40):          # stale entries: rewritten, freed
                if rng.random() < 0.5:
                    pages[i] = make_page(rng, 2)
                    s.write(i * PAGE, memoryview(pages[i]))
                else:
                    s.discard(i * PAGE, PAGE)
                    pages.pop(i, None)
            got += s.compact(max_fill=0.95, batches=64, wait=False, reserve=-1,
                             budget=COMPACT_PASS)
        assert len(scans) == 1, scans                 # every pass on the first scan
        assert got >= COMPACT_PLAN * SEGMENT_PAGES, got
        assert scans[0] > COMPACT_PASS // SEGMENT  # victims for several passes
        assert before - s.stats()["mem_used_total"] >= got * PAGE - SEGMENT
        check(s)
        assert_pages_at(s, pages, slots)
        s.compact(max_fill=0.95, batches=64, wait=False, reserve=-1, budget=COMPACT_PASS)
        assert len(scans) == 2                        # used up: a new scan
        s.compact(max_fill=0.95, batches=64, wait=False, reserve=-1, budget=COMPACT_PASS)
        assert len(scans) == 2
        s._plan.made -= COMPACT_PLAN_AGE + 1         # too old: a new scan
        s.compact(max_fill=0.95, batches=64, wait=False, reserve=-1, budget=COMPACT_PASS)
        assert len(scans) == 3
        s.compact(max_fill=0.95, batches=1)            # on demand: a scan of its own
        assert len(scans) == 4
        check(s)
        assert_pages_at(s, pages, slots)
    finally:
        s.close()


def test_a_plans_first_pass_takes_the_emptiest_victims(monkeypatch):
    """A plan holds victims for several passes; its first pass must move the emptiest of
    them (the most memory back for the bytes moved), not the ones lowest in memory: here
    the segments highest in the arena are the emptiest. A planned pass gives back about what
    a pass with victims for its budget alone does."""
    got = {}
    for plan in (1, COMPACT_PLAN):
        monkeypatch.setattr(store_module, "COMPACT_PLAN", plan)
        rng = random.Random(17)
        n = 6 * COMPACT_SCAN
        s = Store(n * PAGE, keeper=False, inline_refill=False, low=64, high=4096)
        try:
            slots, pages = rng.sample(range(n), 6000), {}
            for i in slots:
                pages[i] = make_page(rng, 2)
                s.write(i * PAGE, memoryview(pages[i]))
            top = max(s.slot(i)[1] for i in slots) // SEGMENT
            for i in slots:                  # the top 12 segments nearly empty, the rest 60%
                sparse = s.slot(i)[1] // SEGMENT > top - 12
                if rng.random() < (0.95 if sparse else 0.4):
                    s.discard(i * PAGE, PAGE)
                    del pages[i]
            got[plan] = s.compact(max_fill=0.95, batches=64, wait=False, reserve=-1,
                                  budget=COMPACT_PASS)
            check(s)
            assert_pages_at(s, pages, slots)
        finally:
            s.close()
    assert got[1] >= 2 * SEGMENT_PAGES, got
    assert got[COMPACT_PLAN] >= got[1] - SEGMENT_PAGES, got


def test_a_round_with_two_spare_units_still_empties_every_victim():
    """A round moves its victims' objects one victim after another, so each gives its unit back
    as soon as it is empty: with only two ready units to spare (a machine short of memory) a
    round for COMPACT_PRESSURE_PASS live bytes gives back what one with every ready unit to
    spare does. (In table order the moves took the spare units with part of every victim
    moved and none emptied.)"""
    got = {}
    for spare in (None, 2):
        s, pages, slots = scattered_store(11)
        try:
            unit, victims = s.allocator.victims(0.95, budget=COMPACT_PRESSURE_PASS)
            assert len(victims) >= 8
            before = s.stats()["mem_used_total"]
            got[spare] = s.compact(max_fill=0.95, batches=64, wait=False,
                                   reserve=-1 if spare is None else s.pool.ready - spare,
                                   budget=COMPACT_PRESSURE_PASS)
            assert before - s.stats()["mem_used_total"] >= got[spare] * PAGE - SEGMENT
            check(s)
            assert_pages_at(s, pages, slots)
        finally:
            s.close()
    assert got[None] >= 4 * SEGMENT_PAGES
    assert got[2] >= got[None] - SEGMENT_PAGES, got


def test_the_keepers_refill_comes_before_background_compaction():
    """Under its low watermark the pool is the keeper's first job: a background pass then
    moves nothing -- unless the pool is short of memory, when the victims' units are the only
    ones coming back. While the machine swaps out, a pass takes victims for
    COMPACT_PRESSURE_PASS live bytes."""
    s, pages, slots = scattered_store(5, pressure=lambda: True)
    try:
        pool = s.pool
        low = pool.low
        pool.low = pool.ready + 1                        # the refill is due
        assert s.compact_if_wasteful() == 0
        pool.short = True                                # ...and cannot come: compact
        got = s.compact_if_wasteful()
        assert got >= 4 * SEGMENT_PAGES
        pool.short, pool.low = False, low
        got = s.compact_if_wasteful()                    # swapping: a pressure-sized pass
        assert got * PAGE > COMPACT_PASS, got
        check(s)
        assert_pages_at(s, pages, slots)
    finally:
        s.close()


def test_while_the_machine_swaps_background_compaction_works_to_a_lower_line():
    """Holes under BACKGROUND_WASTE are left alone while the machine is not swapping; once it
    swaps out (the pressure signal), they are memory reclaim is looking for, down to
    PRESSURE_WASTE."""
    swapping = [False]
    n = 4 * EVEN_PAGES
    s, pages = thinned_evenly(random.Random(3), every=16, pressure=lambda: swapping[0], n=n)
    try:
        live, before = s.allocator.live_bytes(), s.stats()["mem_used_total"]
        assert PRESSURE_WASTE * before + 4 * SEGMENT < before - live <= BACKGROUND_WASTE * before
        assert [s.compact_if_wasteful() for _ in range(5)] == [0] * 5
        swapping[0] = True
        got = sum(s.compact_if_wasteful() for _ in range(60))
        after = s.stats()["mem_used_total"]
        assert got > 0 and s.stats()["pages_compacted"] == got
        assert after - live <= PRESSURE_WASTE * after + 4 * SEGMENT + SEGMENT, (after, live)
        check(s)
        assert_pages(s, pages, n)
    finally:
        s.close()


def test_the_pressure_signal_is_not_read_while_nothing_is_to_be_won():
    # it reads /proc/vmstat, and the keeper passes 50 times a second on an idle device
    asked = []
    s, pages = thinned_evenly(random.Random(3), every=1000, pressure=lambda: asked.append(1))
    try:
        assert [s.compact_if_wasteful() for _ in range(5)] == [0] * 5 and asked == []
    finally:
        s.close()


def test_the_store_closes_its_pressure_signal():
    closed = []

    class Signal:
        def __call__(self):
            return False

        def close(self):
            closed.append(True)

    s = Store(64 * PAGE, keeper=False, pressure=Signal())
    s.close()
    assert closed == [True]


def test_short_of_memory_background_compaction_takes_back_what_it_can():
    """A few holes (under BACKGROUND_WASTE) are not worth the keeper's time while memory is
    plentiful; once the pool is refused growth (memory short) they are, down to the last
    ready unit."""
    grow = [True]
    s, pages = thinned_evenly(random.Random(12), every=12, may_grow=lambda n: grow[0])
    try:
        before = s.stats()["mem_used_total"]
        assert before > 1.04 * s.allocator.live_bytes()
        assert s.compact_if_wasteful() == 0                 # under the background line
        grow[0] = False
        while s.pool.ready > 1:                             # short: the pool nearly dry...
            s.pool.take(4)
        s.pool.step()                                       # ...and refused more
        assert s.pool.growth_deferred == 1
        got = 0
        for _ in range(8):                                  # the keeper's passes, each refused
            got += s.compact_if_wasteful()
            while s.pool.ready > 1:
                s.pool.take(4)
            s.pool.step()
        assert got > 0 and s.stats()["pages_compacted"] == got
        assert got * PAGE - SEGMENT <= before - s.stats()["mem_used_total"] <= got * PAGE
        check(s)
        assert_pages(s, pages)
    finally:
        s.close()
