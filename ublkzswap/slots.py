"""The slot table's format and the counters that follow its content.

Owns: how a slot is encoded (two uint64 words a slot, 16 bytes as zram's table entry: ``address
<< 16 | length << 2 | kind`` and, for a SAME slot, the fill word), the slot kinds, the store's
counter record (:data:`COUNTERS`, zram's names; ``stats.py`` labels them) and the one rule that
moves counters with content (:func:`count`), and decoding for tests and tools
(:func:`decode`, :func:`decode_all`). The store (:mod:`ublkzswap.store`) is the only writer
of a table; it stores an entry word last, so a reader sees old or new content, never half.

A RAW entry with length 0 is page 0 as ``preformat`` left it (the swap header, kept apart and
counted nowhere). Length takes 13 bits (objects up to 4096 bytes), the address 48.
"""

from __future__ import annotations

import numpy as np

from .uapi import PAGE_SIZE

EMPTY, SAME, RAW, COMP = 0, 1, 2, 3           # slot kinds (low two bits of an entry)
KIND_NAMES = ("empty", "same", "raw", "compressed")
GOOD_COMPRESS = PAGE_SIZE // 2                # clen <= 2048 counts as good_compress

#: The store's counters, in the order of its counter record.
COUNTERS = ("num_reads", "num_writes", "failed_reads", "failed_writes", "notify_free",
            "zero_pages", "same_pages", "good_compress", "huge_pages", "pages_stored",
            "compr_data_size", "mem_used_max", "bd_reads", "bd_writes", "pages_compacted")
(NUM_READS, NUM_WRITES, FAILED_READS, FAILED_WRITES, NOTIFY_FREE, ZERO_PAGES, SAME_PAGES,
 GOOD_COMPRESS_N, HUGE_PAGES, PAGES_STORED, COMPR_DATA_SIZE, MEM_USED_MAX, BD_READS,
 BD_WRITES, PAGES_COMPACTED) = range(len(COUNTERS))


def count(c, kind: int, length: int, value: int, d: int) -> None:
    """Move the counter record ``c`` by ``d`` (+1 or -1) slots of (kind, length, value)."""
    if kind == SAME:
        c[SAME_PAGES] += d
        if value:
            c[PAGES_STORED] += d
            c[GOOD_COMPRESS_N] += d
        else:
            c[ZERO_PAGES] += d
        return
    c[PAGES_STORED] += d
    c[COMPR_DATA_SIZE] += d * length
    if kind == RAW:
        c[HUGE_PAGES] += d
    elif length <= GOOD_COMPRESS:
        c[GOOD_COMPRESS_N] += d


def decode(entry: int, value: int) -> tuple[str, int, int, int]:
    """(kind name, address, length, fill word) of one slot's two words."""
    kind = entry & 3
    return KIND_NAMES[kind], entry >> 16, (entry >> 2) & 0x1FFF, value if kind == SAME else 0


def decode_all(tab: np.ndarray) -> dict[str, np.ndarray]:
    """A whole table (uint64, two words a slot) decoded: kind, address, length, value arrays."""
    t = tab.reshape(-1, 2)
    kind = t[:, 0] & np.uint64(3)
    return {"kind": kind.astype(np.uint8), "address": t[:, 0] >> np.uint64(16),
            "length": ((t[:, 0] >> np.uint64(2)) & np.uint64(0x1FFF)).astype(np.int64),
            "value": np.where(kind == SAME, t[:, 1], 0).astype(np.uint64)}


def recount(c, tab: np.ndarray, scan: int = 8192) -> None:
    """Set the counters that follow content (same, zero, huge, stored, good, compressed size)
    from a whole table, as :func:`count` would have left them: a takeover's reconciliation.
    ``scan`` slots at a time, so that numpy's temporaries stay small."""
    nsame = zero = nraw = ncomp = good = size = 0
    for lo in range(0, len(tab) // 2, scan):
        e, v = tab[2 * lo:2 * (lo + scan):2], tab[2 * lo + 1:2 * (lo + scan):2]
        kind = e & np.uint64(3)
        length = ((e >> np.uint64(2)) & np.uint64(0x1FFF)).astype(np.int64)
        same, comp, raw = kind == SAME, kind == COMP, (kind == RAW) & (length > 0)
        zero += int(np.count_nonzero(same & (v == 0)))
        nsame += int(np.count_nonzero(same))
        nraw += int(np.count_nonzero(raw))
        ncomp += int(np.count_nonzero(comp))
        good += int(np.count_nonzero(comp & (length <= GOOD_COMPRESS)))
        size += int(length[comp].sum())
    c[SAME_PAGES], c[ZERO_PAGES], c[HUGE_PAGES] = nsame, zero, nraw
    c[PAGES_STORED] = ncomp + nraw + nsame - zero
    c[GOOD_COMPRESS_N] = good + nsame - zero
    c[COMPR_DATA_SIZE] = size + PAGE_SIZE * nraw
