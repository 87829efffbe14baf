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
    objects = {int(addr[i]): int(length[i]) for i in held}
    assert len(objects) == len(held), "two slots share one allocator object"
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
