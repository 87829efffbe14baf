"""Discard clears slots in bulk (Store._clear, a slice at a time with numpy): it must leave
exactly what clearing them one by one (_set, as write_zeroes does without a backing swap)
leaves -- table, every counter, the allocator's segments -- for every kind of slot, any range."""
from __future__ import annotations

import random

import numpy as np
import pytest

import invariants
from test_fast_path import page_of
from ublkzswap import store as storemod
from ublkzswap.store import Store

PAGE = 4096
NPAGES = 1500          # three slices of a discard and a part


def filled(seed: int, allocator: str) -> tuple[Store, list[bytes]]:
    rng = random.Random(seed)
    s = Store(NPAGES * PAGE, keeper=False, inline_refill=True, low=4, high=16,
              allocator=allocator)
    pages = [bytes(PAGE)] * NPAGES
    for _ in range(2):                                  # overwrites leave holes
        for i in rng.sample(range(NPAGES), NPAGES * 3 // 4):
            pages[i] = page_of(rng)
            s.write(i * PAGE, memoryview(pages[i]))
    if seed % 2:
        s.preformat(b"SWAPSPACE2".rjust(PAGE, b"\0"))   # the uncounted raw header in slot 0
        pages[0] = bytes(PAGE)
    return s, pages


def ranges(seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed + 1000)
    out = [(0, 512), (512, NPAGES - 512)]               # cluster-aligned, then to the end
    for _ in range(6):
        a = rng.randrange(NPAGES)
        out.append((a, rng.randrange(1, NPAGES - a + 1)))
    return out


@pytest.mark.parametrize("allocator", ["log", "xvmalloc"])
@pytest.mark.parametrize("seed", range(6))
def test_bulk_discard_equals_clearing_slot_by_slot(seed, allocator):
    a, pages = filled(seed, allocator)
    b, _ = filled(seed, allocator)
    try:
        gone = np.zeros(NPAGES, dtype=bool)
        for first, n in ranges(seed)[:2 + seed % 7]:
            a.discard(first * PAGE, n * PAGE)
            b.write_zeroes(first * PAGE, n * PAGE)     # no backing swap: _set(EMPTY) each
            gone[first:first + n] = True
            for key, v in a.table().items():
                assert np.array_equal(v, b.table()[key]), key
            assert a.stats() == b.stats()
            assert a.allocator.pages_used() == b.allocator.pages_used()
            invariants.check(a)
        out = bytearray(PAGE)
        for i in range(NPAGES):
            a.read(i * PAGE, memoryview(out))
            assert out == (bytes(PAGE) if gone[i] else pages[i]), i
        assert a.stats()["notify_free"] == b.stats()["notify_free"] > 0
    finally:
        a.close()
        b.close()


def test_a_discard_of_a_whole_device_frees_everything_in_bounded_slices(monkeypatch):
    s, _ = filled(3, "log")
    sizes = []
    real = s._clear

    def spy(lo, hi):
        sizes.append(hi - lo)
        real(lo, hi)
    monkeypatch.setattr(s, "_clear", spy)
    try:
        s.discard(0, NPAGES * PAGE)
        st = s.stats()
        assert st["pages_stored"] == st["same_pages"] == st["compr_data_size"] == 0
        assert s.allocator.pages_used() == 0 and st["notify_free"] == NPAGES
        assert max(sizes) == storemod.DISCARD_SLICE and sum(sizes) == NPAGES
        invariants.check(s)
    finally:
        s.close()
