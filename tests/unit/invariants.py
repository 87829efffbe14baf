"""The store's invariants, checked from its public surface (slow; tests only)."""
from __future__ import annotations

import numpy as np

from ublkzswap import arena
from ublkzswap.store import COMP, EMPTY, GOOD_COMPRESS, RAW, SAME

PAGE = 4096


def check(store) -> None:
    """Table, allocator, page pool and counters agree; AssertionError says where not."""
    tab = store.table()
    st = store.stats()
    kinds, addr, length, value = tab["kind"], tab["address"], tab["length"], tab["value"]
    header = []
    if store.header_slot >= 0:          # preformatted page 0: a WHOLE page, counted nowhere
        assert kinds[store.header_slot] == RAW
        header = [int(addr[store.header_slot])]
        kinds = kinds.copy()
        kinds[store.header_slot] = EMPTY
        length, addr = length.copy(), addr.copy()
        length[store.header_slot] = addr[store.header_slot] = 0
    live = store.allocator.check(store.pool.pages_of(arena.OBJECTS))
    comp = np.flatnonzero(kinds == COMP)
    handles = {int(addr[i]): int(length[i]) for i in comp}
    assert len(handles) == len(comp), "two slots share one allocator object"
    assert handles == live, (f"table and allocator disagree: {len(handles)} compressed slots, "
                             f"{len(live)} live objects")
    raw = np.flatnonzero(kinds == RAW)
    raw_pages = {int(addr[i]) for i in raw}
    assert len(raw_pages) == len(raw), "two slots share one raw page"
    assert raw_pages | set(header) == set(store.pool.pages_of(arena.WHOLE).tolist()), "raw slots and WHOLE pages disagree"
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
    objects = len(store.pool.pages_of(arena.OBJECTS))
    assert st["mem_used_total"] == (objects + len(raw)) * PAGE, "mem_used_total != pages in use"
    assert st["mem_used_max"] >= st["mem_used_total"], "mem_used_max below mem_used_total"
    assert np.all(length[kinds == EMPTY] == 0) and np.all(addr[kinds == EMPTY] == 0), "empty slot with content"
    assert np.all(addr[kinds == SAME] == 0), "same-filled slot with an address"
