"""The store's invariants, checked from its public surface (slow; tests only)."""
from __future__ import annotations

import numpy as np

from ublkzswap import arena
from ublkzswap.slots import COMP, EMPTY, GOOD_COMPRESS, RAW, SAME

PAGE = 4096


def check(store) -> None:
    """Table, allocator, page pool and counters agree; AssertionError says where not."""
    tab = store.table()
    st = store.stats()
    kinds, addr, length, value = tab["kind"], tab["address"], tab["length"], tab["value"]
    header = (kinds == RAW) & (length == 0)        # preformatted page 0: kept apart, uncounted
    assert np.count_nonzero(header) <= 1 and not header[1:].any(), "header marker off slot 0"
    kinds = np.where(header, EMPTY, kinds)
    held = np.flatnonzero((kinds == COMP) | (kinds == RAW))
    objects, holders = {}, {}
    for i in held.tolist():
        a = int(addr[i])
        n = int(length[i])
        assert objects.setdefault(a, n) == n, f"object {a:#x}: two lengths"
        holders.setdefault(a, []).append(i)
    link = tab["link"]
    dup = 0
    for a, slots in holders.items():
        if len(slots) == 1:
            assert link[slots[0]] == 0, f"slot {slots[0]} holds {a:#x} alone but has a ring link"
            continue
        assert len({int(kinds[i]) for i in slots}) == 1, f"object {a:#x}: raw and compressed"
        seen, i = [], slots[0]                   # one ring through exactly these slots
        while True:
            seen.append(i)
            i = int(link[i]) - 1
            assert 0 <= i < len(link) and len(seen) <= len(slots), f"object {a:#x}: broken ring"
            if i == slots[0]:
                break
        assert sorted(seen) == sorted(slots), f"object {a:#x}: ring {seen} != holders {slots}"
        dup += (len(slots) - 1) * objects[a]
    assert st["dup_data_size"] == dup, f"dup_data_size {st['dup_data_size']} != {dup}"
    store.allocator.check(objects)
    pool = store.pool
    units = len(pool.pages_of(arena.OBJECTS)) + len(pool.pages_of(arena.WHOLE))
    assert units * pool.unit == store.allocator.pages_used(), "pool and allocator disagree on pages"
    comp, raw = np.flatnonzero(kinds == COMP), np.flatnonzero(kinds == RAW)
    assert np.all(length[raw] == PAGE), "raw slot with a length other than a page"
    same = np.flatnonzero(kinds == SAME)
    zero = int(np.count_nonzero(value[same] == 0))
    lens = length[comp]
    assert st["same_pages"] == len(same), f"same_pages {st['same_pages']} != {len(same)}"
    assert st["zero_pages"] == zero, f"zero_pages {st['zero_pages']} != {zero}"
    assert st["huge_pages"] == len(raw), f"huge_pages {st['huge_pages']} != {len(raw)}"
    stored = len(comp) + len(raw) + (len(same) - zero)
    assert st["pages_stored"] == stored, f"pages_stored {st['pages_stored']} != {stored}"
    good = int(np.count_nonzero(lens <= GOOD_COMPRESS)) + (len(same) - zero)
    assert st["good_compress"] == good, f"good_compress {st['good_compress']} != {good}"
    compr = int(lens.sum()) + PAGE * len(raw)
    assert st["compr_data_size"] == compr, f"compr_data_size {st['compr_data_size']} != {compr}"
    assert st["mem_used_total"] == store.allocator.pages_used() * PAGE
    assert st["mem_used_max"] >= st["mem_used_total"], "mem_used_max below mem_used_total"
    empty = (tab["kind"] == EMPTY) | header
    assert np.all(length[empty] == 0) and np.all(addr[empty] == 0), "empty slot with content"
    assert np.all(addr[tab["kind"] == SAME] == 0), "same-filled slot with an address"
